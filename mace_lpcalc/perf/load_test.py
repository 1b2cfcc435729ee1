"""A long NPT run under load: does host or GPU memory grow, and how big is each frame?

    python -m mace_lpcalc.perf.load_test --device cuda --replicas 3 --seconds 420 \\
        --out bench/results/h200_load_npt_5184.json

runs the NPT protocol (thesis water settings, shipped model) on copies of the shipped
equilibrated water box (fresh Maxwell-Boltzmann velocities at 300 K) for as many
steps as fit in ``--seconds`` of wall time (estimated from a short first leg), logging a
frame every ``--log-every`` steps, and records at every frame the process's resident host
memory and the GPU memory torch holds. The JSON gives the series, their growth per
thousand steps over the second half of the run (where start-up allocations are done),
ms per step, and the trajectory's size per frame: the payload of the per-frame datasets
and the whole file's size over its frames (chunk allocation and metadata included).
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import sys
import time
from pathlib import Path

import ase.io
import h5py
import numpy as np
import torch

from mace_lpcalc.installed import package_versions
from mace_lpcalc.md.npt import NPT, NPTSettings

SHIPPED_WATER = Path(__file__).resolve().parents[2] / "systems" / "water_192_spcfw.xyz"

_MB = 2.0 ** 20


def resident_host_mb() -> float:
    """The process's resident set size (MB), from /proc (Linux)."""
    with open("/proc/self/statm") as handle:
        resident_pages = int(handle.read().split()[1])
    return resident_pages * resource.getpagesize() / _MB


class _RecordingNPT(NPT):
    """NPT that samples memory and wall time at every logged frame."""

    samples: list

    def _frame(self, atoms, dynamics, step, seconds_per_step):
        cuda = str(self.settings.device).startswith("cuda")
        self.samples.append({
            "step": step, "wall_s": time.perf_counter(),
            "host_rss_mb": resident_host_mb(),
            "gpu_allocated_mb": torch.cuda.memory_allocated() / _MB if cuda else None,
            "gpu_reserved_mb": torch.cuda.memory_reserved() / _MB if cuda else None})
        return super()._frame(atoms, dynamics, step, seconds_per_step)


def growth_per_1000_steps(steps: np.ndarray, values: np.ndarray) -> float:
    """Least-squares slope of ``values`` against ``steps`` over the second half, per 1000 steps."""
    half = len(steps) // 2
    if len(steps) - half < 2:
        return float("nan")
    return float(np.polyfit(steps[half:], values[half:], 1)[0] * 1000.0)


def run_load_test(*, structure: Path, out: Path, device: str, policy: str, seconds: float,
                  log_every: int) -> dict:
    first_leg_steps = 2 * log_every
    common = dict(structure=str(structure), device=device, policy=policy, log_every=log_every,
                  checkpoint_every=10 * log_every, out=str(out), progress_every_s=60.0)
    protocol = _RecordingNPT(NPTSettings(**common, steps=first_leg_steps, overwrite=True))
    protocol.samples = []
    started = time.perf_counter()
    protocol.run()
    first_leg_s = time.perf_counter() - started
    first, last = protocol.samples[0], protocol.samples[-1]
    per_step_s = (last["wall_s"] - first["wall_s"]) / (last["step"] - first["step"])
    steps = first_leg_steps + int(max(seconds - first_leg_s, 0.0) / per_step_s)
    steps = max(steps - steps % log_every, first_leg_steps + 4 * log_every)
    resumed = _RecordingNPT(NPTSettings(**common, steps=steps, resume=True))
    resumed.samples = protocol.samples
    resumed.run()
    samples = resumed.samples
    step = np.array([sample["step"] for sample in samples], dtype=float)
    wall = np.array([sample["wall_s"] for sample in samples])
    in_second_leg = step > first_leg_steps
    intervals_ms = np.diff(wall[in_second_leg]) / np.diff(step[in_second_leg]) * 1e3
    series = {key: np.array([sample[key] for sample in samples], dtype=float)
              for key in ("host_rss_mb", "gpu_allocated_mb", "gpu_reserved_mb")
              if samples[0][key] is not None}
    with h5py.File(out, "r") as handle:
        n_frames, n_atoms = int(handle["step"].shape[0]), int(handle.attrs["n_atoms"])
        backend = str(handle.attrs["backend"])
        payload_bytes_per_frame = sum(
            dataset.dtype.itemsize * int(np.prod(dataset.shape[1:], dtype=int))
            for dataset in handle.values()
            if isinstance(dataset, h5py.Dataset) and dataset.shape[:1] == (n_frames,))
    return {
        "what": "NPT (thesis water settings) under load: memory growth and file size",
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        "versions": package_versions() | {"cuda": torch.version.cuda},
        "n_atoms": n_atoms, "policy": policy, "backend": backend, "steps": int(step[-1]),
        "wall_s": float(wall[-1] - wall[0]),
        "median_ms_per_step": float(np.median(intervals_ms)),
        "p95_ms_per_step": float(np.percentile(intervals_ms, 95)),
        "frames": n_frames, "file_bytes": out.stat().st_size,
        "payload_bytes_per_frame": payload_bytes_per_frame,
        "file_bytes_per_frame": out.stat().st_size / n_frames,
        "growth_per_1000_steps_second_half": {
            key: growth_per_1000_steps(step, values) for key, values in series.items()},
        "start_end": {key: [float(values[1]), float(values[-1])]
                      for key, values in series.items()},
        "series": {"step": step.tolist(), **{key: values.round(2).tolist()
                                            for key, values in series.items()}},
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mace_lpcalc.perf.load_test",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--policy", default="fp32")
    parser.add_argument("--replicas", type=int, default=3,
                        help="copies of the shipped equilibrated 192-atom water box along "
                             "each axis (3: 5184 atoms)")
    parser.add_argument("--seconds", type=float, default=420.0,
                        help="wall time to fill with MD (s)")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--workdir", type=Path, default=Path("load_test_run"))
    parser.add_argument("--out", type=Path, required=True, help="JSON result file")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    structure = args.workdir / "water.xyz"
    ase.io.write(structure, ase.io.read(SHIPPED_WATER).repeat(args.replicas))
    result = run_load_test(structure=structure, out=args.workdir / "npt.h5", device=args.device,
                           policy=args.policy, seconds=args.seconds, log_every=args.log_every)
    result["command"] = "python -m mace_lpcalc.perf.load_test " + " ".join(
        argv if argv is not None else sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({key: value for key, value in result.items() if key != "series"}, indent=1))


if __name__ == "__main__":
    main()
