"""What the fp64 sentinel costs: ms per MD step with and without it, in one run.

    python -m mace_lpcalc.perf.sentinel_overhead --device cuda --molecules 216 1728 \\
        --policy fp32-linear-bf16 --every 1000 --out bench/results/h200_sentinel_overhead.json

For each box (the shipped water model), ASE Langevin: the median ms per step without
the sentinel, the median time of one sentinel check (the frame at fp64 on mace's path,
after a warm-up check), and the overhead at ``--every`` steps, check / (every · step).
The same calculator measures both, so the two share every other cost.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np
import torch
from ase import units
from ase.md.langevin import Langevin

from mace_lpcalc.calculator import LowPrecisionMACECalculator
from mace_lpcalc.installed import package_versions
from mace_lpcalc.models import default_model_path
from mace_lpcalc.systems import water_box
from mace_lpcalc.timing import median_ms


def measure(n_molecules: int, *, device: str, policy: str, every: int, steps: int,
            checks: int) -> dict:
    atoms = water_box(n_molecules, seed=0)
    calc = LowPrecisionMACECalculator(model_paths=str(default_model_path()), device=device,
                                      policy=policy, sentinel_every=every)
    atoms.calc = calc
    dynamics = Langevin(atoms, 0.5 * units.fs, temperature_K=300, friction=0.01 / units.fs,
                        rng=np.random.default_rng(0))
    dynamics.run(1)  # the first evaluation carries the first (and warm-up) sentinel check
    calc.sentinel.evaluations = 1  # no further check during the timed steps
    step_ms = median_ms(lambda: dynamics.run(1), device, warmup=5, repeats=steps - 5)
    reference = calc._sibling("fp64")
    check_ms = median_ms(lambda: reference.calculate(atoms, ["energy", "forces"], ["positions"]),
                         device, warmup=0, repeats=checks)
    return {"n_atoms": len(atoms), "policy": policy, "backend": calc.backend,
            "median_step_ms": step_ms, "median_check_ms": check_ms,
            "every": every, "overhead_fraction": check_ms / (every * step_ms)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mace_lpcalc.perf.sentinel_overhead",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--molecules", type=int, nargs="+", default=[216])
    parser.add_argument("--policy", default="fp32-linear-bf16")
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--checks", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    rows = [measure(n, device=args.device, policy=args.policy, every=args.every,
                    steps=args.steps, checks=args.checks) for n in args.molecules]
    result = {"what": "fp64 sentinel overhead on ASE Langevin, shipped water model",
              "date": datetime.date.today().isoformat(),
              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
              "versions": package_versions() | {"cuda": torch.version.cuda},
              "command": "python -m mace_lpcalc.perf.sentinel_overhead " + " ".join(
                  argv if argv is not None else sys.argv[1:]),
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
