"""Per-run observables and their seed-averaged comparison across precision policies.

:func:`production_start_frame` finds where a run's production part starts (pymbar's
equilibration detection, or a fixed leading fraction); :func:`run_observables` reduces
that part to final means with errors (temperature, density, pressure, potential energy,
energy drift where the protocol conserves an energy, MSD, diffusion coefficients, the
first g(r) peak, wall time and throughput) plus the curves that are plotted;
:func:`summarise` averages them over the runs (seeds) of each policy, forms differences
against a reference policy, as in Tables 4.4 and 4.5 of the thesis this package follows,
and tests each observable that has a margin for equivalence
(:mod:`mace_lpcalc.analysis.equivalence`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from mace_lpcalc.analysis.dynamics import diffusion_coefficient, mean_squared_displacement
from mace_lpcalc.analysis.equivalence import (DEFAULT_MARGINS, Equivalence, drift_ratio_test,
                                              equivalence_test)
from mace_lpcalc.analysis.runs import Run
from mace_lpcalc.analysis.statistics import (Difference, SeedAverage, TimeseriesAverage,
                                             difference_of_averages, equilibration_start,
                                             seed_average, timeseries_average)
from mace_lpcalc.analysis.structure import (RadialDistribution, element_pairs, first_peak,
                                            max_rdf_radius_A, radial_distribution)
from mace_lpcalc.analysis.thermodynamics import energy_drift, has_conserved_energy

SECONDS_PER_DAY = 86400.0
#: The group the energy-drift test compares against (a drift not above ρ × its drift).
DRIFT_REFERENCE_POLICY = "fp32"
DRIFT_METRIC = ("Energy drift", "meV/atom/ps")
# RDFs average over at most this many frames per run: more costs time for little gain.
_MAX_RDF_FRAMES = 200
# Margins given in an absolute unit: (that unit, its size in the metric's unit⁻¹).
_ABSOLUTE_MARGIN_UNITS = {"potential_energy_meV_atom": ("meV/atom", 1000.0)}


@dataclass(frozen=True)
class Estimate:
    """One run's value of an observable with its standard error (NaN: none for one run).

    ``reliable`` is False for a time average over fewer than 10 effectively independent
    samples, whose error is then likely an underestimate.
    """

    value: float
    stderr: float
    reliable: bool = True


@dataclass
class RunObservables:
    """What one run contributes to a comparison.

    ``metrics``: ``{(name, unit): Estimate}`` in report order. ``traces``: ``{name:
    values}`` per frame over the whole run, on ``time_ps``. ``rdfs``: ``{pair:
    RadialDistribution}`` over production frames. ``msds``: ``{element: (lag_ps,
    msd_A2)}`` over production frames. ``tested``: ``{(name, unit): (observable,
    margin key)}`` for the metrics that are tested for equivalence (the observable is
    their name in ``certificate.json``). ``notes``: observables that could not be formed.
    """

    run: Run
    group: str
    time_ps: np.ndarray
    production_start_ps: float
    metrics: dict[tuple[str, str], Estimate] = field(default_factory=dict)
    traces: dict[str, np.ndarray] = field(default_factory=dict)
    rdfs: dict[tuple[str, str], RadialDistribution] = field(default_factory=dict)
    msds: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    tested: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def production_ps(self) -> float:
        """Length of the production part, ps."""
        return float(self.time_ps[-1] - self.production_start_ps)


@dataclass(frozen=True)
class EquivalenceRow:
    """One group's equivalence test of one metric: ``observable`` names it in
    ``certificate.json``, ``margin_key`` is its key in the margins table."""

    observable: str
    metric: tuple[str, str]
    margin_key: str
    result: Equivalence


@dataclass
class Summary:
    """Seed averages per group, differences and equivalence tests against the reference.

    ``averages[group][(name, unit)]`` is a :class:`SeedAverage`; ``differences[group]
    [(name, unit)]`` a :class:`Difference` (``test − reference``); ``unreliable[group]``
    the metrics whose single-run error rests on too few independent samples.
    ``equivalence[group]``: the :class:`EquivalenceRow` of each tested metric, under
    ``margins``; ``aggregate_ps[group]``: the group's total production time. ``notes``:
    tests that could not be made.
    """

    groups: list[str]
    reference: str | None
    metrics: list[tuple[str, str]]
    averages: dict[str, dict[tuple[str, str], SeedAverage]]
    differences: dict[str, dict[tuple[str, str], Difference]]
    unreliable: dict[str, set[tuple[str, str]]]
    equivalence: dict[str, list[EquivalenceRow]] = field(default_factory=dict)
    aggregate_ps: dict[str, float] = field(default_factory=dict)
    margins: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MARGINS))
    notes: list[str] = field(default_factory=list)


def group_label(run: Run, mixed_backends: bool) -> str:
    """The group a run is averaged in: its policy, plus the backend when backends differ."""
    return f"{run.policy}/{run.backend}" if mixed_backends else run.policy


def production_start_frame(run: Run, discard_fraction: float | None = None) -> int:
    """Index of the first production frame of ``run``.

    With ``discard_fraction`` (in [0, 1)), the frames after that leading fraction of the
    run (⌊fraction · n_frames⌋ frames left out). Otherwise the later of
    :func:`~mace_lpcalc.analysis.statistics.equilibration_start` (pymbar's equilibration
    criterion, searched over the first half of the run) over the potential energy and,
    for a periodic run, the density (constant in NVT and NVE, where it starts at 0).
    """
    if discard_fraction is not None:
        if not 0 <= discard_fraction < 1:
            raise ValueError(f"discard_fraction must lie in [0, 1), got {discard_fraction}")
        return int(np.floor(discard_fraction * run.n_frames))
    names = ["potential_energy"] + (["density"] if "density" in run.series else [])
    try:
        return max(equilibration_start(run.series[name]) for name in names)
    except ValueError as err:
        raise ValueError(f"{run.path}: cannot detect the equilibration: {err}") from err


def run_observables(run: Run, group: str, *, start_frame: int, msd_lag_ps: float,
                    rdf_r_max_A: float | None, rdf_bin_width_A: float = 0.05,
                    msd_segments: int = 5) -> RunObservables:
    """Reduce one run to final means with errors over its production part.

    Frames before ``start_frame`` (:func:`production_start_frame`) are
    equilibration and left out of every mean. ``msd_lag_ps`` is the lag at which the MSD
    is reported (use one value for all runs of a comparison); ``rdf_r_max_A`` the RDF
    range (``None``: no RDFs). Runs of a protocol without a conserved energy (NVT) get no
    energy-drift metric, and their energy trace is the total energy.
    """
    time_ps = run.time_ps
    production = slice(start_frame, None)
    observables = RunObservables(run=run, group=group, time_ps=time_ps,
                                 production_start_ps=float(time_ps[start_frame]))
    metrics = observables.metrics
    tested = observables.tested
    series = run.series

    def average(name: str, values, unit: str, scale: float = 1.0) -> None:
        result = _average(values[production], run, name)
        metrics[(name, unit)] = Estimate(result.mean * scale, result.stderr * scale,
                                         result.reliable)

    average("Temperature", series["temperature"], "K")
    tested[("Temperature", "K")] = ("temperature", "temperature_percent")
    for key, name, unit in (("density", "Density", "g/cm³"), ("pressure", "Pressure", "bar")):
        if key in series:
            average(name, series[key], unit)
    if "density" in series and np.ptp(series["density"]) > 0:  # a fixed cell decides nothing
        tested[("Density", "g/cm³")] = ("density", "density_percent")
    average("Potential energy", series["potential_energy"], "eV/atom", 1.0 / run.n_atoms)
    tested[("Potential energy", "eV/atom")] = ("potential_energy", "potential_energy_meV_atom")
    conserved = has_conserved_energy(run.protocol)
    if conserved:
        slope, slope_error = energy_drift(time_ps[production],
                                          series["conserved_energy"][production], run.n_atoms)
        metrics[DRIFT_METRIC] = Estimate(slope, slope_error)
        tested[DRIFT_METRIC] = ("energy_drift", "energy_drift_ratio")

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
        key = (f"D({element})", "1e-5 cm²/s")
        metrics[key] = Estimate(diffusion.diffusion_1e5_cm2_s, diffusion.stderr_1e5_cm2_s)
        tested[key] = (f"diffusion_{element}", "diffusion_percent")

    wall = series["wall_time_per_step"][production]
    wall = _average(wall[np.isfinite(wall)], run, "wall_time_per_step")
    relative_error = wall.stderr / wall.mean if wall.mean > 0 else np.nan
    steps = series["step"]
    n_steps = int(steps[-1] - steps[0])
    per_day = SECONDS_PER_DAY / wall.mean / 1e6
    metrics[("Wall time per step", "ms")] = Estimate(wall.mean * 1e3, wall.stderr * 1e3,
                                                     wall.reliable)
    metrics[("Wall time", "h")] = Estimate(n_steps * wall.mean / 3600.0,
                                           n_steps * wall.stderr / 3600.0, wall.reliable)
    metrics[("Throughput", "MeSteps/day")] = Estimate(per_day, per_day * relative_error,
                                                      wall.reliable)

    observables.traces["Temperature (K)"] = series["temperature"]
    if "density" in series:
        observables.traces["Density (g/cm³)"] = series["density"]
    observables.traces["Potential energy (eV/atom)"] = series["potential_energy"] / run.n_atoms
    energy_name = "Conserved energy" if conserved else "Total energy"
    energy = series["conserved_energy" if conserved else "total_energy"]
    observables.traces[f"{energy_name} − initial (meV/atom)"] = \
        (energy - energy[0]) * 1000.0 / run.n_atoms

    if rdf_r_max_A is not None:
        stride = max(1, int(np.ceil((run.n_frames - start_frame) / _MAX_RDF_FRAMES)))
        for pair in element_pairs(run.symbols):
            if pair[0] == pair[1] and np.count_nonzero(symbols == pair[0]) < 2:
                continue
            observables.rdfs[pair] = radial_distribution(
                run.trajectory, pair, r_max_A=rdf_r_max_A, bin_width_A=rdf_bin_width_A,
                frames=slice(start_frame, None, stride))
        _add_first_peak(observables)
    return observables


def _add_first_peak(observables: RunObservables) -> None:
    """First-peak position and height of the heaviest element's like-pair RDF (O–O in
    water); one run gives no error for them."""
    pair = element_pairs(observables.run.symbols)[0]
    if pair not in observables.rdfs:
        return
    try:
        position_A, height = first_peak(observables.rdfs[pair])
    except ValueError as err:
        observables.notes.append(f"{observables.run.path.name}: no first g(r) peak: {err}")
        return
    name = f"g {pair[0]}–{pair[1]} first peak"
    observable = f"rdf_{pair[0]}{pair[1]}_first_peak"
    for key, value, suffix in (((f"{name} height", ""), height, "height"),
                               ((f"{name} position", "Å"), position_A, "position")):
        observables.metrics[key] = Estimate(value, np.nan)
        observables.tested[key] = (f"{observable}_{suffix}", f"rdf_peak_{suffix}_percent")


def common_rdf_radius_A(runs: list[Run], starts: dict) -> float | None:
    """Largest RDF range valid for every run's production frames (None if any is non-periodic).

    ``starts``: ``{run.path: first production frame}``.
    """
    if not all(run.is_periodic for run in runs):
        return None
    return min(max_rdf_radius_A(run.trajectory[starts[run.path]:]) for run in runs)


def common_msd_lag_ps(runs: list[Run], starts: dict) -> float:
    """Half the shortest production length: the MSD lag reported for every run.

    ``starts``: ``{run.path: first production frame}``.
    """
    durations = []
    for run in runs:
        time_ps = run.time_ps[starts[run.path]:]
        durations.append(time_ps[-1] - time_ps[0])
    return 0.5 * float(min(durations))


def summarise(observables: list[RunObservables], reference: str | None,
              margins: dict[str, float] | None = None) -> Summary:
    """Average every metric over the runs of each group; compare with ``reference``.

    With a reference group, a "Speedup" row (reference wall time per step over the
    group's, error from the two relative errors) is added, and every other group's
    tested metrics get an equivalence test under ``margins`` (default
    :data:`~mace_lpcalc.analysis.equivalence.DEFAULT_MARGINS`): against the reference, or
    for the energy drift against the group of policy ``fp32`` on the same backend.
    """
    margins = dict(DEFAULT_MARGINS if margins is None else margins)
    by_group: dict[str, list[RunObservables]] = defaultdict(list)
    for item in observables:
        by_group[item.group].append(item)
    groups = sorted(by_group, key=lambda g: (g != reference, g))
    if reference is not None and reference not in by_group:
        raise ValueError(f"reference group {reference!r} has no runs")
    metrics = list(dict.fromkeys(key for item in observables for key in item.metrics))
    averages: dict[str, dict] = {}
    unreliable: dict[str, set] = {}
    for group in groups:
        members = by_group[group]
        averages[group] = {}
        unreliable[group] = set()
        for key in metrics:
            estimates = [m.metrics[key] for m in members if key in m.metrics]
            if not estimates:
                continue
            averages[group][key] = seed_average([e.value for e in estimates],
                                                [e.stderr for e in estimates])
            if len(estimates) == 1 and not estimates[0].reliable:
                unreliable[group].add(key)
    summary = Summary(groups, reference, metrics, averages, {}, unreliable, margins=margins,
                      aggregate_ps={group: sum(item.production_ps for item in members)
                                    for group, members in by_group.items()})
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
            summary.differences[group] = {
                key: difference_of_averages(averages[group][key], averages[reference][key])
                for key in metrics
                if key != speedup_key and key in averages[group] and key in averages[reference]}
        _test_equivalence(summary, by_group)
    return summary


def _test_equivalence(summary: Summary, by_group: dict[str, list[RunObservables]]) -> None:
    """Fill ``summary.equivalence`` for every group but the reference."""
    tested = {key: plan for members in by_group.values() for item in members
              for key, plan in item.tested.items()}
    averages, reference = summary.averages, summary.reference
    for group in summary.groups:
        if group == reference:
            continue
        drift_reference = _drift_reference_group(group, by_group)
        rows = []
        for key in summary.metrics:
            if key not in tested or key not in averages[group]:
                continue
            observable, margin_key = tested[key]
            margin = summary.margins[margin_key]
            aggregate_ps = summary.aggregate_ps[group]
            if margin_key == "energy_drift_ratio":
                if drift_reference is None or drift_reference == group \
                        or key not in averages[drift_reference]:
                    continue
                result = drift_ratio_test(
                    averages[group][key], averages[drift_reference][key], margin, unit=key[1],
                    aggregate_ps=aggregate_ps,
                    floor=summary.margins["energy_drift_floor_meV_atom_ps"])
            elif key in averages[reference]:
                relative = margin_key not in _ABSOLUTE_MARGIN_UNITS
                unit, scale = ("%", 1.0) if relative else _ABSOLUTE_MARGIN_UNITS[margin_key]
                result = equivalence_test(averages[group][key], averages[reference][key],
                                          margin, relative=relative, unit=unit, scale=scale,
                                          aggregate_ps=aggregate_ps)
            else:
                continue
            rows.append(EquivalenceRow(observable, key, margin_key, result))
        summary.equivalence[group] = rows
        if DRIFT_METRIC in averages[group] and drift_reference is None:
            summary.notes.append(f"{group}: energy drift not tested: no "
                                 f"{DRIFT_REFERENCE_POLICY} runs on its backend to compare with")


def _drift_reference_group(group: str, by_group: dict[str, list[RunObservables]]) -> str | None:
    """The group of policy fp32 on the same backend as ``group``, if there is one."""
    backend = by_group[group][0].run.backend
    for label, members in by_group.items():
        run = members[0].run
        if run.policy == DRIFT_REFERENCE_POLICY and run.backend == backend:
            return label
    return None


def _average(values: np.ndarray, run: Run, name: str) -> TimeseriesAverage:
    try:
        return timeseries_average(values)
    except ValueError as err:
        raise ValueError(f"{run.path}: cannot average '{name}' over the production frames: "
                         f"{err}") from err
