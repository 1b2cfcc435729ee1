"""Thermodynamic series: energy drift and the production part of a run."""

from __future__ import annotations

import numpy as np
from scipy import stats


def energy_drift(time_ps, total_energy_eV, n_atoms: int) -> tuple[float, float]:
    """Linear drift of an energy that should be conserved, meV/atom/ps.

    ``time_ps`` and ``total_energy_eV`` have shape ``(n_frames,)``. Returns the
    least-squares slope (``scipy.stats.linregress``) divided by ``n_atoms``, and its
    standard error. The regression error treats the fluctuations about the line as
    independent, so for strongly correlated fluctuations it is a lower bound.
    """
    time_ps = np.asarray(time_ps, dtype=float)
    energy = np.asarray(total_energy_eV, dtype=float)
    if time_ps.ndim != 1 or time_ps.shape != energy.shape:
        raise ValueError(f"time_ps {time_ps.shape} and total_energy_eV {energy.shape} must be "
                         "one-dimensional and of equal length")
    if len(time_ps) < 3:
        raise ValueError("an energy drift needs at least three frames")
    if n_atoms < 1:
        raise ValueError(f"n_atoms must be positive, got {n_atoms}")
    if not (np.all(np.isfinite(time_ps)) and np.all(np.isfinite(energy))):
        raise ValueError("time_ps and total_energy_eV must be finite")
    if np.ptp(time_ps) == 0:
        raise ValueError("time_ps must span a non-zero interval")
    fit = stats.linregress(time_ps, energy)
    to_meV_per_atom = 1000.0 / n_atoms
    return float(fit.slope * to_meV_per_atom), float(fit.stderr * to_meV_per_atom)


def production_start(n_frames: int, discard_fraction: float) -> int:
    """Index of the first production frame after discarding ``discard_fraction`` of a run."""
    if not 0 <= discard_fraction < 1:
        raise ValueError(f"discard_fraction must lie in [0, 1), got {discard_fraction}")
    return int(np.floor(discard_fraction * n_frames))
