"""Time from constructing the calculator to its first step, as a fresh process pays it.

    python -m mace_lpcalc.perf.setup_time --device cuda --model off24m --molecules 1728 --policy fp32

Run it once per configuration, each in a new process: the first calculator of a
process pays one-time costs (cuEquivariance builds its descriptors in Python and
compiles its kernels at their first call) that :mod:`mace_lpcalc.perf.bench`, timing many
calculators in one process, would hide. A second calculator in the same process shows
what is left once those are paid. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import cProfile
import contextlib
import io
import json
import pstats
import time
from pathlib import Path

import torch
from ase.calculators.calculator import all_changes

from mace_lpcalc.perf.bench import make_model
from mace_lpcalc.timing import synchronize
from mace_lpcalc.calculator import LowPrecisionMACECalculator
from mace_lpcalc.precision.policies import POLICIES
from mace_lpcalc.systems import water_box
from mace_lpcalc.fastpath.compiled import shorten_switch_interval_of_this_process


def time_setup(*, model_spec: str, device: str, n_molecules: int, policy: str,
               compile_model: bool, profile_path: Path | None = None) -> dict:
    """Seconds spent building the model, constructing the calculator and on its first
    call, for a first and a second calculator in this process; ms of the next call.
    With ``profile_path``, the first calculator's construction and first call run under
    cProfile, whose top functions are written there."""
    atoms = water_box(n_molecules, seed=0)
    result = {"n_atoms": len(atoms), "policy": policy, "compile_model": compile_model}
    for attempt in ("first", "second"):
        start = time.perf_counter()
        model = make_model(model_spec)
        built = time.perf_counter()
        profiler = cProfile.Profile() if profile_path and attempt == "first" else None
        with profiler or contextlib.nullcontext():
            calc = LowPrecisionMACECalculator(models=model, device=device, policy=policy,
                                              compile_model=compile_model)
            constructed = time.perf_counter()
            calc.calculate(atoms, ["energy", "forces"], all_changes)
            synchronize(device)
        first_call = time.perf_counter()
        if profiler is not None:
            _write_profile(profiler, profile_path)
        calc.calculate(atoms, ["energy", "forces"], all_changes)
        synchronize(device)
        result[attempt] = {
            "model_build_s": built - start,
            "calculator_init_s": constructed - built,
            "first_call_s": first_call - constructed,
            "construction_to_first_step_s": first_call - built,
            "second_call_ms": (time.perf_counter() - first_call) * 1e3,
            "backend": calc.backend,
        }
        if compile_model:
            calc.engine.compiled.wait()
            result[attempt]["compile_and_check_s"] = calc.engine.compiled.setup_seconds
        del calc, model
    return result


def _write_profile(profiler: cProfile.Profile, path: Path) -> None:
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("cumulative").print_stats(70)
    stats.sort_stats("tottime").print_stats(25)
    path.write_text(text.getvalue())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="off24m", help="off24m, tiny, or a .model path")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--molecules", type=int, default=1728, help="water molecules (x3 atoms)")
    parser.add_argument("--policy", default="fp32", choices=list(POLICIES))
    parser.add_argument("--compile", action="store_true", help="with compile_model=True")
    parser.add_argument("--profile", type=Path,
                        help="write cProfile's top functions of the first calculator's "
                             "construction and first call here (slows them down)")
    args = parser.parse_args(argv)
    print(json.dumps(time_setup(model_spec=args.model, device=args.device,
                                n_molecules=args.molecules, policy=args.policy,
                                compile_model=args.compile, profile_path=args.profile)))


if __name__ == "__main__":
    shorten_switch_interval_of_this_process()
    main()
