"""How a running protocol reports progress: a bar on a terminal, plain lines elsewhere.

On a terminal, tqdm's bar with ns/day. Off a terminal (a batch job's log file), the bar
would print nothing useful until the end, so a plain line goes out at the first logged
frame and then at most every ``every_s`` seconds of wall time, and at the last step:

    nvt run.h5: step 2000/100000 (2 ps), 4.1 ns/day, ETA 1h05m, T 301.2 K, density 0.998 g/cm³
"""

from __future__ import annotations

import sys
import time

import numpy as np
from ase import Atoms
from tqdm.auto import tqdm

from mace_lpcalc.systems import water_density_g_cm3
from mace_lpcalc.md.frames import Frame

_SECONDS_PER_DAY = 86400.0


def ns_per_day(timestep_fs: float, seconds_per_step: float) -> float:
    return timestep_fs * 1e-6 * _SECONDS_PER_DAY / seconds_per_step


class RunProgress:
    """Progress of one run from step ``start`` to ``total``; ``stream`` is stderr unless
    given. ``show_conserved_energy``: the dynamics conserves an energy (not Langevin),
    whose change since the first reported frame the lines show."""

    def __init__(self, label: str, start: int, total: int, timestep_fs: float,
                 every_s: float, show_conserved_energy: bool, stream=None):
        self.label, self.total, self.timestep_fs, self.every_s = label, total, timestep_fs, every_s
        self.show_conserved_energy = show_conserved_energy
        self.stream = stream or sys.stderr
        self.on_terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar = tqdm(total=total, initial=start, unit="step", desc=label,
                         file=self.stream) if self.on_terminal else None
        self._step, self._last_line_at, self._first_conserved_eV = start, None, None

    def update(self, frame: Frame, atoms: Atoms, sentinel_force_max: float | None = None) -> None:
        """Report the frame just logged (``frame.wall_time_per_step_s`` gives the speed);
        ``atoms`` gives the masses, ``sentinel_force_max`` the fp64 sentinel's latest check."""
        if self._first_conserved_eV is None:
            self._first_conserved_eV = frame.conserved_energy_eV
        if self._bar is not None:
            self._bar.update(frame.step - self._step)
            speed = ns_per_day(self.timestep_fs, frame.wall_time_per_step_s)
            self._bar.set_postfix_str(f"{speed:.3g} ns/day" + (
                "" if sentinel_force_max is None else f", fp64 ΔF {sentinel_force_max:.2g}"))
        else:
            now = time.monotonic()
            due = self._last_line_at is None or now - self._last_line_at >= self.every_s
            if due or frame.step == self.total:
                print(self.line(frame, atoms, sentinel_force_max), file=self.stream, flush=True)
                self._last_line_at = now
        self._step = frame.step

    def line(self, frame: Frame, atoms: Atoms, sentinel_force_max: float | None = None) -> str:
        seconds_per_step = frame.wall_time_per_step_s
        parts = [f"{self.label}: step {frame.step}/{self.total} ({frame.time_ps:.4g} ps)"]
        if np.isfinite(seconds_per_step):
            parts.append(f"{ns_per_day(self.timestep_fs, seconds_per_step):.3g} ns/day")
            parts.append(f"ETA {_duration((self.total - frame.step) * seconds_per_step)}")
        parts.append(f"T {frame.temperature_K:.1f} K")
        if frame.cell_A is not None:
            parts.append(f"density {water_density_g_cm3(atoms):.4g} g/cm³")
        if self.show_conserved_energy:
            drift_meV = (frame.conserved_energy_eV - self._first_conserved_eV) / len(atoms) * 1e3
            parts.append(f"conserved energy change {drift_meV:+.3g} meV/atom")
        if sentinel_force_max is not None:
            parts.append(f"fp64 sentinel max |ΔF| {sentinel_force_max:.3g} eV/Å")
        return ", ".join(parts)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def _duration(seconds: float) -> str:
    minutes = int(round(seconds / 60))
    if minutes < 1:
        return f"{seconds:.0f}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m"
