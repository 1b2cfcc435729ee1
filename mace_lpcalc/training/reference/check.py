"""Physical check of MACE NPT water runs against the reference engine's own NPT run.

``python -m mace_lpcalc.training.reference.check REF.h5 [RUN.h5 ...] [--out check.json]
[--discard-fraction F]``

REF.h5 comes from :mod:`mace_lpcalc.training.reference.npt` (SPC/Fw in OpenMM), the RUN files
from ``python -m mace_lpcalc.protocols.npt`` with a MACE model trained on SPC/Fw data
(several seeds and precision policies). Every run's production part starts where
:func:`~mace_lpcalc.analysis.report.production_start_frame` puts it, as in
``python -m mace_lpcalc.compare``: pymbar's equilibration criterion on the potential
energy and the density, or after a leading ``--discard-fraction`` of its frames. Then,
per run:

* mean density with its standard error from the series' statistical inefficiency
  (:func:`~mace_lpcalc.analysis.timeseries_average`);
* RDF peaks from :func:`~mace_lpcalc.analysis.radial_distribution` (0.05 Å bins): the
  first O–O peak, the intramolecular and first intermolecular O–H and H–H peaks, each
  located to sub-bin precision by :func:`~mace_lpcalc.analysis.first_peak` within its
  window, with a standard error from the spread of the peak over ``--segments``
  contiguous segments of the run.

Runs are grouped by precision policy (and backend, when several appear); per group the
seed average (:func:`~mace_lpcalc.analysis.seed_average`: spread over seeds for two or
more runs, the run's own error for one) is compared with the reference. Targets: the
density within 2 % of the reference and the first O–O peak within 0.05 Å, each tested
for equivalence (two one-sided tests at α = 0.05 with the target as margin,
:func:`~mace_lpcalc.analysis.equivalence_test`): the ``verdict`` is ``equivalent`` when
the 90 % confidence interval lies inside ±target, ``different`` when wholly outside it,
``inconclusive`` otherwise; ``met`` says whether the point estimate alone lies within it.
The other peak shifts are differences from the reference with their standard error and
the two-sided test of a zero shift (:func:`~mace_lpcalc.analysis.difference_of_averages`).

Without RUN files only the reference run is summarised (with its provenance), which is
what ``bench/results`` keeps for the reference.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from mace_lpcalc.analysis import (Equivalence, Run, difference_of_averages, equivalence_test,
                                  first_peak, load_run, max_rdf_radius_A, radial_distribution,
                                  seed_average, timeseries_average)
from mace_lpcalc.analysis.equivalence import ALPHA, json_number
from mace_lpcalc.analysis.report import group_label, production_start_frame
from mace_lpcalc.md.trajectory import read_trajectory

DENSITY_TARGET_RELATIVE = 0.02
OO_PEAK_TARGET_A = 0.05
RDF_BIN_WIDTH_A = 0.05
#: RDFs are histogrammed out to this radius (or less in small boxes); the peaks lie below.
RDF_R_MAX_A = 6.0
#: Where each RDF peak is looked for (Å): ``first_peak`` searches only the bins inside.
#: The O–H and H–H RDFs include the intramolecular pairs, whose sharp peaks (bond, H···H
#: of one molecule) come before the first intermolecular (hydrogen-bond) peaks.
PEAK_WINDOWS_A = {
    "O-O first": (("O", "O"), (2.4, 3.3)),
    "O-H intramolecular": (("O", "H"), (0.8, 1.3)),
    "O-H first intermolecular": (("O", "H"), (1.4, 2.4)),
    "H-H intramolecular": (("H", "H"), (1.3, 1.95)),
    "H-H first intermolecular": (("H", "H"), (1.95, 2.9)),
}
TARGETS = {"density_relative": DENSITY_TARGET_RELATIVE, "O-O first_A": OO_PEAK_TARGET_A}


def rdf_radius_A(run: Run, start: int) -> float:
    """RDF range for ``run`` from frame ``start``: :data:`RDF_R_MAX_A`, or less in a box
    too small for it, as a whole number of bins (so all runs share bin centres)."""
    limit = max_rdf_radius_A(run.trajectory[start:])
    return min(RDF_R_MAX_A, np.floor(limit / RDF_BIN_WIDTH_A * (1 + 1e-9)) * RDF_BIN_WIDTH_A)


def run_peaks(run: Run, start: int, n_segments: int) -> dict:
    """RDF peaks of ``run`` over frames ``start:``, each with a segment standard error.

    Returns ``{name: {"position_A", "position_stderr_A", "height", "height_stderr"}}``,
    or ``{name: {"error": message}}`` for a peak that cannot be located.
    """
    n_frames = run.n_frames - start
    if n_segments < 2 or n_frames < n_segments:
        raise ValueError(f"{run.path}: need at least 2 segments of one frame or more, got "
                         f"{n_segments} segments for {n_frames} frames")
    r_max = rdf_radius_A(run, start)
    bounds = start + np.linspace(0, n_frames, n_segments + 1).round().astype(int)
    rdfs = {}
    for pair in dict.fromkeys(pair for pair, _ in PEAK_WINDOWS_A.values()):
        whole = radial_distribution(run.trajectory, pair, r_max_A=r_max,
                                    bin_width_A=RDF_BIN_WIDTH_A, frames=slice(start, None))
        parts = [radial_distribution(run.trajectory, pair, r_max_A=r_max,
                                     bin_width_A=RDF_BIN_WIDTH_A, frames=slice(a, b))
                 for a, b in itertools.pairwise(bounds)]
        rdfs[pair] = (whole, parts)
    peaks = {}
    for name, (pair, window) in PEAK_WINDOWS_A.items():
        whole, parts = rdfs[pair]
        if window[1] > whole.r_A[-1]:
            peaks[name] = {"error": f"RDF range {whole.r_A[-1]:.2f} Å ends before the window"}
            continue
        try:
            position_A, height = first_peak(whole, window)
            positions, heights = np.array([first_peak(part, window) for part in parts]).T
        except ValueError as err:
            peaks[name] = {"error": str(err)}
            continue
        peaks[name] = {
            "position_A": position_A,
            "position_stderr_A": float(positions.std(ddof=1) / np.sqrt(n_segments)),
            "height": height,
            "height_stderr": float(heights.std(ddof=1) / np.sqrt(n_segments)),
        }
    return peaks


def throughput_ns_per_day(run: Run) -> float:
    """Simulated ns per wall-clock day, from the logged wall time per step."""
    steps = run.series["step"]
    wall = run.series["wall_time_per_step"][1:] * np.diff(steps)
    finite = np.isfinite(wall)
    if not finite.any() or wall[finite].sum() <= 0:
        return float("nan")
    simulated_ps = float(np.sum(np.diff(run.time_ps)[finite]))
    return simulated_ps / 1000.0 / float(wall[finite].sum()) * 86400.0


def run_summary(run: Run, discard_fraction: float | None, n_segments: int) -> dict:
    """Density (statistical-inefficiency error) and RDF peaks of one run over its production
    frames (:func:`~mace_lpcalc.analysis.report.production_start_frame`)."""
    if "density" not in run.series:
        raise ValueError(f"{run.path} is not periodic: it has no density")
    start = production_start_frame(run, discard_fraction)
    try:
        density = timeseries_average(run.series["density"][start:])
    except ValueError as err:
        raise ValueError(f"{run.path}: cannot average the density: {err}") from err
    time_ps = run.time_ps
    return {
        "path": str(run.path), "policy": run.policy, "backend": run.backend,
        "seed": run.seed, "protocol": run.protocol, "model_hash": run.model_hash,
        "n_frames": run.n_frames, "n_frames_used": run.n_frames - start,
        "time_used_ps": [float(time_ps[start]), float(time_ps[-1])],
        "density_g_cm3": {"mean": density.mean, "stderr": density.stderr,
                          "statistical_inefficiency": density.statistical_inefficiency,
                          "reliable": density.reliable},
        "temperature_K": float(np.mean(run.series["temperature"][start:])),
        "rdf_peaks": run_peaks(run, start, n_segments),
        "ns_per_day": throughput_ns_per_day(run),
    }


def compare_groups(reference: dict, runs: list[dict], groups: list[str]) -> dict:
    """Seed averages per group and their differences from the reference, with the
    equivalence verdicts of the targeted ones."""
    members = defaultdict(list)
    for group, summary in zip(groups, runs, strict=True):
        members[group].append(summary)
    ref_density = reference["density_g_cm3"]
    ref_density_average = seed_average([ref_density["mean"]], [ref_density["stderr"]])
    comparison = {}
    for group, items in members.items():
        production_ps = sum(end - start for start, end in (s["time_used_ps"] for s in items))
        densities = seed_average([s["density_g_cm3"]["mean"] for s in items],
                                 [s["density_g_cm3"]["stderr"] for s in items])
        # In fractions of the reference density, whose mean is taken as exact.
        density_test = equivalence_test(densities, ref_density_average,
                                        DENSITY_TARGET_RELATIVE, relative=False, unit="1",
                                        scale=1.0 / ref_density_average.mean,
                                        aggregate_ps=production_ps)
        entry = {
            "n_runs": len(items), "seeds": [s["seed"] for s in items],
            "density_g_cm3": {"mean": densities.mean, "stderr": densities.stderr,
                              "error_kind": densities.error_kind,
                              "unreliable_runs": [s["path"] for s in items
                                                  if not s["density_g_cm3"]["reliable"]]},
            "density_relative_difference": _target_verdict(density_test),
            "rdf_peaks": {},
        }
        for name in PEAK_WINDOWS_A:
            ref_peak = reference["rdf_peaks"][name]
            located = [s["rdf_peaks"][name] for s in items if "error" not in s["rdf_peaks"][name]]
            if "error" in ref_peak or len(located) < len(items):
                entry["rdf_peaks"][name] = {"error": "peak not located in the reference or "
                                                     "in some run"}
                continue
            position = seed_average([p["position_A"] for p in located],
                                    [p["position_stderr_A"] for p in located])
            height = seed_average([p["height"] for p in located],
                                  [p["height_stderr"] for p in located])
            ref_position = seed_average([ref_peak["position_A"]], [ref_peak["position_stderr_A"]])
            if name == "O-O first":
                shift = _target_verdict(equivalence_test(
                    position, ref_position, OO_PEAK_TARGET_A, relative=False, unit="Å",
                    aggregate_ps=production_ps))
            else:
                difference = difference_of_averages(position, ref_position)
                shift = {"value": difference.delta, "stderr": difference.stderr,
                         "p_value": difference.p_value}
            entry["rdf_peaks"][name] = {
                "position_A": position.mean, "position_stderr_A": position.stderr,
                "height": height.mean, "height_stderr": height.stderr,
                "height_relative_difference": height.mean / ref_peak["height"] - 1.0,
                "position_difference_A": shift,
            }
        comparison[group] = entry
    return comparison


def _target_verdict(result: Equivalence) -> dict:
    """An equivalence test against a target as JSON: ``extra_ps`` is the further production
    time the group needs to decide an inconclusive one (``null`` where undefined)."""
    low, high = result.ci90
    return {"value": result.difference, "stderr": result.stderr, "target": result.margin,
            "met": bool(abs(result.difference) <= result.margin), "verdict": result.verdict,
            "ci90": [json_number(low), json_number(high)],
            "extra_ps": json_number(result.extra_ps), "description": result.describe()}


def check(reference_path, run_paths, *, discard_fraction: float | None = None,
          n_segments: int = 5) -> dict:
    """The full comparison as a JSON-ready dict (see the module docstring).

    ``discard_fraction=None`` detects each run's production start (the module docstring).
    """
    reference_run = load_run(reference_path)
    reference = run_summary(reference_run, discard_fraction, n_segments)
    created = read_trajectory(reference_path, names=("step",)).attrs.get("created")
    reference.update(created=created, settings=reference_run.settings,
                     versions=reference_run.versions)
    production_start = ("pymbar equilibration criterion, the later start of the potential "
                        "energy and the density" if discard_fraction is None else
                        f"after the leading fraction {discard_fraction} of the frames")
    result = {
        "settings": {"discard_fraction": discard_fraction, "production_start": production_start,
                     "rdf_segments": n_segments,
                     "rdf_bin_width_A": RDF_BIN_WIDTH_A, "peak_windows_A": {
                         name: list(window) for name, (_, window) in PEAK_WINDOWS_A.items()},
                     "peak_estimator": "first local maximum in the window at least half as "
                                       "high as its highest bin, refined by the parabola in "
                                       "ln g through it and its two neighbours (Gaussian fit)",
                     "target_test": f"two one-sided tests, alpha = {ALPHA}: equivalent when "
                                    "the 90 % confidence interval lies inside +-target"},
        "targets": TARGETS,
        "reference": reference,
    }
    if run_paths:
        runs = [load_run(path) for path in run_paths]
        mixed_backends = len({run.backend for run in runs}) > 1
        summaries = [run_summary(run, discard_fraction, n_segments) for run in runs]
        groups = [group_label(run, mixed_backends) for run in runs]
        result["runs"] = summaries
        result["groups"] = compare_groups(reference, summaries, groups)
    return result


def format_table(result: dict) -> str:
    """A plain-text summary of :func:`check`'s result."""
    reference = result["reference"]
    density = reference["density_g_cm3"]
    lines = [(f"reference {reference['path']}: density {density['mean']:.4f} ± "
              f"{density['stderr']:.4f} g/cm3")]
    for name, peak in reference["rdf_peaks"].items():
        lines.append(f"  {name:26s} " + (peak["error"] if "error" in peak else
                     f"{peak['position_A']:.4f} ± {peak['position_stderr_A']:.4f} Å, "
                     f"g = {peak['height']:.3f} ± {peak['height_stderr']:.3f}"))
    for group, entry in result.get("groups", {}).items():
        density = entry["density_g_cm3"]
        relative = entry["density_relative_difference"]
        lines.append(f"{group} ({entry['n_runs']} run(s)): density {density['mean']:.4f} ± "
                     f"{density['stderr']:.4f} g/cm3, Δρ/ρ_ref = {100 * relative['value']:+.2f} ± "
                     f"{100 * relative['stderr']:.2f} % "
                     f"[target ±{100 * relative['target']:g} %: {_word(relative)}]")
        for name, peak in entry["rdf_peaks"].items():
            if "error" in peak:
                lines.append(f"  {name:26s} {peak['error']}")
                continue
            shift = peak["position_difference_A"]
            verdict = f" [target ±{shift['target']} Å: {_word(shift)}]" if "target" in shift \
                else ""
            lines.append(f"  {name:26s} {peak['position_A']:.4f} ± "
                         f"{peak['position_stderr_A']:.4f} Å, Δr = {shift['value']:+.4f} ± "
                         f"{shift['stderr']:.4f} Å, g = {peak['height']:.3f}{verdict}")
    return "\n".join(lines)


def _word(verdict: dict) -> str:
    estimate = "within" if verdict["met"] else "outside"
    return f"{verdict['description']} (90 % CI); point estimate {estimate}"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m mace_lpcalc.training.reference.check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", help="reference NPT trajectory (reference.npt)")
    parser.add_argument("runs", nargs="*", help="MACE NPT trajectories (protocols.npt)")
    parser.add_argument("--out", help="write the result as JSON here")
    parser.add_argument("--discard-fraction", type=float, default=None,
                        help="leave out this leading fraction of every run (default: detect "
                             "each run's equilibration automatically)")
    parser.add_argument("--segments", type=int, default=5,
                        help="segments for the RDF peak standard errors (default 5)")
    args = parser.parse_args(argv)
    try:
        result = check(args.reference, args.runs, discard_fraction=args.discard_fraction,
                       n_segments=args.segments)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"{parser.prog}: error: {err}") from err
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(format_table(result))
    return result


if __name__ == "__main__":
    main()
