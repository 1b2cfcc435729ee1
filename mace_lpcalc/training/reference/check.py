"""Physical check of MACE NPT water runs against the reference engine's own NPT run.

``python -m mace_lpcalc.training.reference.check REF.h5 [RUN.h5 ...] [--out check.json]
[--discard-fraction 0.2]``

REF.h5 comes from :mod:`mace_lpcalc.training.reference.npt` (SPC/Fw in OpenMM), the RUN files
from ``python -m mace_lpcalc.protocols.npt`` with a MACE model trained on SPC/Fw data
(several seeds and precision policies). Every run loses its first ``--discard-fraction``
of frames as equilibration; then, per run:

* mean density with its blocking standard error (:func:`~mace_lpcalc.analysis.block_average`);
* RDF peaks from :func:`~mace_lpcalc.analysis.radial_distribution` (0.05 Å bins): the
  first O–O peak, the intramolecular and first intermolecular O–H and H–H peaks, each
  located to sub-bin precision by :func:`peak_position`, with a standard error from the
  spread of the peak over ``--segments`` contiguous segments of the run.

Runs are grouped by precision policy (and backend, when several appear); per group the
seed average (:func:`~mace_lpcalc.analysis.seed_average`: spread over seeds for two or
more runs, the run's own error for one) is compared with the reference. Targets: the
density within 2 % of the reference and the first O–O peak within 0.05 Å. A target is
"met" when the point estimate lies within it, and "met at 2σ" when the estimate plus two
combined standard errors still does; both are reported, as are the raw numbers.

Without RUN files only the reference run is summarised (with its provenance), which is
what ``bench/results`` keeps for the reference.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mace_lpcalc.analysis import (Run, block_average, difference_of_averages, load_run,
                        max_rdf_radius_A, radial_distribution, seed_average)
from mace_lpcalc.analysis.report import group_label
from mace_lpcalc.analysis.thermodynamics import production_start
from mace_lpcalc.md.trajectory import read_trajectory

DENSITY_TARGET_RELATIVE = 0.02
OO_PEAK_TARGET_A = 0.05
RDF_BIN_WIDTH_A = 0.05
#: RDFs are histogrammed out to this radius (or less in small boxes); the peaks lie below.
RDF_R_MAX_A = 6.0
#: Where each RDF peak is looked for (Å): a maximum must lie strictly inside its window.
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


@dataclass(frozen=True)
class Peak:
    """A peak of g(r): ``position_A`` (Å) and ``height`` (g at the position)."""

    position_A: float
    height: float


def peak_position(r_A, g, window_A: tuple[float, float], fit_half_width_A: float = 0.1) -> Peak:
    """Sub-bin position and height of the maximum of ``g`` inside ``window_A``.

    ``r_A``: increasing bin centres (Å), shape ``(n_bins,)``; ``g``: g(r) there. The
    largest ``g`` inside the window must not sit on the window's edge (else there is no
    peak inside it: ``ValueError``). A parabola is fitted by least squares to ln g over
    the bins within ``fit_half_width_A`` of that maximum: a Gaussian fit, exact for a
    Gaussian peak wherever it falls between bin centres.
    """
    r_A, g = np.asarray(r_A, dtype=float), np.asarray(g, dtype=float)
    if r_A.ndim != 1 or r_A.shape != g.shape:
        raise ValueError(f"r_A and g must be 1-D of one shape, got {r_A.shape} and {g.shape}")
    if len(r_A) < 3 or np.any(np.diff(r_A) <= 0):
        raise ValueError("r_A must hold at least 3 increasing bin centres")
    low, high = window_A
    inside = np.flatnonzero((r_A >= low) & (r_A <= high))
    if len(inside) < 3:
        raise ValueError(f"the window {window_A} Å holds fewer than 3 bins")
    top = inside[np.argmax(g[inside])]
    if top in (inside[0], inside[-1]):
        raise ValueError(f"g(r) has no maximum inside {low}–{high} Å (largest value at the "
                         f"window edge, r = {r_A[top]:.3f} Å)")
    offsets = r_A - r_A[top]
    fitted = np.flatnonzero((np.abs(offsets) <= fit_half_width_A * (1 + 1e-9)) & (g > 0))
    if len(fitted) < 3:
        raise ValueError(f"fewer than 3 positive bins within {fit_half_width_A} Å of the "
                         f"maximum at {r_A[top]:.3f} Å")
    curvature, slope, intercept = np.polyfit(offsets[fitted], np.log(g[fitted]), 2)
    if curvature >= 0:
        raise ValueError(f"ln g(r) is not concave around {r_A[top]:.3f} Å")
    shift = -slope / (2 * curvature)
    if abs(shift) > fit_half_width_A:
        raise ValueError(f"the fitted peak lies {shift:+.3f} Å from the largest bin at "
                         f"{r_A[top]:.3f} Å, outside the fitted points")
    return Peak(float(r_A[top] + shift),
                float(np.exp(intercept - slope**2 / (4 * curvature))))


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
            peak = peak_position(whole.r_A, whole.g, window)
            segment_peaks = [peak_position(part.r_A, part.g, window) for part in parts]
        except ValueError as err:
            peaks[name] = {"error": str(err)}
            continue
        positions = np.array([p.position_A for p in segment_peaks])
        heights = np.array([p.height for p in segment_peaks])
        peaks[name] = {
            "position_A": peak.position_A,
            "position_stderr_A": float(positions.std(ddof=1) / np.sqrt(n_segments)),
            "height": peak.height,
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


def run_summary(run: Run, discard_fraction: float, n_segments: int) -> dict:
    """Density (block average) and RDF peaks of one run over its production frames."""
    if "density" not in run.series:
        raise ValueError(f"{run.path} is not periodic: it has no density")
    start = production_start(run.n_frames, discard_fraction)
    try:
        density = block_average(run.series["density"][start:])
    except ValueError as err:
        raise ValueError(f"{run.path}: cannot average the density: {err}") from err
    time_ps = run.time_ps
    return {
        "path": str(run.path), "policy": run.policy, "backend": run.backend,
        "seed": run.seed, "protocol": run.protocol, "model_hash": run.model_hash,
        "n_frames": run.n_frames, "n_frames_used": run.n_frames - start,
        "time_used_ps": [float(time_ps[start]), float(time_ps[-1])],
        "density_g_cm3": {"mean": density.mean, "stderr": density.stderr,
                          "converged": density.converged, "block_size": density.block_size},
        "temperature_K": float(np.mean(run.series["temperature"][start:])),
        "rdf_peaks": run_peaks(run, start, n_segments),
        "ns_per_day": throughput_ns_per_day(run),
    }


def compare_groups(reference: dict, runs: list[dict], groups: list[str]) -> dict:
    """Seed averages per group and their differences from the reference, with verdicts."""
    members = defaultdict(list)
    for group, summary in zip(groups, runs, strict=True):
        members[group].append(summary)
    ref_density = reference["density_g_cm3"]
    ref_density_average = seed_average([ref_density["mean"]], [ref_density["stderr"]])
    comparison = {}
    for group, items in members.items():
        densities = seed_average([s["density_g_cm3"]["mean"] for s in items],
                                 [s["density_g_cm3"]["stderr"] for s in items])
        difference = difference_of_averages(densities, ref_density_average)
        relative = difference.delta / ref_density_average.mean
        relative_stderr = difference.stderr / ref_density_average.mean
        entry = {
            "n_runs": len(items), "seeds": [s["seed"] for s in items],
            "density_g_cm3": {"mean": densities.mean, "stderr": densities.stderr,
                              "error_kind": densities.error_kind,
                              "unconverged_runs": [s["path"] for s in items
                                                   if not s["density_g_cm3"]["converged"]]},
            "density_relative_difference": _verdict(relative, relative_stderr,
                                                    DENSITY_TARGET_RELATIVE,
                                                    difference.p_value),
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
            shift = difference_of_averages(position, seed_average(
                [ref_peak["position_A"]], [ref_peak["position_stderr_A"]]))
            target = OO_PEAK_TARGET_A if name == "O-O first" else None
            entry["rdf_peaks"][name] = {
                "position_A": position.mean, "position_stderr_A": position.stderr,
                "height": height.mean, "height_stderr": height.stderr,
                "height_relative_difference": height.mean / ref_peak["height"] - 1.0,
                "position_difference_A": _verdict(shift.delta, shift.stderr, target,
                                                  shift.p_value),
            }
        comparison[group] = entry
    return comparison


def _verdict(value: float, stderr: float, target: float | None, p_value: float) -> dict:
    verdict = {"value": float(value), "stderr": float(stderr), "p_value": float(p_value)}
    if target is not None:
        verdict.update(target=target, met=bool(abs(value) <= target),
                       met_at_2_sigma=bool(abs(value) + 2 * stderr <= target))
    return verdict


def check(reference_path, run_paths, *, discard_fraction: float = 0.2,
          n_segments: int = 5) -> dict:
    """The full comparison as a JSON-ready dict (see the module docstring)."""
    reference_run = load_run(reference_path)
    reference = run_summary(reference_run, discard_fraction, n_segments)
    created = read_trajectory(reference_path, names=("step",)).attrs.get("created")
    reference.update(created=created, settings=reference_run.settings,
                     versions=reference_run.versions)
    result = {
        "settings": {"discard_fraction": discard_fraction, "rdf_segments": n_segments,
                     "rdf_bin_width_A": RDF_BIN_WIDTH_A, "peak_windows_A": {
                         name: list(window) for name, (_, window) in PEAK_WINDOWS_A.items()},
                     "peak_estimator": "least-squares parabola in ln g over bins within "
                                       "0.1 A of the largest bin (Gaussian fit)"},
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
                     f"[target ±2 %: {_word(relative)}]")
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
    if verdict["met_at_2_sigma"]:
        return "PASS (also at 2σ)"
    return "PASS (not at 2σ)" if verdict["met"] else "FAIL"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m mace_lpcalc.training.reference.check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", help="reference NPT trajectory (reference.npt)")
    parser.add_argument("runs", nargs="*", help="MACE NPT trajectories (protocols.npt)")
    parser.add_argument("--out", help="write the result as JSON here")
    parser.add_argument("--discard-fraction", type=float, default=0.2,
                        help="leading fraction of every run left out (default 0.2)")
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
