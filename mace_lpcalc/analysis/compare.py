"""Compare MD runs across precision policies against an FP64 reference.

    python -m mace_lpcalc.analysis.compare run_a.h5 run_b.h5 ... [--reference run_fp64.h5]
        [--out-dir DIR] [--static-deviations --model M]

Runs are grouped by their ``policy`` attribute (and backend, when backends differ) and
averaged over seeds. Written to ``--out-dir``: ``summary.md`` (also printed),
``summary.csv`` (final means), ``differences.csv`` (each group minus the reference, with
standard error and p-value), ``static_deviations.csv`` when asked, and the plots
``thermo.png``, ``rdf.png`` and ``msd.png``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from ase.calculators.calculator import CalculatorError

from mace_lpcalc.analysis.deviations import METRICS as DEVIATION_METRICS
from mace_lpcalc.analysis.deviations import StaticDeviations, evaluate_static_deviations
from mace_lpcalc.analysis.plots import plot_msds, plot_rdfs, plot_traces
from mace_lpcalc.analysis.report import (Summary, common_msd_lag_ps, common_rdf_radius_A,
                              group_label, run_observables, summarise)
from mace_lpcalc.analysis.runs import Run, load_run
from mace_lpcalc.analysis.thermodynamics import production_start

REFERENCE_POLICY = "fp64"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mace_lpcalc.analysis.compare",
        description="Compare MD runs (HDF5 files written by mace_lpcalc) across precision "
                    "policies: seed-averaged final means, differences against FP64 with "
                    "significance, RDF/MSD/trace plots, and optional static deviations.")
    parser.add_argument("runs", nargs="+", type=Path, help="run files (.h5)")
    parser.add_argument("--reference", action="append", type=Path, default=[],
                        help="reference run file (repeat for several seeds); default: the "
                             f"runs whose policy is {REFERENCE_POLICY!r}, if any")
    parser.add_argument("--out-dir", type=Path, default=Path("comparison"),
                        help="directory for tables and plots (default: ./comparison)")
    parser.add_argument("--discard-fraction", type=float, default=0.2,
                        help="leading fraction of each run treated as equilibration (default 0.2)")
    parser.add_argument("--rdf-bin-width", type=float, default=0.05, help="RDF bin width, Å")
    parser.add_argument("--msd-segments", type=int, default=5,
                        help="segments for the diffusion-coefficient error (default 5)")
    parser.add_argument("--static-deviations", action="store_true",
                        help="re-evaluate saved frames under FP64 and each run's policy")
    parser.add_argument("--model", type=Path, help="MACE model file for --static-deviations")
    parser.add_argument("--device", default="cpu", help="device for --static-deviations")
    parser.add_argument("--max-frames", type=int, default=10,
                        help="frames per policy for --static-deviations (default 10)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        markdown = compare(args)
    except (OSError, ValueError, CalculatorError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(markdown)
    return 0


def compare(args: argparse.Namespace) -> str:
    """Run the whole comparison; returns the Markdown report (also written to disk)."""
    if args.static_deviations and args.max_frames < 1:
        raise ValueError(f"--max-frames must be positive, got {args.max_frames}")
    paths = list(dict.fromkeys(p.resolve() for p in [*args.runs, *args.reference]))
    runs = [load_run(path) for path in paths]
    notes = _check_comparable(runs)
    mixed_backends = len({run.backend for run in runs}) > 1
    groups = {run.path: group_label(run, mixed_backends) for run in runs}
    reference = _reference_group(runs, groups, {p.resolve() for p in args.reference})

    msd_lag_ps = common_msd_lag_ps(runs, args.discard_fraction)
    rdf_r_max_A = common_rdf_radius_A(runs, args.discard_fraction)
    if rdf_r_max_A is None:
        notes.append("no RDFs: at least one run has no periodic cell")
    observables = [run_observables(run, groups[run.path], discard_fraction=args.discard_fraction,
                                   msd_lag_ps=msd_lag_ps, rdf_r_max_A=rdf_r_max_A,
                                   rdf_bin_width_A=args.rdf_bin_width,
                                   msd_segments=args.msd_segments)
                   for run in runs]
    for item in observables:
        notes.extend(item.notes)
    summary = summarise(observables, reference)

    out_dir = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_summary_csv(summary, out_dir / "summary.csv")
    if reference is not None:
        _write_differences_csv(summary, out_dir / "differences.csv")
    plot_traces(observables, out_dir / "thermo.png")
    if rdf_r_max_A is not None:
        plot_rdfs(observables, out_dir / "rdf.png")
    plot_msds(observables, out_dir / "msd.png")
    markdown_path = out_dir / "summary.md"
    markdown = _markdown(runs, groups, summary, {}, notes, args)
    markdown_path.write_text(markdown, encoding="utf-8")
    # Written last: a model evaluation that fails leaves the tables and plots above.
    if args.static_deviations:
        deviations = _static_deviations(runs, groups, args)
        _write_deviations_csv(deviations, out_dir / "static_deviations.csv")
        markdown = _markdown(runs, groups, summary, deviations, notes, args)
        markdown_path.write_text(markdown, encoding="utf-8")
    return markdown


def _check_comparable(runs: list[Run]) -> list[str]:
    first = runs[0]
    for run in runs[1:]:
        for what, a, b in (("atoms", first.n_atoms, run.n_atoms),
                           ("protocol", first.protocol, run.protocol),
                           ("elements", first.symbols, run.symbols)):
            if a != b:
                raise ValueError(f"runs are not comparable: {first.path.name} and "
                                 f"{run.path.name} differ in {what}")
    hashes = {run.model_hash for run in runs}
    if len(hashes) > 1:
        message = f"runs come from {len(hashes)} different models (model_hash differs)"
        print(f"warning: {message}", file=sys.stderr)
        return [message]
    return []


def _reference_group(runs: list[Run], groups: dict, reference_paths: set) -> str | None:
    if reference_paths:
        labels = {groups[run.path] for run in runs if run.path in reference_paths}
        if len(labels) != 1:
            raise ValueError(f"--reference files must share one policy, got {sorted(labels)}")
        return labels.pop()
    labels = {groups[run.path] for run in runs if run.policy == REFERENCE_POLICY}
    if len(labels) > 1:
        raise ValueError(f"several {REFERENCE_POLICY} groups {sorted(labels)}: choose one "
                         "with --reference")
    return labels.pop() if labels else None


def _static_deviations(runs: list[Run], groups: dict, args) -> dict[str, StaticDeviations]:
    """Re-evaluate production frames of each non-FP64 group under FP64 and its own policy."""
    # Imported here: comparing trajectories alone must not load torch and mace.
    from mace_lpcalc.calculator import LowPrecisionMACECalculator
    from mace_lpcalc.models import default_model_path

    model_path = args.model
    if model_path is None:
        model_path = default_model_path()
        if model_path is None:
            raise ValueError("--static-deviations needs --model (no default model found)")
    if not Path(model_path).is_file():
        raise FileNotFoundError(f"model file not found: {model_path}")
    calculators = {}

    def calculator(policy: str, backend: str):
        key = (policy, backend)
        if key not in calculators:
            calculators[key] = LowPrecisionMACECalculator(
                model_paths=str(model_path), device=args.device, policy=policy,
                backend=backend or "auto")
        return calculators[key]

    members: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        if run.policy != REFERENCE_POLICY:
            members[groups[run.path]].append(run)
    results = {}
    for group, group_runs in members.items():
        per_run = int(np.ceil(args.max_frames / len(group_runs)))
        structures = []
        for run in group_runs:
            start = production_start(run.n_frames, args.discard_fraction)
            frames = np.unique(np.linspace(start, run.n_frames - 1, per_run).round().astype(int))
            structures.extend(run.to_atoms(int(i)) for i in frames)
        run = group_runs[0]
        results[group] = evaluate_static_deviations(
            structures[:args.max_frames], calculator(REFERENCE_POLICY, run.backend),
            calculator(run.policy, run.backend))
    return results


def format_estimate(mean: float, stderr: float) -> str:
    """``mean ± stderr`` with the error to two significant digits and the mean to match."""
    if not np.isfinite(mean):
        return "n/a"
    if not np.isfinite(stderr) or stderr <= 0:
        return f"{mean:.6g}"
    decimals = 1 - int(np.floor(np.log10(stderr)))
    if decimals > 8 or decimals < -6:
        return f"{mean:.4e} ± {stderr:.2e}"
    decimals = max(decimals, 0)
    return f"{mean:.{decimals}f} ± {stderr:.{decimals}f}"


def _markdown(runs, groups, summary: Summary, deviations, notes, args) -> str:
    lines = ["# MD comparison", "",
             "| Run | Group | Seed | Protocol | Frames | Length (ps) |",
             "|---|---|---|---|---|---|"]
    for run in runs:
        time_ps = run.time_ps
        lines.append(f"| {run.path.name} | {groups[run.path]} | {run.seed} | {run.protocol} | "
                     f"{run.n_frames} | {time_ps[-1] - time_ps[0]:.4g} |")
    lines += ["", "## Final means (mean ± standard error)", ""]
    header = [f"{g} (n={_n_runs(summary, g)})" for g in summary.groups]
    lines += [_row(["Metric", "Unit", *header]), _row(["---"] * (2 + len(header)))]
    for key in summary.metrics:
        cells = []
        for group in summary.groups:
            average = summary.averages[group].get(key)
            cell = "—" if average is None else format_estimate(average.mean, average.stderr)
            cells.append(cell + (" †" if key in summary.unconverged[group] else ""))
        lines.append(_row([*key, *cells]))
    if summary.reference is not None and summary.differences:
        compared = list(summary.differences)
        lines += ["", f"## Differences vs {summary.reference} (Δ ± standard error, "
                      "relative Δ, two-sided p)", "",
                  _row(["Metric", "Unit", *compared]), _row(["---"] * (2 + len(compared)))]
        for key in summary.metrics:
            if not any(key in summary.differences[g] for g in compared):
                continue
            reference_mean = summary.averages[summary.reference][key].mean
            cells = []
            for group in compared:
                difference = summary.differences[group].get(key)
                cells.append("—" if difference is None
                             else _difference_cell(difference, reference_mean))
            lines.append(_row([*key, *cells]))
    if deviations:
        lines += ["", f"## Static deviations vs {REFERENCE_POLICY} (mean / P95 over frames)", "",
                  _row(["Metric", "Unit", *deviations]), _row(["---"] * (2 + len(deviations)))]
        for _attribute, label, unit in DEVIATION_METRICS:
            cells = [f"{s.summary()[label][0]:.3g} / {s.summary()[label][1]:.3g} "
                     f"(n={s.n_structures})" for s in deviations.values()]
            lines.append(_row([label, unit, *cells]))
    lines += _sentinel_lines(runs)
    lines += ["", "## Notes", "",
              f"- Means are over the frames after the first {args.discard_fraction:.0%} of each "
              "run. Errors are standard errors over seeds where a group has two or more runs; "
              "for a single run they come from blocking (Flyvbjerg–Petersen), from fits to "
              "independent trajectory segments (D), or from the regression (energy drift).",
              "- D is the Einstein coefficient, slope(MSD)/6, fitted from 10% to 50% of a "
              "segment's length; the MSD row has no single-run error.",
              "- Energy drift is the slope of the conserved energy (the total energy in NVE).",
              "- p: Welch's t over seeds when both groups have two or more runs, otherwise a "
              "z test; * marks p < 0.05. Wall time and throughput differences are costs, "
              "not errors."]
    if any(summary.unconverged.values()):
        lines.append("- † blocking did not converge (run too short for its correlation "
                     "time): the error is a lower bound.")
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def _sentinel_lines(runs) -> list[str]:
    """The live fp64 sentinel's checks of each run that has them: the largest deviations."""
    checked = [run for run in runs if len(run.sentinel.get("step", ()))]
    if not checked:
        return []
    lines = ["", "## Live fp64 sentinel (largest deviation over the run's checks)", "",
             _row(["Run", "Policy", "Checks", "max ‖ΔF‖ (eV/Å)", "force RMS (eV/Å)",
                   "ΔE per atom (eV)", "Fallback"]), _row(["---"] * 7)]
    for run in checked:
        fallback = run.sentinel_fallback
        lines.append(_row([run.path.name, run.policy, str(len(run.sentinel["step"])),
                           f"{np.max(run.sentinel['force_max']):.3g}",
                           f"{np.max(run.sentinel['force_rms']):.3g}",
                           f"{np.max(run.sentinel['energy_per_atom']):.3g}",
                           f"step {fallback['step']}: {fallback['from']} → {fallback['to']}"
                           if fallback else "—"]))
    return lines


