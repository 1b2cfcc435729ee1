"""Compare MD runs across precision policies against an FP64 reference.

    python -m mace_lpcalc.analysis.compare run_a.h5 run_b.h5 ... [--reference run_fp64.h5]
        [--out-dir DIR] [--margins MARGINS.toml] [--static-deviations --model M]

Runs are grouped by their ``policy`` attribute (and backend, when backends differ) and
averaged over seeds, each over its production part (pymbar's equilibration detection,
or ``--discard-fraction``). Every group but the reference is tested for equivalence
with it, observable by observable, against the margins of
:mod:`mace_lpcalc.analysis.equivalence` (``--margins``: a TOML file whose
``[equivalence]`` table overrides some of them). Written to ``--out-dir``:
``summary.md`` (also printed), ``summary.csv`` (final means), with a reference
``differences.csv`` (each group minus the reference, with standard error, and a p-value
only where the standard error is defined) and ``certificate.json`` (the equivalence
verdicts), ``static_deviations.csv`` when asked (those four written by
:mod:`mace_lpcalc.analysis.outputs`), and the plots ``thermo.png``, ``rdf.png`` and
``msd.png``. With static deviations of NPT runs against an fp64 reference, the static
screen (:mod:`mace_lpcalc.analysis.screening`) predicts each policy's density shift from
its static pressure deviation and fp64's compressibility, in ``summary.md`` and under
``static_screen`` in ``certificate.json``.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from ase.calculators.calculator import CalculatorError

from mace_lpcalc.analysis.deviations import METRICS as DEVIATION_METRICS
from mace_lpcalc.analysis.deviations import (SIGNED_METRICS, StaticDeviations,
                                             evaluate_static_deviations)
from mace_lpcalc.analysis.equivalence import ALPHA, DEFAULT_MARGINS, load_margins
from mace_lpcalc.analysis.outputs import (write_certificate, write_deviations_csv,
                                         write_differences_csv, write_summary_csv)
from mace_lpcalc.analysis.plots import plot_msds, plot_rdfs, plot_traces
from mace_lpcalc.analysis.report import (DRIFT_REFERENCE_POLICY, Summary, common_msd_lag_ps,
                                         common_rdf_radius_A, group_label,
                                         production_start_frame, run_observables, summarise)
from mace_lpcalc.analysis.runs import Run, cut_to_time, load_run
from mace_lpcalc.analysis.screening import (ScreenResult, screen_markdown,
                                            seed_compressibility, static_screen)
from mace_lpcalc.analysis.thermodynamics import has_conserved_energy

REFERENCE_POLICY = "fp64"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mace_lpcalc.analysis.compare",
        description="Compare MD runs (HDF5 files written by mace_lpcalc) across precision "
                    "policies: seed-averaged final means, equivalence tests against FP64 "
                    "(certificate.json), RDF/MSD/trace plots, and optional static deviations.")
    parser.add_argument("runs", nargs="+", type=Path, help="run files (.h5)")
    parser.add_argument("--reference", action="append", type=Path, default=[],
                        help="reference run file (repeat for several seeds); default: the "
                             f"runs whose policy is {REFERENCE_POLICY!r}, if any")
    parser.add_argument("--out-dir", type=Path, default=Path("comparison"),
                        help="directory for tables and plots (default: ./comparison)")
    parser.add_argument("--discard-fraction", type=float, default=None,
                        help="treat this leading fraction of each run as equilibration "
                             "(default: detect each run's equilibration automatically)")
    parser.add_argument("--full-runs", action="store_true",
                        help="analyse every run to its end (default: all runs only up to the "
                             "end of the shortest, so that groups run for different lengths "
                             "see the same equilibration)")
    parser.add_argument("--margins", type=Path,
                        help="TOML file whose [equivalence] table overrides equivalence "
                             "margins (keys: " + ", ".join(DEFAULT_MARGINS) + ")")
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
    margins = load_margins(args.margins) if args.margins is not None else DEFAULT_MARGINS
    paths = list(dict.fromkeys(p.resolve() for p in [*args.runs, *args.reference]))
    runs = [load_run(path) for path in paths]
    notes = _check_comparable(runs)
    if not args.full_runs:
        runs, window_notes = _common_window(runs)
        notes += window_notes
    mixed_backends = len({run.backend for run in runs}) > 1
    groups = {run.path: group_label(run, mixed_backends) for run in runs}
    reference = _reference_group(runs, groups, {p.resolve() for p in args.reference})

    starts = {run.path: production_start_frame(run, args.discard_fraction) for run in runs}
    if args.discard_fraction is None:
        notes += [f"{run.path.name}: the equilibration found reaches the search limit, half "
                  "the run: it may not have equilibrated"
                  for run in runs if starts[run.path] >= run.n_frames // 2]
    if not has_conserved_energy(runs[0].protocol):
        notes.append(f"No energy drift for {runs[0].protocol} runs: the Langevin bath "
                     "exchanges heat with the system, so nothing is conserved (the trajectory's "
                     "conserved_energy is the plain total energy) and its slope says nothing "
                     "about the integration. Use NVE or NPT (MTK) runs to test energy "
                     "conservation.")
    msd_lag_ps = common_msd_lag_ps(runs, starts)
    rdf_r_max_A = common_rdf_radius_A(runs, starts)
    if rdf_r_max_A is None:
        notes.append("no RDFs: at least one run has no periodic cell")
    observables = [run_observables(run, groups[run.path], start_frame=starts[run.path],
                                   msd_lag_ps=msd_lag_ps, rdf_r_max_A=rdf_r_max_A,
                                   rdf_bin_width_A=args.rdf_bin_width,
                                   msd_segments=args.msd_segments)
                   for run in runs]
    for item in observables:
        notes.extend(item.notes)
    summary = summarise(observables, reference, margins)
    notes.extend(summary.notes)

    out_dir = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    write_summary_csv(summary, out_dir / "summary.csv")
    if reference is not None:
        write_differences_csv(summary, out_dir / "differences.csv")
        write_certificate(summary, out_dir / "certificate.json")
    plot_traces(observables, out_dir / "thermo.png")
    if rdf_r_max_A is not None:
        plot_rdfs(observables, out_dir / "rdf.png")
    plot_msds(observables, out_dir / "msd.png")
    markdown_path = out_dir / "summary.md"
    markdown = _markdown(runs, groups, starts, summary, {}, notes, args)
    markdown_path.write_text(markdown, encoding="utf-8")
    # Written last: a model evaluation that fails leaves the tables and plots above.
    if args.static_deviations:
        deviations = _static_deviations(runs, groups, starts, args)
        write_deviations_csv(deviations, REFERENCE_POLICY, out_dir / "static_deviations.csv")
        screen = _static_screen(runs, groups, starts, reference, summary, deviations)
        if screen:
            write_certificate(summary, out_dir / "certificate.json", screen)
        markdown = _markdown(runs, groups, starts, summary, deviations, notes, args, screen)
        markdown_path.write_text(markdown, encoding="utf-8")
    return markdown


def _common_window(runs: list[Run]) -> tuple[list[Run], list[str]]:
    """The runs cut to the shortest one's end: a system still drifting towards
    equilibrium (density after a change of model) would otherwise make a longer-run group
    differ from a shorter-run one for no reason but its length."""
    end_ps = min(float(run.time_ps[-1]) for run in runs)
    longest_ps = max(float(run.time_ps[-1]) for run in runs)
    if longest_ps - end_ps < 1e-9:
        return runs, []
    cut = [cut_to_time(run, end_ps) for run in runs]
    return cut, [f"All runs are analysed up to {end_ps:.4g} ps, the end of the shortest; "
                 f"{sum(c is not r for c, r in zip(cut, runs))} run(s) go on to up to "
                 f"{longest_ps:.4g} ps (--full-runs uses everything)"]


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


def _static_deviations(runs: list[Run], groups: dict, starts: dict,
                       args) -> dict[str, StaticDeviations]:
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
                backend=backend or "auto", compile_model=False)  # a few frames only
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
            frames = np.unique(np.linspace(starts[run.path], run.n_frames - 1,
                                           per_run).round().astype(int))
            structures.extend(run.to_atoms(int(i)) for i in frames)
        run = group_runs[0]
        results[group] = evaluate_static_deviations(
            structures[:args.max_frames], calculator(REFERENCE_POLICY, run.backend),
            calculator(run.policy, run.backend))
    return results


def _static_screen(runs: list[Run], groups: dict, starts: dict, reference: str | None,
                   summary: Summary, deviations: dict) -> dict[str, ScreenResult]:
    """The static screen when the reference group ran NPT (its volume fluctuates)."""
    reference_runs = [run for run in runs if groups[run.path] == reference]
    if not reference_runs or reference_runs[0].protocol != "npt":
        return {}
    volumes = [run.series["volume"][starts[run.path]:] for run in reference_runs]
    temperatures = [float(np.mean(run.series["temperature"][starts[run.path]:]))
                    for run in reference_runs]
    kappa = seed_compressibility(volumes, temperatures)
    return static_screen(deviations, kappa, float(np.mean(temperatures)),
                         reference_runs[0].n_atoms, summary)


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


def _markdown(runs, groups, starts, summary: Summary, deviations, notes, args,
              screen=None) -> str:
    lines = ["# MD comparison", "",
             "| Run | Group | Seed | Protocol | Frames | Length (ps) | Production from (ps) |",
             "|---|---|---|---|---|---|---|"]
    for run in runs:
        time_ps = run.time_ps
        lines.append(f"| {run.path.name} | {groups[run.path]} | {run.seed} | {run.protocol} | "
                     f"{run.n_frames} | {time_ps[-1] - time_ps[0]:.4g} | "
                     f"{time_ps[starts[run.path]] - time_ps[0]:.4g} |")
    lines += ["", "## Final means (mean ± standard error)", ""]
    header = [f"{g} (n={_n_runs(summary, g)})" for g in summary.groups]
    lines += [_row(["Metric", "Unit", *header]), _row(["---"] * (2 + len(header)))]
    for key in summary.metrics:
        cells = []
        for group in summary.groups:
            average = summary.averages[group].get(key)
            cell = "—" if average is None else format_estimate(average.mean, average.stderr)
            cells.append(cell + (" †" if key in summary.unreliable[group] else ""))
        lines.append(_row([*key, *cells]))
    if any(summary.equivalence.values()):
        lines += _equivalence_lines(summary)
    if deviations:
        lines += ["", f"## Static deviations vs {REFERENCE_POLICY} (mean / P95 over frames)", "",
                  _row(["Metric", "Unit", *deviations]), _row(["---"] * (2 + len(deviations)))]
        for _attribute, label, unit in DEVIATION_METRICS:
            cells = [_deviation_cell(s, label) for s in deviations.values()]
            if any(cell != "—" for cell in cells):
                lines.append(_row([label, unit, *cells]))
        lines.append("")
        lines.append("ME_E and ΔP are signed (policy − fp64; mean ± standard error over frames, "
                     "P95 of the magnitude); ΔP is the virial pressure, periodic frames only.")
    lines += screen_markdown(screen or {}, summary)
    lines += _sentinel_lines(runs)
    production = (f"after the first {args.discard_fraction:.0%} of its frames"
                  if args.discard_fraction is not None else
                  "where pymbar's equilibration criterion (the most effectively independent "
                  "samples after it, searched over the first half) puts it: the later of the "
                  "starts for the potential energy and, in NPT, the density")
    lines += ["", "## Notes", "",
              f"- Each run's production part starts {production}; means are over it. Errors "
              "are standard errors over seeds where a group has two or more runs; for a single "
              "run they come from the statistical inefficiency of the series (pymbar), from "
              "fits to independent trajectory segments (D), or from the regression widened by "
              "the residuals' statistical inefficiency (energy drift). The MSD and g(r) peak "
              "rows have no single-run error.",
              "- D is the Einstein coefficient, slope(MSD)/6, fitted from 10% to 50% of a "
              "segment's length. The g(r) peak is the first maximum of the heaviest element's "
              "like-pair RDF, refined to sub-bin precision."]
    if has_conserved_energy(runs[0].protocol):
        lines.append("- Energy drift is the slope of the conserved energy (the total energy in "
                     "NVE, the extended-system energy of MTK in NPT).")
    if any(summary.unreliable.values()):
        lines.append("- † fewer than 10 effectively independent samples (run short for its "
                     "correlation time): the error is likely an underestimate.")
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def _deviation_cell(deviations: StaticDeviations, label: str) -> str:
    """``mean / P95 (n=…)``, the mean with its standard error for a signed metric."""
    summary = deviations.summary()
    if label not in summary:
        return "—"
    mean, p95 = summary[label]
    if label in SIGNED_METRICS:
        mean_text = f"{mean:.3g} ± {deviations.stderrs()[label]:.2g}"
    else:
        mean_text = f"{mean:.3g}"
    return f"{mean_text} / {p95:.3g} (n={deviations.n_structures})"


def _equivalence_lines(summary: Summary) -> list[str]:
    """The equivalence table: one row per group and tested observable, then how to read it."""
    reference = summary.reference
    lines = ["", f"## Equivalence vs {reference} (two one-sided tests, α = {ALPHA})", "",
             _row(["Group", "Observable", "Unit", "Difference", "90 % CI", "Margin", "MDD",
                   "Verdict"]), _row(["---"] * 8)]
    for group, rows in summary.equivalence.items():
        for row in rows:
            result = row.result
            if row.margin_key == "energy_drift_ratio":
                margin = (f"< {result.margin:.3g} (larger of "
                          f"{summary.margins[row.margin_key] - 1:g}× {DRIFT_REFERENCE_POLICY}'s "
                          f"and {summary.margins['energy_drift_floor_meV_atom_ps']:g})")
            else:
                margin = f"±{result.margin:g}"
            low, high = result.ci90
            defined = result.is_defined
            lines.append(_row([
                group, row.metric[0], result.unit,
                f"{result.difference:+.3g}" if np.isfinite(result.difference) else "—",
                f"[{low:+.3g}, {high:+.3g}]" if defined else "—", margin,
                f"{result.minimum_detectable_difference:.2g}" if defined else "—",
                result.describe()]))
    lines += ["",
              f"Difference: group − {reference} (in % of {reference}'s mean where the margin "
              "is in %; the energy drift compares drift magnitudes with the "
              f"{DRIFT_REFERENCE_POLICY} group's, one-sided). 90 % CI: difference ± t₀.₉₅·s, s "
              "from Welch's combination of seed spreads (both groups ≥ 2 runs) or of the runs' "
              "own errors (normal quantile). Equivalent: the CI lies inside the margin; "
              "different: wholly outside it; inconclusive: neither, with the production time "
              "still needed from s ∝ 1/√T, (k − 1)·T with k = (t₀.₉₅·s / |margin − |d||)². "
              "MDD (minimum detectable difference) = t₀.₉₅·s, the smallest margin these data "
              "would call equivalent at a zero difference. No CI or p-value where s is "
              "undefined."]
    return lines


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


def _n_runs(summary: Summary, group: str) -> int:
    return max(a.n_runs for key, a in summary.averages[group].items() if a.error_kind != "derived")


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


if __name__ == "__main__":
    sys.exit(main())
