"""Benchmark: ms per energy+forces call and per ASE Langevin step, per policy and backend.

``python -m mace_lpcalc.perf.bench --device cuda --model off24m --sizes 64 216 512 1728``

Times, in one process on one device: mace's own ``MACECalculator`` (e3nn fp64 and
cuEquivariance fp32, the baselines), ``LowPrecisionMACECalculator`` for each policy and
backend, the model-only floor (the batch already on the device) and a full ASE Langevin
step. Every configuration is warmed up first; times are medians of synchronised wall-clock
intervals. Speedups are ratios against the baselines measured in the same run. Each
policy's energy/force deviation from our fp64 e3nn result is recorded beside its time.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

from mace_lpcalc import compat
import numpy as np
import torch
from ase import units
from ase.calculators.calculator import all_changes
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from mace.calculators import MACECalculator

from mace_lpcalc.calculator import LowPrecisionMACECalculator
from mace_lpcalc.installed import measurement_provenance
from mace_lpcalc.timing import median_ms, synchronize
from mace_lpcalc.model_zoo import build_architecture
from mace_lpcalc.models import build_off24m_shaped_model, build_tiny_model, load_model
from mace_lpcalc.precision.policies import POLICIES
from mace_lpcalc.systems import water_box
from mace_lpcalc.fastpath.compiled import shorten_switch_interval_of_this_process

#: Longest a compiled configuration steps uncompiled, waiting for its compiled call.
COMPILE_WAIT_LIMIT_S = 900
BASELINES = {"mace-e3nn-fp64": dict(default_dtype="float64"),
             "mace-cueq-fp32": dict(default_dtype="float32", enable_cueq=True)}


def make_model(spec: str, dtype=torch.float64) -> torch.nn.Module:
    """``off24m`` (random-weight MACE-OFF24(M) shape), ``tiny``, ``zoo:NAME`` (an
    architecture of :mod:`mace_lpcalc.model_zoo` at MACE-OFF24(M) widths, H and O), or a
    ``.model`` path."""
    if spec == "off24m":
        return build_off24m_shaped_model(dtype=dtype)
    if spec.startswith("zoo:"):
        return build_architecture(spec[4:], atomic_numbers=(1, 8), size="off24m",
                                  r_max=6.0, dtype=dtype)
    if spec == "tiny":
        return build_tiny_model(atomic_numbers=(1, 8), dtype=dtype)
    return load_model(spec).to(dtype)


def energy_forces_call(calc, atoms):
    """One uncached energy+forces evaluation (ASE would reuse results for unchanged atoms)."""
    def call():
        calc.calculate(atoms, ["energy", "forces"], all_changes)
    return call


def langevin_steps_call(calc, atoms, steps: int, seed: int = 0):
    """``steps`` ASE Langevin steps per call (several, so that neighbour-list rebuilds,
    which happen every few steps on the fast path, are part of every sample)."""
    atoms = atoms.copy()
    atoms.calc = calc
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(seed))
    dynamics = Langevin(atoms, timestep=1.0 * units.fs, temperature_K=300, friction=0.01,
                        rng=np.random.default_rng(seed))
    return lambda: dynamics.run(steps)


def peak_memory_mb(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        gc.collect()  # a dropped calculator's CUDA graph pools go only with the calculator
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def model_only_call(calc, atoms):
    """The model alone on a batch already on the device: the floor no calculator can beat."""
    batch = compat.mace_batch(calc, atoms)  # mace's own graph construction, done once
    model = calc.models[0]
    dtype = next(model.parameters()).dtype
    data = {key: (value.to(dtype) if value.is_floating_point() else value)
            for key, value in batch.to_dict().items() if torch.is_tensor(value)}

    def call():
        inputs = dict(data)
        inputs["positions"] = data["positions"].clone()
        model(inputs, compute_stress=False, training=False)
    return call


def run_benchmark(*, model_spec: str, device: str, sizes: list[int], policies: list[str],
                  backends: list[str], warmup: int, repeats: int, langevin: bool,
                  baselines=tuple(BASELINES), fast_path="auto", skins=(None,),
                  langevin_block: int = 10, compile_modes=(False,)) -> dict:
    """Time every configuration; returns the JSON-ready result dictionary."""
    rows = []
    for n_molecules in sizes:
        atoms = water_box(n_molecules, seed=0)
        n_atoms = len(atoms)
        # Evaluated once: no CUDA graph, no second evaluation on mace's path (at 5184
        # atoms of an OFF24(M)-sized model, fp64 e3nn on both paths fills an H200).
        reference = LowPrecisionMACECalculator(models=make_model(model_spec), device=device,
                                               policy="fp64", backend="e3nn",
                                               use_cuda_graph=False, verify_fast_path=False,
                                               compile_model=False)
        reference.calculate(atoms, ["energy", "forces"], all_changes)
        energy64, forces64 = reference.results["energy"], reference.results["forces"].copy()
        del reference

        configurations = []
        for name in baselines or ():
            options = BASELINES[name]
            if options.get("enable_cueq") and not device.startswith("cuda"):
                continue
            configurations.append((name, "mace", lambda o=options: MACECalculator(
                models=make_model(model_spec), device=device, **o)))
        for backend in backends:
            for policy in policies:
                for skin in skins:
                    for compiled in compile_modes:
                        suffix = (f"-skin{skin:g}" if len(skins) > 1 else "") + (
                            "-compiled" if compiled else "")
                        options = {"compile_model": compiled}
                        if skin is not None:
                            options["skin_A"] = skin
                        configurations.append((
                            f"ours-{backend}-{policy}{suffix}", "ours",
                            lambda b=backend, p=policy, o=options: LowPrecisionMACECalculator(
                                models=make_model(model_spec), device=device, policy=p,
                                backend=b, fast_path=fast_path, **o)))
        for name, kind, build in configurations:
            reset_peak_memory(device)
            try:
                row = _measure(name, kind, build, atoms, device, warmup, repeats,
                               langevin_block if langevin and kind == "ours" else int(langevin),
                               energy64, forces64)
            except Exception as err:  # noqa: BLE001 -- record the failure, time the rest
                row = {"name": name, "kind": kind, "n_atoms": n_atoms,
                       "error": f"{type(err).__name__}: {err}"[:500]}
                print(f"{n_atoms:6d} atoms  {name:<34} FAILED {row['error'][:200]}", flush=True)
            rows.append(row)
    _add_speedups(rows)
    return {
        "benchmark": "energy+forces per call and ASE Langevin step",
        "model": model_spec,
        "device": device,
        **measurement_provenance(device),
        "warmup": warmup, "repeats": repeats, "statistic": "median",
        "rows": rows,
    }


def _measure(name, kind, build, atoms, device, warmup, repeats, langevin_steps, energy64,
             forces64):
    n_atoms = len(atoms)
    start = time.perf_counter()
    calc = build()
    calc.calculate(atoms, ["energy", "forces"], all_changes)
    synchronize(device)
    row = {"name": name, "kind": kind, "n_atoms": n_atoms,
           "setup_s": time.perf_counter() - start}
    compiled = getattr(getattr(calc, "engine", None), "compiled", None)
    if compiled is not None and compiled.pending:
        row |= _steps_while_compiling(calc, atoms, compiled, device, start)
    row["energy_forces_ms"] = median_ms(energy_forces_call(calc, atoms), device, warmup, repeats)
    calc.calculate(atoms, ["energy", "forces"], all_changes)
    row["energy_error_eV_per_atom"] = abs(calc.results["energy"] - energy64) / n_atoms
    row["force_relative_error"] = float(np.linalg.norm(calc.results["forces"] - forces64)
                                        / np.linalg.norm(forces64))
    if name in BASELINES:
        row["model_only_ms"] = median_ms(model_only_call(calc, atoms), device, warmup, repeats)
    if langevin_steps:
        # mace's calculator does the same work at every step: one step per sample suffices.
        row["langevin_step_ms"] = median_ms(langevin_steps_call(calc, atoms, langevin_steps),
                                            device, warmup, repeats) / langevin_steps
        row["langevin_steps_per_sample"] = langevin_steps
    if compiled is not None:
        compiled.wait()  # a compilation still running would slow the next configuration
    row["peak_memory_MB"] = peak_memory_mb(device)
    engine = getattr(calc, "engine", None)
    if engine is not None:
        row["cuda_graph_replayed"] = bool(engine.last_call_replayed_graph)
        row["graph_captures"] = engine.n_graph_captures
        row["neighbor_list_builds"] = engine.neighbors.n_builds
    if compiled is not None:
        row["compiled"] = compiled.active
        row["compile_and_check_s"] = compiled.setup_seconds
        row["compile_failure"] = compiled.failure
        row["compiled_vs_eager_relative_L2"] = compiled.check_deviation
        if compiled.check_errors:
            row["compiled_and_eager_error_vs_model_without_16bit"] = {
                name: list(errors) for name, errors in compiled.check_errors.items()}
    print(_format_row(row), flush=True)
    return row


def _steps_while_compiling(calc, atoms, compiled, device, start) -> dict:
    """ASE Langevin steps, one per sample, until the calculator runs the compiled call:
    what an MD run gets meanwhile (the uncompiled call). A lattice-built box outgrows its
    first edge capacity within a few hundred steps, which takes a second compilation."""
    step = langevin_steps_call(calc, atoms, 1)
    samples = []
    deadline = time.perf_counter() + COMPILE_WAIT_LIMIT_S
    while compiled.active and (compiled.pending or not compiled.last_call_compiled) \
            and time.perf_counter() < deadline:
        synchronize(device)
        step_start = time.perf_counter()
        step()
        synchronize(device)
        samples.append((time.perf_counter() - step_start) * 1e3)
    return {"time_to_compiled_s": time.perf_counter() - start,
            "compilations": compiled.n_compilations,
            "steps_while_compiling": len(samples),
            "langevin_step_ms_while_compiling": statistics.median(samples) if samples else None}


def _add_speedups(rows: list[dict]) -> None:
    """Ratios against each baseline at the same size, and ns/day, MeSteps/day at 1 fs."""
    rows = [row for row in rows if "error" not in row]
    for row in rows:
        for baseline in BASELINES:
            match = next((r for r in rows if r["name"] == baseline and r["n_atoms"] == row["n_atoms"]),
                         None)
            if match is None:
                continue
            for key in ("energy_forces_ms", "langevin_step_ms"):
                if key in row and key in match:
                    row[f"speedup_{key.removesuffix('_ms')}_vs_{baseline}"] = match[key] / row[key]
        step_ms = row.get("langevin_step_ms", row["energy_forces_ms"])
        row["ns_per_day_at_1fs"] = 86400e3 / step_ms * 1e-6
        row["MeSteps_per_day"] = 86400e3 / step_ms / 1e6


def _format_row(row: dict) -> str:
    extra = f"  langevin {row['langevin_step_ms']:8.2f} ms" if "langevin_step_ms" in row else ""
    return (f"{row['n_atoms']:6d} atoms  {row['name']:<34} E+F {row['energy_forces_ms']:8.2f} ms"
            f"{extra}  dE/atom {row['energy_error_eV_per_atom']:.1e} eV  "
            f"relF {row['force_relative_error']:.1e}  setup {row['setup_s']:.1f} s"
            + (f"  compiled after {row['time_to_compiled_s']:.1f} s"
               if "time_to_compiled_s" in row else ""))


def markdown_table(result: dict, key: str = "langevin_step_ms") -> str:
    """A Markdown table of one timing column: rows are configurations, columns sizes."""
    rows = [row for row in result["rows"] if key in row]
    sizes = sorted({row["n_atoms"] for row in rows})
    names = list(dict.fromkeys(row["name"] for row in rows))
    lines = [f"| {key} | " + " | ".join(f"{n} atoms" for n in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for name in names:
        cells = []
        for n_atoms in sizes:
            row = next((r for r in rows if r["name"] == name and r["n_atoms"] == n_atoms), None)
            if row is None:
                cells.append("")
                continue
            speedup = row.get(f"speedup_{key.removesuffix('_ms')}_vs_mace-cueq-fp32")
            cells.append(f"{row[key]:.1f}" + (f" ({speedup:.1f}×)" if speedup else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="off24m", help="off24m, tiny, zoo:NAME (mace_lpcalc.model_zoo) or a .model path")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 216, 512, 1728],
                        help="water molecules per box (x3 atoms)")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--backends", nargs="+", default=["e3nn", "cuequivariance"])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-langevin", action="store_true")
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--baselines", nargs="+", default=list(BASELINES), choices=list(BASELINES),
                        help="mace calculators to time as baselines")
    parser.add_argument("--no-fast-path", action="store_true",
                        help="time our calculator on mace's per-call graph construction")
    parser.add_argument("--skins", type=float, nargs="+", default=[None],
                        help="Verlet skins (Å) of the fast path to compare (default: the "
                             "calculator's)")
    parser.add_argument("--langevin-block", type=int, default=10,
                        help="Langevin steps per timed sample on the fast path")
    parser.add_argument("--compile", choices=("off", "on", "both"), default="off",
                        help="time our calculator with compile_model off, on, or both")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--table", type=Path, nargs="+",
                        help="instead: print Markdown tables of these result files")
    parser.add_argument("--column", default="langevin_step_ms",
                        help="timing column for --table (energy_forces_ms, langevin_step_ms)")
    args = parser.parse_args(argv)
    if args.table:
        merged = {"rows": [row for path in args.table
                           for row in json.loads(Path(path).read_text())["rows"]]}
        print(markdown_table(merged, args.column))
        return
    result = run_benchmark(model_spec=args.model, device=args.device, sizes=args.sizes,
                           policies=args.policies, backends=args.backends,
                           warmup=args.warmup, repeats=args.repeats,
                           langevin=not args.no_langevin, baselines=() if args.no_baselines else args.baselines,
                           fast_path=False if args.no_fast_path else "auto",
                           skins=args.skins, langevin_block=args.langevin_block,
                           compile_modes={"off": (False,), "on": (True,),
                                          "both": (False, True)}[args.compile])
    if args.out:
        write_json(args.out, result)


def write_json(path: Path, result: dict) -> None:
    """Write a result file (creating its folder) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    shorten_switch_interval_of_this_process()
    main()
