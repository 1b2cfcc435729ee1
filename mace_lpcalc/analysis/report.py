"""Per-run observables and their seed-averaged comparison across precision policies.

:func:`run_observables` reduces one run to final means with errors (temperature,
density, pressure, potential energy, energy drift, MSD, diffusion coefficients, wall time
and throughput) plus the curves that are plotted; :func:`summarise` averages them over
the runs (seeds) of each policy and forms differences against a reference policy, as in
Tables 4.4 and 4.5 of the thesis this package follows.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from mace_lpcalc.analysis.dynamics import diffusion_coefficient, mean_squared_displacement
from mace_lpcalc.analysis.runs import Run
from mace_lpcalc.analysis.statistics import (BlockAverage, Difference, SeedAverage, block_average,
                         difference_of_averages, seed_average)
from mace_lpcalc.analysis.structure import RadialDistribution, element_pairs, max_rdf_radius_A, radial_distribution
from mace_lpcalc.analysis.thermodynamics import energy_drift, production_start

SECONDS_PER_DAY = 86400.0
# RDFs average over at most this many frames per run: more costs time for little gain.
_MAX_RDF_FRAMES = 200


@dataclass(frozen=True)
class Estimate:
    """One run's value of an observable with its standard error.

    ``converged`` is False for a block average whose error is only a lower bound.
    """

    value: float
    stderr: float
    converged: bool = True


@dataclass
class RunObservables:
    """What one run contributes to a comparison.

    ``metrics``: ``{(name, unit): Estimate}`` in report order. ``traces``: ``{name:
    values}`` per frame over the whole run, on ``time_ps``. ``rdfs``: ``{pair:
    RadialDistribution}`` over production frames. ``msds``: ``{element: (lag_ps,
    msd_A2)}`` over production frames. ``notes``: observables that could not be formed.
    """

    run: Run
    group: str
    time_ps: np.ndarray
    production_start_ps: float
    metrics: dict[tuple[str, str], Estimate] = field(default_factory=dict)
    traces: dict[str, np.ndarray] = field(default_factory=dict)
    rdfs: dict[tuple[str, str], RadialDistribution] = field(default_factory=dict)
    msds: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Summary:
    """Seed averages per group and differences against the reference group.

    ``averages[group][(name, unit)]`` is a :class:`SeedAverage`; ``differences[group]
    [(name, unit)]`` a :class:`Difference` (``test − reference``); ``unconverged[group]``
    the metrics whose single-run blocking error is only a lower bound.
    """

    groups: list[str]
    reference: str | None
    metrics: list[tuple[str, str]]
    averages: dict[str, dict[tuple[str, str], SeedAverage]]
    differences: dict[str, dict[tuple[str, str], Difference]]
    unconverged: dict[str, set[tuple[str, str]]]


def group_label(run: Run, mixed_backends: bool) -> str:
    """The group a run is averaged in: its policy, plus the backend when backends differ."""
    return f"{run.policy}/{run.backend}" if mixed_backends else run.policy


def run_observables(run: Run, group: str, *, discard_fraction: float, msd_lag_ps: float,
                    rdf_r_max_A: float | None, rdf_bin_width_A: float = 0.05,
                    msd_segments: int = 5) -> RunObservables:
    """Reduce one run to final means with errors over its production part.

    The first ``discard_fraction`` of the frames is equilibration and left out of every
    mean. ``msd_lag_ps`` is the lag at which the MSD is reported (use one value for all
    runs of a comparison); ``rdf_r_max_A`` the RDF range (``None``: no RDFs).
    """
    start = production_start(run.n_frames, discard_fraction)
    time_ps = run.time_ps
    production = slice(start, None)
    observables = RunObservables(run=run, group=group, time_ps=time_ps,
                                 production_start_ps=float(time_ps[start]))
    metrics = observables.metrics
    series = run.series

    def block(name: str, values, unit: str, scale: float = 1.0) -> None:
        result = _block(values[production], run, name)
        metrics[(name, unit)] = Estimate(result.mean * scale, result.stderr * scale,
                                         result.converged)

    block("Temperature", series["temperature"], "K")
    for key, name, unit in (("density", "Density", "g/cm³"), ("pressure", "Pressure", "bar")):
        if key in series:
            block(name, series[key], unit)
    block("Potential energy", series["potential_energy"], "eV/atom", 1.0 / run.n_atoms)
    slope, slope_error = energy_drift(time_ps[production],
                                      series["conserved_energy"][production], run.n_atoms)
    metrics[("Energy drift", "meV/atom/ps")] = Estimate(slope, slope_error)

    positions_A = run.positions_A[production]
    production_time_ps = time_ps[production]
    masses = run.masses_amu
    symbols = np.array(run.symbols)
    for element in dict.fromkeys(run.symbols):
        indices = np.flatnonzero(symbols == element)
        lag_ps, msd_A2 = mean_squared_displacement(production_time_ps, positions_A, masses, indices)
        observables.msds[element] = (lag_ps, msd_A2)
        if msd_lag_ps > lag_ps[-1] * (1 + 1e-9):
            raise ValueError(f"{run.path}: msd_lag_ps={msd_lag_ps} exceeds the production "
                             f"length {lag_ps[-1]:.4g} ps")
        metrics[(f"MSD({element}) at {msd_lag_ps:.4g} ps", "Å²")] = Estimate(
            float(np.interp(msd_lag_ps, lag_ps, msd_A2)), np.nan)
        try:
            diffusion = diffusion_coefficient(production_time_ps, positions_A, masses, indices,
                                              n_segments=msd_segments)
        except ValueError as err:
            observables.notes.append(f"{run.path.name}: D({element}) not computed: {err}")
            continue
        metrics[(f"D({element})", "1e-5 cm²/s")] = Estimate(diffusion.diffusion_1e5_cm2_s,
                                                             diffusion.stderr_1e5_cm2_s)

    wall = series["wall_time_per_step"][production]
    wall = _block(wall[np.isfinite(wall)], run, "wall_time_per_step")
    relative_error = wall.stderr / wall.mean if wall.mean > 0 else np.nan
    steps = series["step"]
    n_steps = int(steps[-1] - steps[0])
    per_day = SECONDS_PER_DAY / wall.mean / 1e6
    metrics[("Wall time per step", "ms")] = Estimate(wall.mean * 1e3, wall.stderr * 1e3,
                                                     wall.converged)
    metrics[("Wall time", "h")] = Estimate(n_steps * wall.mean / 3600.0,
                                           n_steps * wall.stderr / 3600.0, wall.converged)
    metrics[("Throughput", "MeSteps/day")] = Estimate(per_day, per_day * relative_error,
                                                      wall.converged)

    observables.traces["Temperature (K)"] = series["temperature"]
    if "density" in series:
        observables.traces["Density (g/cm³)"] = series["density"]
    observables.traces["Potential energy (eV/atom)"] = series["potential_energy"] / run.n_atoms
    conserved = series["conserved_energy"]
    observables.traces["Conserved energy − initial (meV/atom)"] = \
        (conserved - conserved[0]) * 1000.0 / run.n_atoms

    if rdf_r_max_A is not None:
        stride = max(1, int(np.ceil((run.n_frames - start) / _MAX_RDF_FRAMES)))
        for pair in element_pairs(run.symbols):
            if pair[0] == pair[1] and np.count_nonzero(symbols == pair[0]) < 2:
                continue
            observables.rdfs[pair] = radial_distribution(
                run.trajectory, pair, r_max_A=rdf_r_max_A, bin_width_A=rdf_bin_width_A,
                frames=slice(start, None, stride))
    return observables


def common_rdf_radius_A(runs: list[Run], discard_fraction: float) -> float | None:
    """Largest RDF range valid for every run's production frames (None if any is non-periodic)."""
    if not all(run.is_periodic for run in runs):
        return None
    return min(max_rdf_radius_A(run.trajectory[production_start(run.n_frames, discard_fraction):])
               for run in runs)


