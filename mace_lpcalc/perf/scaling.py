"""Scaling: ms per MD step and peak device memory from small water boxes to the largest that fits.

    python -m mace_lpcalc.perf.scaling run --device cuda --model off24m \\
        --policies fp32 fp32-linear-fp16 --sizes 216 1728 13824 32768 68921 110592 \\
        --unchunked-up-to 13824 --out bench/results/scaling.json
    python -m mace_lpcalc.perf.scaling table bench/results/scaling.json   # README table
    python -m mace_lpcalc.perf.scaling plot bench/results/scaling.json --out scaling.png

``run`` builds, per policy and size, a fresh calculator on the fast path (uncompiled:
compiling needs about twice the memory) with ``edge_chunk_size="auto"`` and times blocks
of ASE Langevin steps (median of synchronised blocks, after a warm-up block). Up to
``--unchunked-up-to`` molecules it also times the same box with ``edge_chunk_size=None``
in the same process, so the cost and saving of chunking are ratios from one run; above it,
``--also-chunks N`` times the box in chunks of N edges too (to compare chunk sizes), and
``--also-weights-only`` times it recomputing only the fused kernel's weights in the backward
pass instead of whole chunks (to compare the two). Sizes
grow until one does not fit (the rest of that policy is skipped). The JSON is rewritten
after every row; run again with the same ``--out`` and it measures only the rows missing
(or measured under another ``auto`` rule: each row records the rule it ran under), so a
campaign can be built over several short GPU slots.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from mace_lpcalc.fastpath.edge_chunks import AUTO_RULE

#: Row fields of the README table: (heading, key, format). The JSON's ``peak_memory_GB``
#: and ``peak_kB_per_atom`` are binary units (GiB, KiB), as torch reports memory.
TABLE_COLUMNS = (("atoms", "n_atoms", "{:,}"), ("edges", "n_edges", "{:,}"),
                 ("chunks of", "chunk_edges", "{:,}"), ("ms/step", "md_step_ms", "{:.1f}"),
                 ("µs/atom", "us_per_atom_step", "{:.2f}"), ("peak GiB", "peak_memory_GB", "{:.1f}"),
                 ("KiB/atom", "peak_kB_per_atom", "{:.0f}"))


def measure(policy: str, n_molecules: int, *, model_spec: str, device: str,
            edge_chunk_size, weights_only: bool = False) -> dict:
    """One row: a fresh calculator's Langevin steps on a fresh box (raises on OOM);
    ``weights_only`` recomputes only the weights around the fused kernel."""
    from unittest import mock

    import numpy as np
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    from mace_lpcalc.calculator import LowPrecisionMACECalculator
    from mace_lpcalc.fastpath.edge_chunks import ChunkedConvolution
    from mace_lpcalc.perf.bench import make_model, peak_memory_mb, reset_peak_memory
    from mace_lpcalc.systems import water_box
    from mace_lpcalc.timing import median_ms

    atoms = water_box(n_molecules, seed=0)
    n_atoms = len(atoms)
    reset_peak_memory(device)
    calc = LowPrecisionMACECalculator(
        models=make_model(model_spec), device=device, policy=policy, fast_path=True,
        compile_model=False, verify_fast_path=False, edge_chunk_size=edge_chunk_size)
    atoms.calc = calc
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    dynamics = Langevin(atoms, timestep=1.0 * units.fs, temperature_K=300, friction=0.01,
                        rng=np.random.default_rng(0))
    block = 20 if n_atoms < 20_000 else 4  # steps per sample: rebuilds are part of them
    # Convolutions are chunked (and choose how to recompute) at their first chunked call.
    with mock.patch.object(ChunkedConvolution, "weights_only_where_fused", weights_only):
        step_ms = median_ms(lambda: dynamics.run(block), device, warmup=1,
                            repeats=5 if n_atoms < 20_000 else 3) / block
    engine = calc.engine
    chunked = [module.recompute_weights_only for module in engine.edge_chunking.model.modules()
               if isinstance(module, ChunkedConvolution)]
    peak_mb = peak_memory_mb(device)
    row = {"policy": policy, "edge_chunk_size": edge_chunk_size, "n_atoms": n_atoms,
           "n_edges": engine.n_edges, "edge_capacity": engine.edge_capacity,
           "chunk_edges": engine.edge_chunking.last_chunk_edges, "weights_only": weights_only,
           "recomputes": (None if engine.edge_chunking.last_chunk_edges is None
                          else "weights" if all(chunked) else "whole chunks"),
           "md_step_ms": step_ms, "steps_per_sample": block,
           "us_per_atom_step": step_ms * 1e3 / n_atoms,
           "cuda_graph_replayed": engine.last_call_replayed_graph, "auto_rule": AUTO_RULE,
           "backend": calc.parameters["backend"], "fits": True}
    if peak_mb is not None:
        row.update(peak_memory_GB=peak_mb / 1024, peak_kB_per_atom=peak_mb * 1024 / n_atoms,
                   peak_bytes_per_edge=peak_mb * 2**20 / max(engine.n_edges, 1))
    return row


def run(args) -> dict:
    """Measure every (policy, size, chunking) row not already in ``--out``, which it
    rewrites after each row; after ``--max-wall-s`` it starts no new row (but always
    measures one, so every run makes progress)."""
    import time

    import torch

    from mace_lpcalc.installed import measurement_provenance
    from mace_lpcalc.perf.bench import write_json

    began, measured = time.monotonic(), False
    result = {"benchmark": "MD step time and peak memory vs system size (water)",
              "model": args.model, "device": args.device,
              **measurement_provenance(args.device),
              "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
              "command": "python -m mace_lpcalc.perf.scaling run " + " ".join(args.argv),
              "rows": []}
    if args.out and args.out.exists():  # resume: keep what an earlier run measured
        earlier = json.loads(args.out.read_text())
        if (earlier["model"], earlier["gpu"]) != (result["model"], result["gpu"]):
            raise SystemExit(f"{args.out} holds {earlier['model']} on {earlier['gpu']}; "
                             f"this run is {result['model']} on {result['gpu']}")
        result["rows"] = earlier["rows"]
    for policy in args.policies:
        for n_molecules in sorted(args.sizes):
            same_rule = [r for r in result["rows"] if r["policy"] == policy
                         and r.get("auto_rule") == AUTO_RULE and r["n_atoms"] <= 3 * n_molecules]
            if any(not r["fits"] and r["edge_chunk_size"] == "auto" and not r.get("weights_only")
                   for r in same_rule):
                break  # this box or a smaller one of this policy did not fit
            mine = [r for r in same_rule if r["n_atoms"] == 3 * n_molecules]
            unchunked = n_molecules <= args.unchunked_up_to
            variants = [("auto", False)] + ([(None, False)] if unchunked else [
                *((size, False) for size in args.also_chunks),
                *((("auto", True),) if args.also_weights_only else ())])
            for setting, weights_only in variants:
                if any((r["edge_chunk_size"], r.get("weights_only", False))
                       == (setting, weights_only) for r in mine):
                    continue
                if measured and time.monotonic() - began > args.max_wall_s:
                    return result
                measured = True
                try:
                    row = measure(policy, n_molecules, model_spec=args.model,
                                  device=args.device, edge_chunk_size=setting,
                                  weights_only=weights_only)
                except torch.cuda.OutOfMemoryError as err:
                    row = {"policy": policy, "edge_chunk_size": setting,
                           "weights_only": weights_only, "n_atoms": 3 * n_molecules,
                           "fits": False, "auto_rule": AUTO_RULE,
                           "error": str(err).splitlines()[0][:200]}
                print(json.dumps(row), flush=True)
                result["rows"].append(row)
                if args.out:
                    write_json(args.out, result)
                if not row["fits"] and (setting, weights_only) == ("auto", False):
                    break
    return result


def markdown_table(result: dict) -> str:
    """The README's table: one row per policy and size, chunked by default (``auto``);
    an unchunked twin of the same box adds its ms/step and peak as ratios; a box timed in
    chunks of a set size has a row of its own. Where a box was measured again (under a
    newer ``auto`` rule), the newest row counts."""
    newest = {(r["policy"], r["n_atoms"], r["edge_chunk_size"], r.get("weights_only", False)): r
              for r in result["rows"]}
    rows = [row for row in newest.values() if row.get("fits")]
    lines = ["| policy | " + " | ".join(heading for heading, _, _ in TABLE_COLUMNS)
             + " | unchunked: time × / memory × |",
             "|---|" + "---:|" * (len(TABLE_COLUMNS) + 1)]
    for row in (r for r in rows if r["edge_chunk_size"] is not None):
        twin = next((r for r in rows if r["edge_chunk_size"] is None
                     and (r["policy"], r["n_atoms"]) == (row["policy"], row["n_atoms"])), None)
        cells = [("—" if row.get(key) is None else form.format(row[key]))
                 for _, key, form in TABLE_COLUMNS]
        ratio = "" if twin is None else " / ".join(
            "—" if twin.get(key) is None else f"{twin[key] / row[key]:.2f}"
            for key in ("md_step_ms", "peak_memory_GB"))
        lines.append(f"| {_label(row)} | " + " | ".join(cells) + f" | {ratio} |")
    misses = [r for r in newest.values() if not r.get("fits") and r["edge_chunk_size"] == "auto"]
    for row in misses:
        lines.append(f"| {_label(row)} | {row['n_atoms']:,} | out of memory |"
                     + " |" * len(TABLE_COLUMNS))
    return "\n".join(lines)


def _label(row: dict) -> str:
    return row["policy"] + ("" if row["edge_chunk_size"] == "auto"
                            else f", chunks set to {row['edge_chunk_size']:,}") + (
        ", weights only recomputed" if row.get("weights_only") else "")


def plot(result: dict, path: Path) -> None:
    """ms per step and peak memory against atoms, log-log, per policy (hollow squares:
    unchunked; triangles: chunks of a set size; diamonds: only weights recomputed)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4))
    time_axes, memory_axes = figure.subplots(1, 2)
    rows = [row for row in result["rows"] if row.get("fits")]
    for index, policy in enumerate(dict.fromkeys(row["policy"] for row in rows)):
        colour = f"C{index}"
        set_sizes = sorted({r["edge_chunk_size"] for r in rows if r["policy"] == policy
                            and isinstance(r["edge_chunk_size"], int)})
        for setting, weights_only, style in (
                ("auto", False, dict(marker="o", linestyle="-")),
                ("auto", True, dict(marker="D", linestyle="--")),
                (None, False, dict(marker="s", linestyle="none", fillstyle="none")),
                *((size, False, dict(marker="^", linestyle=":")) for size in set_sizes)):
            mine = sorted((r for r in rows if r["policy"] == policy
                           and r["edge_chunk_size"] == setting
                           and r.get("weights_only", False) == weights_only),
                          key=lambda r: r["n_atoms"])
            if not mine:
                continue
            label = policy + (" (weights only recomputed)" if weights_only
                              else "" if setting == "auto"
                              else " (unchunked)" if setting is None
                              else f" (chunks of {setting:,})")
            atoms = [r["n_atoms"] for r in mine]
            time_axes.plot(atoms, [r["md_step_ms"] for r in mine], color=colour, label=label,
                           **style)
            measured = [r for r in mine if r.get("peak_memory_GB")]  # none on a CPU
            if measured:
                memory_axes.plot([r["n_atoms"] for r in measured],
                                 [r["peak_memory_GB"] for r in measured], color=colour,
                                 label=label, **style)
    for axes, ylabel in ((time_axes, "ms per Langevin step"), (memory_axes, "peak GPU memory, GiB")):
        axes.set(xscale="log", yscale="log" if axes.has_data() else "linear",
                 xlabel="atoms (water)", ylabel=ylabel)
        axes.grid(True, which="both", alpha=0.3)
    time_axes.legend(fontsize=8)
    figure.suptitle(f"{result['model']} on {result.get('gpu') or result['device']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    runner = commands.add_parser("run", help="measure (writes --out after every row)")
    runner.add_argument("--model", default="off24m")
    runner.add_argument("--device", default="cuda")
    runner.add_argument("--policies", nargs="+", default=["fp32", "fp32-linear-fp16"])
    runner.add_argument("--sizes", type=int, nargs="+", required=True,
                        help="water molecules per box (x3 atoms)")
    runner.add_argument("--unchunked-up-to", type=int, default=0,
                        help="also time boxes up to this many molecules unchunked")
    runner.add_argument("--also-chunks", type=int, nargs="*", default=[],
                        help="also time the larger boxes in chunks of these many edges")
    runner.add_argument("--also-weights-only", action="store_true",
                        help="also time the chunked boxes recomputing only the fused "
                             "kernel's weights")
    runner.add_argument("--out", type=Path,
                        help="JSON results; rows already in it are kept, not measured again")
    runner.add_argument("--max-wall-s", type=float, default=float("inf"),
                        help="start no new row after this many seconds, the first "
                             "excepted (resume later)")
    for name in ("table", "plot"):
        reader = commands.add_parser(name)
        reader.add_argument("result", type=Path)
        if name == "plot":
            reader.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "run":
        args.argv = argv[1:]
        run(args)
        return
    result = json.loads(args.result.read_text())
    if args.command == "table":
        print(markdown_table(result))
    else:
        plot(result, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
