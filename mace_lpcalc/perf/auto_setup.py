"""What ``policy="auto"`` costs at set-up and what it picks, on the shipped water model.

    python -m mace_lpcalc.perf.auto_setup --device cuda --molecules 1728 --json out.json

In one process: a plain fp32 calculator's first call first (it pays the process's one-time
costs: cuEquivariance descriptors and kernel compilation), then an ``"auto"`` calculator's
first call, which measures every candidate on the structure and its rattled copies. The
auto set-up cost is the difference of the two first calls; the decision and its evidence
are ``calc.parameters["policy_decision"]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from ase.calculators.calculator import all_changes

from mace_lpcalc.calculator import LowPrecisionMACECalculator
from mace_lpcalc.installed import package_versions
from mace_lpcalc.models import default_model_path
from mace_lpcalc.timing import synchronize
from mace_lpcalc.systems import water_box


def first_call_seconds(calculator, atoms, device: str) -> float:
    """Seconds from the start of the calculator's first energy+forces call to its end."""
    synchronize(device)
    started = time.perf_counter()
    calculator.calculate(atoms, ["energy", "forces"], all_changes)
    synchronize(device)
    return time.perf_counter() - started


def measure(model_path: Path, n_molecules: int, device: str, backend: str) -> dict:
    atoms = water_box(n_molecules, seed=0)
    results = {}
    for policy in ("fp32", "auto"):
        calculator = LowPrecisionMACECalculator(model_paths=str(model_path), device=device,
                                                policy=policy, backend=backend)
        results[policy] = (calculator, first_call_seconds(calculator, atoms, device))
    auto, auto_s = results["auto"]
    return {"n_atoms": len(atoms), "device": device,
            "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
            "backend": auto.backend, "model": model_path.name,
            "fp32_first_call_s": results["fp32"][1], "auto_first_call_s": auto_s,
            "auto_setup_s": auto_s - results["fp32"][1],
            "chosen_policy": auto.parameters["policy"],
            "policy_decision": auto.parameters["policy_decision"],
            "versions": package_versions(),
            "date": time.strftime("%Y-%m-%d")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--molecules", type=int, default=1728, help="water molecules (x3 atoms)")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    if args.model is None or not args.model.is_file():
        raise SystemExit(f"model file not found: {args.model}")
    result = measure(args.model, args.molecules, args.device, args.backend)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
