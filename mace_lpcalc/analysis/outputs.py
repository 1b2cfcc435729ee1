"""The comparison's machine-readable files: ``summary.csv``, ``differences.csv``,
``static_deviations.csv`` and ``certificate.json``.

Numbers are written with ``repr`` so that a reader gets back the exact floats; the
certificate writes undefined numbers as ``null`` (:func:`json_number`), so it stays
strict JSON.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from mace_lpcalc.analysis.deviations import METRICS as DEVIATION_METRICS
from mace_lpcalc.analysis.deviations import StaticDeviations
from mace_lpcalc.analysis.equivalence import ALPHA, json_number
from mace_lpcalc.analysis.report import Summary
from mace_lpcalc.analysis.screening import ScreenResult


def certificate(summary: Summary, static_screen: dict[str, ScreenResult] | None = None) -> dict:
    """The equivalence verdicts as written to ``certificate.json``.

    ``{"reference", "alpha", "margins", "units": {observable: unit}, "policies": {group:
    {observable: {"difference", "ci90_low", "ci90_high", "margin", "verdict",
    "aggregate_ps", "n_replicas"}}}}``: ``verdict`` is ``equivalent``, ``different``,
    ``inconclusive`` or ``undefined``; ``aggregate_ps`` the group's total production time
    over its ``n_replicas`` runs; undefined numbers are ``null``. A group in
    ``static_screen`` also gets ``"static_screen"``: the prediction from static deviations
    (:meth:`~mace_lpcalc.analysis.screening.ScreenResult.as_json`).
    """
    policies = {}
    units = {}
    for group, rows in summary.equivalence.items():
        policies[group] = {}
        for row in rows:
            result = row.result
            low, high = result.ci90
            units[row.observable] = result.unit
            policies[group][row.observable] = {
                "difference": json_number(result.difference), "ci90_low": json_number(low),
                "ci90_high": json_number(high), "margin": json_number(result.margin),
                "verdict": result.verdict, "aggregate_ps": json_number(result.aggregate_ps),
                "n_replicas": result.n_replicas}
    for group, screen in (static_screen or {}).items():
        policies.setdefault(group, {})["static_screen"] = screen.as_json()
    return {"reference": summary.reference, "alpha": ALPHA, "margins": summary.margins,
            "units": units, "policies": policies}


def write_certificate(summary: Summary, path: Path,
                      static_screen: dict[str, ScreenResult] | None = None) -> None:
    """Write :func:`certificate` as JSON to ``path``."""
    path.write_text(json.dumps(certificate(summary, static_screen), indent=2,
                               allow_nan=False) + "\n", encoding="utf-8")


def write_summary_csv(summary: Summary, path: Path) -> None:
    """One row per metric and group: the seed average, its error and whether it is reliable."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["metric", "unit", "group", "n_runs", "mean", "stderr", "error_kind",
                         "reliable"])
        for key in summary.metrics:
            for group in summary.groups:
                average = summary.averages[group].get(key)
                if average is not None:
                    writer.writerow([*key, group, average.n_runs, _number(average.mean),
                                     _number(average.stderr), average.error_kind,
                                     key not in summary.unreliable[group]])


def write_differences_csv(summary: Summary, path: Path) -> None:
    """One row per metric and group: the difference from the reference group and its test
    (statistic and p-value left empty where the standard error is undefined)."""
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
                defined = bool(np.isfinite(difference.stderr))
                relative = (100 * difference.delta / abs(reference_mean) if reference_mean
                            else np.nan)
                writer.writerow([*key, group, summary.reference, _number(difference.delta),
                                 _number(difference.stderr), _number(relative), difference.test,
                                 _number(difference.statistic) if defined else "",
                                 _number(difference.dof),
                                 _number(difference.p_value) if defined else ""])


def write_deviations_csv(deviations: dict[str, StaticDeviations], reference_policy: str,
                         path: Path) -> None:
    """One row per group and deviation metric: mean, its standard error over structures
    and the 95th percentile (of the magnitude for a signed metric) over the structures
    re-evaluated under ``reference_policy`` and the group's own policy."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["group", "reference_policy", "metric", "unit", "mean", "p95",
                         "n_structures", "stderr"])
        for group, result in deviations.items():
            summary, stderrs = result.summary(), result.stderrs()
            for _attribute, label, unit in DEVIATION_METRICS:
                if label not in summary:
                    continue
                mean, p95 = summary[label]
                writer.writerow([group, reference_policy, label, unit, _number(mean),
                                 _number(p95), result.n_structures, _number(stderrs[label])])


def _number(value) -> str:
    return repr(float(value))