def _difference_cell(difference, reference_mean: float) -> str:
    text = format_estimate(difference.delta, difference.stderr)
    if not text.startswith("-") and text != "n/a":
        text = "+" + text
    relative = (np.format_float_positional(100 * difference.delta / abs(reference_mean),
                                           precision=2, fractional=False, sign=True,
                                           trim="-") + "%"
                if reference_mean else "n/a")
    if np.isfinite(difference.p_value):
        p_text = "p<0.001" if difference.p_value < 0.001 else f"p={difference.p_value:.2g}"
        p_text += " *" if difference.is_significant() else ""
    else:
        p_text = "p n/a"
    return f"{text} ({relative}, {p_text})"


def _n_runs(summary: Summary, group: str) -> int:
    return max(a.n_runs for key, a in summary.averages[group].items() if a.error_kind != "derived")


def _number(value) -> str:
    return repr(float(value))


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _write_summary_csv(summary: Summary, path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["metric", "unit", "group", "n_runs", "mean", "stderr", "error_kind",
                         "converged"])
        for key in summary.metrics:
            for group in summary.groups:
                average = summary.averages[group].get(key)
                if average is not None:
                    writer.writerow([*key, group, average.n_runs, _number(average.mean),
                                     _number(average.stderr), average.error_kind,
                                     key not in summary.unconverged[group]])


def _write_differences_csv(summary: Summary, path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["metric", "unit", "group", "reference", "delta", "stderr",
                         "relative_percent", "test", "statistic", "dof", "p_value"])
        for key in summary.metrics:
            for group, differences in summary.differences.items():
                difference = differences.get(key)
                if difference is None:
                    continue
                reference_mean = summary.averages[summary.reference][key].mean
                relative = (100 * difference.delta / abs(reference_mean) if reference_mean
                            else np.nan)
                writer.writerow([*key, group, summary.reference, _number(difference.delta),
                                 _number(difference.stderr), _number(relative), difference.test,
                                 _number(difference.statistic), _number(difference.dof),
                                 _number(difference.p_value)])


def _write_deviations_csv(deviations: dict[str, StaticDeviations], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["group", "reference_policy", "metric", "unit", "mean", "p95",
                         "n_structures"])
        for group, result in deviations.items():
            for _attribute, label, unit in DEVIATION_METRICS:
                mean, p95 = result.summary()[label]
                writer.writerow([group, REFERENCE_POLICY, label, unit, _number(mean), _number(p95),
                                 result.n_structures])


if __name__ == "__main__":
    sys.exit(main())
