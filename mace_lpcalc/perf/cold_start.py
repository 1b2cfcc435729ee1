"""From process start to full speed: every MD step of fresh processes, cold and warm cache.

    python -m mace_lpcalc.perf.cold_start --device cuda --model off24m --molecules 216 \\
        --policies fp32 fp32-linear-fp16 --seconds 60 --out FILE.json

Per policy, three processes one after the other, each running ASE Langevin (1 fs, 300 K)
from a lattice-built water box for ``--seconds`` from its start (the first, with
``--cold-max-seconds``, on until its compiled call is in use) and timing every step:
the default (``compile_model="auto"``) with an empty cache directory, the default again
on the cache the first left behind, then the uncompiled fast path
(``compile_model=False``, the reference speed, on the same warm cache). Times count from just before each process is started, so
interpreter start, imports and model set-up are in them. Reported per process: the first
step, when the compiled call took over, the median step before and after, and the
steps slower than twice the median of their phase (stalls).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: A step slower than this many times the median of its phase is a stall.
STALL_FACTOR = 2.0
RUNS = (("cold cache", "auto"), ("warm cache", "auto"), ("uncompiled", False))


def child(args) -> None:
    """One MD run in this process: a JSON line per step on stdout."""
    import numpy as np
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    from mace_lpcalc.calculator import LowPrecisionMACECalculator
    from mace_lpcalc.fastpath.compiled import shorten_switch_interval_of_this_process
    from mace_lpcalc.perf.bench import make_model
    from mace_lpcalc.systems import water_box

    shorten_switch_interval_of_this_process()
    compile_model = {"False": False, "auto": "auto"}[args.compile_model]
    print(json.dumps({"imported": time.time()}), flush=True)
    model = make_model(args.model)
    print(json.dumps({"model_built": time.time()}), flush=True)
    calc = LowPrecisionMACECalculator(models=model, device=args.device,
                                      policy=args.policy, compile_model=compile_model)
    print(json.dumps({"calculator_built": time.time()}), flush=True)
    atoms = water_box(args.molecules, seed=0)
    atoms.calc = calc
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    dynamics = Langevin(atoms, timestep=1.0 * units.fs, temperature_K=300, friction=0.01,
                        rng=np.random.default_rng(0))
    compiled = calc.engine.compiled if calc.engine is not None else None
    in_use = False
    while time.time() < args.until and not (in_use and time.time() >= args.enough):
        started = time.perf_counter()
        dynamics.run(1)
        in_use = bool(compiled and compiled.last_call_compiled)
        print(json.dumps({"end": time.time(), "ms": (time.perf_counter() - started) * 1e3,
                          "compiled": in_use}), flush=True)
    summary = {"edge_capacity": calc.engine.edge_capacity if calc.engine else None,
               "parameters": {key: calc.parameters.get(key) for key in
                              ("compile_model", "compile_caches", "backend", "versions")}}
    if compiled is not None:
        summary.update(compilations=compiled.n_compilations, failure=compiled.failure,
                       cache_hits=compiled.n_cache_hits,
                       still_compiling=compiled.pending,
                       compile_and_check_s=compiled.setup_seconds)
    print(json.dumps({"summary": summary}), flush=True)
    os._exit(0)  # not waiting for a compilation still running: the next process starts now


def run_process(args, policy: str, compile_model, environment: dict, cold=False) -> dict:
    """Start one child and analyse its steps; seconds count from just before the start."""
    spawned = time.time()
    # The cold process may run on until its compilation is in use (and in the cache).
    seconds = max(args.seconds, args.cold_max_seconds) if cold else args.seconds
    command = [sys.executable, "-m", "mace_lpcalc.perf.cold_start", "--child", "--device", args.device,
               "--model", args.model, "--molecules", str(args.molecules), "--policy", policy,
               "--compile-model", str(compile_model), "--until", str(spawned + seconds),
               "--enough", str(spawned + args.seconds)]
    result = subprocess.run(command, env=environment, capture_output=True, text=True,
                            timeout=seconds + 900, check=False)
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0:
        return {"failed": result.stderr[-3000:]}
    steps = [record for record in records if "ms" in record]
    stages = {f"{name}_s": record[name] - spawned for record in records
              for name in ("imported", "model_built", "calculator_built") if name in record}
    return {**stages, **analyse(steps, spawned),
            **next(record["summary"] for record in records if "summary" in record)}


def analyse(steps: list[dict], spawned: float) -> dict:
    """First step, switch to the compiled call, medians per phase and the stalls."""
    if not steps:  # the process ran out of time before its first step
        return {"steps": 0, "first_step_s": None, "compiled_from_s": None}
    switch = next((index for index, step in enumerate(steps) if step["compiled"]), None)
    phases = {"uncompiled": steps[1:switch] if switch is not None else steps[1:],
              "compiled": steps[switch + 1:] if switch is not None else []}
    result = {"steps": len(steps), "first_step_s": steps[0]["end"] - spawned,
              "compiled_from_s": steps[switch]["end"] - spawned if switch is not None else None}
    for name, phase in phases.items():
        if len(phase) < 5:
            continue
        median = statistics.median(step["ms"] for step in phase)
        stalls = [step for step in phase if step["ms"] > STALL_FACTOR * median]
        result[name] = {"steps": len(phase), "median_ms": median,
                        "stalls": len(stalls), "stall_ms": sorted(
                            round(step["ms"], 1) for step in stalls)[-10:],
                        "stall_at_s": [round(step["end"] - spawned, 1) for step in stalls][:10]}
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="off24m", help="off24m, tiny, or a .model path")
    parser.add_argument("--molecules", type=int, default=216, help="water molecules (x3 atoms)")
    parser.add_argument("--policies", nargs="+", default=["fp32"])
    parser.add_argument("--seconds", type=float, default=60.0, help="wall time per process")
    parser.add_argument("--cold-max-seconds", type=float, default=0.0,
                        help="let the cold-cache process run past --seconds, up to this "
                             "long, until its compiled call is in use, so that the next "
                             "process finds it in the cache")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--policy", help=argparse.SUPPRESS)
    parser.add_argument("--compile-model", help=argparse.SUPPRESS)
    parser.add_argument("--until", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--enough", type=float, default=float("inf"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    from mace_lpcalc.fastpath.disk_caches import LIBRARY_CACHE_VARIABLES
    from mace_lpcalc.installed import measurement_provenance
    from mace_lpcalc.perf.bench import write_json

    result = {"benchmark": "process start to full speed, ASE Langevin, every step",
              "model": args.model, "n_atoms": 3 * args.molecules, "device": args.device,
              "seconds_per_process": args.seconds, "cold_max_seconds": args.cold_max_seconds,
              "stall_factor": STALL_FACTOR,
              **measurement_provenance(args.device), "runs": []}
    for policy in args.policies:
        with tempfile.TemporaryDirectory(prefix="mace_lpcalc_cold_start_") as cache:
            # An empty cache of our own; the kernels of an installed library stay cached.
            environment = {key: value for key, value in os.environ.items()
                           if key not in LIBRARY_CACHE_VARIABLES}
            environment["MACE_LPCALC_CACHE_DIR"] = cache
            for name, compile_model in RUNS:
                row = {"policy": policy, "run": name,
                       **run_process(args, policy, compile_model, environment,
                                     cold=name == "cold cache")}
                print(json.dumps({key: row.get(key) for key in
                                  ("policy", "run", "first_step_s", "compiled_from_s",
                                   "uncompiled", "compiled", "failed")}), flush=True)
                result["runs"].append(row)
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