def common_msd_lag_ps(runs: list[Run], discard_fraction: float) -> float:
    """Half the shortest production length: the MSD lag reported for every run."""
    durations = []
    for run in runs:
        time_ps = run.time_ps[production_start(run.n_frames, discard_fraction):]
        durations.append(time_ps[-1] - time_ps[0])
    return 0.5 * float(min(durations))


def summarise(observables: list[RunObservables], reference: str | None) -> Summary:
    """Average every metric over the runs of each group; differences against ``reference``.

    With a reference group, a "Speedup" row (reference wall time per step over the
    group's, error from the two relative errors) is added.
    """
    by_group: dict[str, list[RunObservables]] = defaultdict(list)
    for item in observables:
        by_group[item.group].append(item)
    groups = sorted(by_group, key=lambda g: (g != reference, g))
    if reference is not None and reference not in by_group:
        raise ValueError(f"reference group {reference!r} has no runs")
    metrics = list(dict.fromkeys(key for item in observables for key in item.metrics))
    averages: dict[str, dict] = {}
    unconverged: dict[str, set] = {}
    for group in groups:
        members = by_group[group]
        averages[group] = {}
        unconverged[group] = set()
        for key in metrics:
            estimates = [m.metrics[key] for m in members if key in m.metrics]
            if not estimates:
                continue
            averages[group][key] = seed_average([e.value for e in estimates],
                                                [e.stderr for e in estimates])
            if len(estimates) == 1 and not estimates[0].converged:
                unconverged[group].add(key)
    differences: dict[str, dict] = {}
    if reference is not None:
        speedup_key = (f"Speedup vs {reference}", "×")
        wall_key = ("Wall time per step", "ms")
        reference_wall = averages[reference][wall_key]
        for group in groups:
            wall = averages[group][wall_key]
            ratio = reference_wall.mean / wall.mean
            stderr = 0.0 if group == reference else ratio * np.hypot(
                reference_wall.stderr / reference_wall.mean, wall.stderr / wall.mean)
            averages[group][speedup_key] = SeedAverage(ratio, float(stderr), (ratio,), "derived")
        metrics.append(speedup_key)
        for group in groups:
            if group == reference:
                continue
            differences[group] = {
                key: difference_of_averages(averages[group][key], averages[reference][key])
                for key in metrics
                if key != speedup_key and key in averages[group] and key in averages[reference]}
    return Summary(groups, reference, metrics, averages, differences, unconverged)


def _block(values: np.ndarray, run: Run, name: str) -> BlockAverage:
    try:
        return block_average(values)
    except ValueError as err:
        raise ValueError(f"{run.path}: cannot average '{name}' over the production frames: "
                         f"{err}") from err
