"""PNG plots of a comparison: thermodynamic traces, RDF overlays and MSDs per group.

Figures are built with ``matplotlib.figure.Figure`` (Agg canvas), never pyplot, so no
display or global backend is touched. Each group is drawn as the mean over its runs
(seeds) on a common grid; single runs are drawn thin behind it.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from mace_lpcalc.analysis.report import RunObservables


def plot_traces(observables: list[RunObservables], path) -> Path:
    """Temperature, density, potential energy and the conserved energy (for NVT, which
    conserves none, the total energy) against time; the equilibration part is shaded."""
    names = list(dict.fromkeys(name for item in observables for name in item.traces))

    def curves(item, name):
        return item.time_ps, item.traces.get(name)

    figure = _grid(names, observables, curves, "time (ps)", {})
    equilibration_ps = max(item.production_start_ps for item in observables)
    if equilibration_ps > 0:
        for axis in figure.axes:
            axis.axvspan(observables[0].time_ps[0], equilibration_ps, color="0.9", zorder=0,
                         label="_discarded")
    return _save(figure, path)


def plot_rdfs(observables: list[RunObservables], path) -> Path:
    """g(r) of every element pair, one panel per pair."""
    pairs = list(dict.fromkeys(pair for item in observables for pair in item.rdfs))
    if not pairs:
        raise ValueError("no RDFs to plot (non-periodic runs?)")

    def curves(item, pair):
        rdf = item.rdfs.get(pair)
        return (None, None) if rdf is None else (rdf.r_A, rdf.g)

    titles = {pair: f"g {pair[0]}–{pair[1]}" for pair in pairs}
    return _save(_grid(pairs, observables, curves, "r (Å)", titles), path)


def plot_msds(observables: list[RunObservables], path) -> Path:
    """Windowed MSD of each element against lag, up to half the shortest production run."""
    elements = list(dict.fromkeys(e for item in observables for e in item.msds))
    max_lag_ps = 0.5 * min(item.msds[e][0][-1] for item in observables for e in item.msds)

    def curves(item, element):
        if element not in item.msds:
            return None, None
        lag_ps, msd_A2 = item.msds[element]
        keep = lag_ps <= max_lag_ps
        return lag_ps[keep], msd_A2[keep]

    titles = {element: f"MSD {element} (Å²)" for element in elements}
    return _save(_grid(elements, observables, curves, "lag (ps)", titles), path)


def _grid(panels, observables, curves, xlabel, titles) -> Figure:
    n_columns = min(2, len(panels)) or 1
    n_rows = int(np.ceil(len(panels) / n_columns)) or 1
    figure = Figure(figsize=(5.5 * n_columns, 3.6 * n_rows), layout="constrained")
    axes = figure.subplots(n_rows, n_columns, squeeze=False).ravel()
    groups: dict[str, list[RunObservables]] = defaultdict(list)
    for item in observables:
        groups[item.group].append(item)
    for axis, panel in zip(axes, panels, strict=False):  # spare axes are hidden below
        for colour_index, (group, members) in enumerate(groups.items()):
            colour = f"C{colour_index % 10}"
            runs = [curves(item, panel) for item in members]
            runs = [(x, y) for x, y in runs if x is not None and y is not None]
            if not runs:
                continue
            for x, y in runs if len(runs) > 1 else []:
                axis.plot(x, y, color=colour, alpha=0.3, linewidth=0.6)
            x_common, y_mean = _mean_curve(runs)
            axis.plot(x_common, y_mean, color=colour, linewidth=1.4,
                      label=f"{group} (n={len(runs)})")
        axis.set_xlabel(xlabel)
        axis.set_title(titles.get(panel, str(panel)))
        axis.legend(fontsize="small")
    for axis in axes[len(panels):]:
        axis.set_visible(False)
    return figure


def _mean_curve(runs):
    """Mean of curves on the grid of the one with the shortest x range."""
    x_common = min((x for x, _ in runs), key=lambda x: x[-1] - x[0])
    return x_common, np.mean([np.interp(x_common, x, y) for x, y in runs], axis=0)


def _save(figure: Figure, path) -> Path:
    path = Path(path)
    figure.savefig(path, dpi=120)
    return path
