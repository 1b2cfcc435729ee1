"""Observables against analytic cases: RDFs, MSD/diffusion, drift, static deviations,
statistical inefficiency, equilibration detection and equivalence tests."""

import subprocess
import sys

import mdtraj
import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.mixing import LinearCombinationCalculator
from scipy import stats
from scipy.signal import lfilter

from mace_lpcalc.analysis import (DEFAULT_MARGINS, RadialDistribution, SeedAverage,
                                  coordination_number, diffusion_coefficient,
                                  drift_ratio_test, element_pairs, energy_drift,
                                  equilibration_start, equivalence_test,
                                  evaluate_static_deviations, first_peak, load_margins,
                                  max_rdf_radius_A, mean_squared_displacement,
                                  radial_distribution, seed_average, static_deviations,
                                  timeseries_average, welch_difference, z_difference)
from mace_lpcalc.analysis.statistics import difference_of_averages
from mace_lpcalc.analysis.thermodynamics import PROTOCOLS_WITHOUT_CONSERVED_ENERGY


def make_trajectory(positions_A, symbols, box_A):
    """An MDTraj trajectory (cubic box) from Å positions of shape (n_frames, n_atoms, 3)."""
    topology = mdtraj.Topology()
    chain = topology.add_chain()
    for symbol in symbols:
        topology.add_atom(symbol, mdtraj.element.get_by_symbol(symbol),
                          topology.add_residue("X", chain))
    n_frames = len(positions_A)
    return mdtraj.Trajectory(np.asarray(positions_A) / 10.0, topology,
                             unitcell_lengths=np.full((n_frames, 3), box_A / 10.0),
                             unitcell_angles=np.full((n_frames, 3), 90.0))


def lattice_sites(n_cells, spacing_A):
    grid = np.arange(n_cells) * spacing_A
    return np.stack(np.meshgrid(grid, grid, grid, indexing="ij"), -1).reshape(-1, 3)


# --- RDF --------------------------------------------------------------------------------

def test_ideal_gas_rdf_is_one_within_counting_noise():
    rng = np.random.default_rng(0)
    n_atoms, n_frames, box = 400, 20, 20.0
    traj = make_trajectory(rng.uniform(0, box, (n_frames, n_atoms, 3)), ["Ar"] * n_atoms, box)
    rdf = radial_distribution(traj, ("Ar", "Ar"), r_max_A=10.0, bin_width_A=0.5)
    # Each pair falls in a shell with probability V_shell/V independently, so the count
    # in a bin is binomial with mean μ = n_pairs·n_frames·V_shell/V and relative
    # standard deviation ≈ 1/√μ; allow 4.5σ per bin (20 bins).
    edges = np.arange(0, 10.5, 0.5)
    expected_counts = (n_atoms * (n_atoms - 1) / 2 * n_frames
                       * 4 / 3 * np.pi * np.diff(edges**3) / box**3)
    assert rdf.r_A == pytest.approx(edges[:-1] + 0.25)
    assert np.all(np.abs(rdf.g - 1) < 4.5 / np.sqrt(expected_counts))
    # Pooled over all bins the noise is far smaller.
    pooled = np.sum(rdf.g * expected_counts) / expected_counts.sum()
    assert abs(pooled - 1) < 4 / np.sqrt(expected_counts.sum())


def test_simple_cubic_rdf_peaks_at_lattice_constant_with_six_neighbours():
    rng = np.random.default_rng(1)
    a, n = 3.0, 6
    sites = lattice_sites(n, a)
    frames = sites + rng.normal(0, 0.05, (4, len(sites), 3))
    rdf = radial_distribution(make_trajectory(frames, ["Po"] * len(sites), n * a), ("Po", "Po"),
                              bin_width_A=0.02)
    assert rdf.r_A[-1] < max_rdf_radius_A(make_trajectory(frames, ["Po"] * len(sites), n * a))
    # The first peak: the maximum of the first shell of non-zero g.
    first_shell = rdf.r_A < 1.2 * a
    assert np.all(rdf.g[rdf.r_A < 0.8 * a] == 0)
    peak = rdf.r_A[first_shell][np.argmax(rdf.g[first_shell])]
    assert peak == pytest.approx(a, abs=0.03)
    # First minimum after the first peak (g = 0 in the gap before √2·a).
    first_minimum = rdf.r_A[np.argmax(rdf.r_A > peak) + np.argmin(rdf.g[rdf.r_A > peak])]
    assert a < first_minimum < np.sqrt(2) * a
    assert coordination_number(rdf, first_minimum) == pytest.approx(6.0, rel=1e-9)
    # Up to the second shell (√2·a, 12 atoms) it counts 18.
    assert coordination_number(rdf, 0.5 * (np.sqrt(2) + np.sqrt(3)) * a) == \
        pytest.approx(18.0, rel=1e-9)


def test_partial_rdf_of_cesium_chloride_structure():
    """Cs on a simple cubic lattice, Cl at the body centres: Cs–Cl 8 at a√3/2, Cs–Cs 6 at a."""
    a, n = 4.0, 5
    cs = lattice_sites(n, a)
    positions = np.concatenate([cs, cs + a / 2])[None]
    symbols = ["Cs"] * len(cs) + ["Cl"] * len(cs)
    traj = make_trajectory(positions, symbols, n * a)
    cs_cl = radial_distribution(traj, ("Cs", "Cl"), bin_width_A=0.01)
    cs_cs = radial_distribution(traj, ("Cs", "Cs"), bin_width_A=0.01)
    assert cs_cl.r_A[np.argmax(cs_cl.g)] == pytest.approx(a * np.sqrt(3) / 2, abs=0.01)
    assert coordination_number(cs_cl, 3.8) == pytest.approx(8.0, rel=1e-9)
    assert cs_cs.r_A[np.argmax(cs_cs.g > 0)] == pytest.approx(a, abs=0.01)
    assert coordination_number(cs_cs, 5.0) == pytest.approx(6.0, rel=1e-9)
    assert cs_cl.partner_density_per_A3 == pytest.approx(len(cs) / (n * a) ** 3)


def test_rdf_of_hard_spheres_is_zero_inside_contact_and_tends_to_one():
    rng = np.random.default_rng(2)
    box, diameter, n_atoms = 20.0, 2.0, 300
    frames = []
    for _ in range(10):  # random sequential addition: non-overlapping spheres
        placed = np.empty((0, 3))
        while len(placed) < n_atoms:
            trial = rng.uniform(0, box, 3)
            delta = placed - trial
            delta -= box * np.round(delta / box)
            if len(placed) == 0 or np.min(np.einsum("ij,ij->i", delta, delta)) >= diameter**2:
                placed = np.vstack([placed, trial])
        frames.append(placed)
    rdf = radial_distribution(make_trajectory(np.array(frames), ["Ne"] * n_atoms, box),
                              ("Ne", "Ne"), r_max_A=10.0, bin_width_A=0.25)
    assert np.all(rdf.g[rdf.r_A < diameter - 0.125] == 0)
    tail = rdf.r_A > 3 * diameter
    # Counting noise of the pooled tail: relative 1/√(expected pair count there).
    tail_pairs = (n_atoms * (n_atoms - 1) / 2 * 10
                  * 4 / 3 * np.pi * (10.0**3 - (3 * diameter) ** 3) / box**3)
    assert abs(np.mean(rdf.g[tail]) - 1) < 4 / np.sqrt(tail_pairs) + 0.01


def test_rdf_refuses_bad_input():
    traj = make_trajectory(np.zeros((1, 2, 3)) + [[0, 0, 0], [1, 1, 1]], ["O", "H"], 10.0)
    with pytest.raises(ValueError, match="half the"):
        radial_distribution(traj, ("O", "H"), r_max_A=6.0)
    with pytest.raises(ValueError, match="no atoms of element 'C'"):
        radial_distribution(traj, ("O", "C"))
    with pytest.raises(ValueError, match="at least two O"):
        radial_distribution(traj, ("O", "O"))
    no_cell = mdtraj.Trajectory(traj.xyz, traj.topology)
    with pytest.raises(ValueError, match="periodic cell"):
        radial_distribution(no_cell, ("O", "H"))


def test_first_peak_of_an_analytic_rdf_to_sub_bin_precision():
    """A water-like O–O curve: a small shoulder, the first peak, a dip and a second peak."""
    def g_of(r, centre):
        return (1 + 1.8 * np.exp(-(r - centre) ** 2 / (2 * 0.12**2))
                - 0.6 * np.exp(-(r - 3.4) ** 2 / (2 * 0.3**2))
                + 0.3 * np.exp(-(r - 4.5) ** 2 / (2 * 0.4**2))
                + 0.4 * np.exp(-(r - 2.45) ** 2 / (2 * 0.03**2))) * (r > 2.3)

    width = 0.05
    r = np.arange(width / 2, 8, width)
    fine = np.linspace(2.6, 3.1, 500_001)
    for centre in (2.81, 2.8333, 2.86):  # on, between and off the bin centres
        exact = g_of(fine, centre)
        position, height = first_peak(RadialDistribution(("O", "O"), r, g_of(r, centre), 0.03))
        assert position == pytest.approx(fine[np.argmax(exact)], abs=0.002)  # 1/25 of a bin
        assert height == pytest.approx(exact.max(), rel=2e-3)
    # A curve that rises to the end of its range has no peak inside it.
    with pytest.raises(ValueError, match="no peak inside"):
        first_peak(RadialDistribution(("O", "O"), r, r**2, 0.03))


def test_first_peak_in_a_window_finds_the_peak_behind_a_higher_one():
    # O–H-like: the bond peak (g = 30 at 1.0 Å) hides the hydrogen-bond peak (1.6 at 1.75 Å).
    r_A = np.arange(0.025, 6.0, 0.05)
    g = (30 * np.exp(-0.5 * ((r_A - 1.0) / 0.04) ** 2)
         + 1.6 * np.exp(-0.5 * ((r_A - 1.75) / 0.15) ** 2) + 1e-12)
    rdf = RadialDistribution(("O", "H"), r_A, g, 0.06)
    assert first_peak(rdf)[0] == pytest.approx(1.0, abs=0.005)
    position_A, height = first_peak(rdf, (1.4, 2.4))
    assert position_A == pytest.approx(1.75, abs=0.005)
    assert height == pytest.approx(1.6, rel=1e-3)
    with pytest.raises(ValueError, match="2.5–3.5 Å: no peak inside"):
        first_peak(rdf, (2.5, 3.5))  # the tail falls through the whole window


def test_element_pairs_of_water():
    assert element_pairs(["O", "H", "H", "O", "H", "H"]) == [("O", "O"), ("O", "H"), ("H", "H")]


# --- MSD and diffusion ------------------------------------------------------------------

def test_fft_msd_matches_direct_average_over_origins():
    rng = np.random.default_rng(3)
    positions = np.cumsum(rng.normal(size=(40, 5, 3)), axis=0)
    time = np.arange(40) * 0.5
    lag, msd = mean_squared_displacement(time, positions, np.ones(5), [1, 3, 4],
                                         remove_com_drift=False)
    direct = [np.mean([np.sum((positions[t + k, [1, 3, 4]] - positions[t, [1, 3, 4]]) ** 2, -1)
                       for t in range(40 - k)]) for k in range(40)]
    assert lag == pytest.approx(time)
    assert msd == pytest.approx(direct, rel=1e-10, abs=1e-10)


def test_random_walk_recovers_known_diffusion_coefficient():
    rng = np.random.default_rng(4)
    n_atoms, n_frames, dt_ps, d_true = 200, 2000, 0.01, 0.5  # Å²/ps
    steps = rng.normal(0, np.sqrt(2 * d_true * dt_ps), (n_frames, n_atoms, 3))
    positions = np.cumsum(steps, axis=0)
    time = np.arange(n_frames) * dt_ps
    result = diffusion_coefficient(time, positions, np.ones(n_atoms))
    # Removing the centre of mass of N equal walkers removes a fraction 1/N of the MSD.
    expected = d_true * (1 - 1 / n_atoms)
    assert abs(result.diffusion_A2_ps - expected) < 3 * result.stderr_A2_ps
    assert result.stderr_A2_ps < 0.05 * expected
    assert result.diffusion_1e5_cm2_s == pytest.approx(10 * result.diffusion_A2_ps)
    assert result.n_segments == 5
    assert result.fit_start_ps == pytest.approx(0.1 * 399 * dt_ps, abs=dt_ps)
    assert result.fit_end_ps == pytest.approx(0.5 * 399 * dt_ps, abs=dt_ps)


def test_ballistic_motion_gives_quadratic_msd_without_centre_of_mass_drift():
    rng = np.random.default_rng(5)
    n_atoms = 50
    velocities = rng.normal(size=(n_atoms, 3))
    masses = rng.uniform(1, 16, n_atoms)
    time = np.arange(100) * 0.1
    drift = np.array([3.0, -1.0, 2.0])  # a uniform drift of the whole system
    positions = rng.uniform(0, 10, (n_atoms, 3)) + time[:, None, None] * (velocities + drift)
    lag, msd = mean_squared_displacement(time, positions, masses)
    relative = velocities - masses @ velocities / masses.sum()
    assert msd == pytest.approx(np.mean(np.sum(relative**2, axis=1)) * lag**2, rel=1e-9)
    _, raw = mean_squared_displacement(time, positions, masses, remove_com_drift=False)
    assert raw == pytest.approx(np.mean(np.sum((velocities + drift) ** 2, axis=1)) * lag**2)


def test_msd_and_diffusion_refuse_bad_input():
    positions = np.zeros((10, 2, 3))
    with pytest.raises(ValueError, match="constant spacing"):
        mean_squared_displacement(np.r_[0:9, 10.0], positions, np.ones(2))
    with pytest.raises(ValueError, match="shape"):
        mean_squared_displacement(np.arange(10.0), positions[:, :, :2], np.ones(2))
    with pytest.raises(ValueError, match="positive masses"):
        mean_squared_displacement(np.arange(10.0), positions, np.ones(3))
    with pytest.raises(ValueError, match="fewer than 3 lags"):
        diffusion_coefficient(np.arange(10.0), positions, np.ones(2))


# --- statistics -------------------------------------------------------------------------

def test_statistical_inefficiency_gives_the_analytic_standard_error_of_an_ar1_series():
    # x_t = φ x_{t−1} + ε_t with unit-variance ε: the variance of the mean of n samples
    # tends to σ²/((1−φ)² n), larger than the naive Var(x)/n by g = (1+φ)/(1−φ) = 19.
    phi, n = 0.9, 2**14
    analytic = 1 / ((1 - phi) * np.sqrt(n))
    rng = np.random.default_rng(6)
    results = [timeseries_average(lfilter([1], [1, -phi], rng.normal(size=n)))
               for _ in range(12)]
    estimates = np.array([r.stderr for r in results])
    assert np.mean(estimates) == pytest.approx(analytic, rel=0.05)
    assert np.all(np.abs(estimates / analytic - 1) < 0.2)
    assert np.mean([r.statistical_inefficiency for r in results]) == pytest.approx(19, rel=0.1)
    assert all(r.reliable and r.n_effective == pytest.approx(n / r.statistical_inefficiency)
               for r in results)
    assert np.std([r.mean for r in results], ddof=1) == pytest.approx(analytic, rel=0.5)
    # White noise keeps the naive error; a short correlated series is flagged.
    white = np.random.default_rng(7).normal(size=4096)
    assert timeseries_average(white).mean == pytest.approx(white.mean())
    assert timeseries_average(white).stderr == pytest.approx(white.std(ddof=1) / 64, rel=0.15)
    assert not timeseries_average(np.sin(np.linspace(0, 3, 40))).reliable  # one slow swing
    constant = timeseries_average(np.full(50, 2.5))
    assert (constant.mean, constant.stderr, constant.statistical_inefficiency) == (2.5, 0.0, 1.0)
    with pytest.raises(ValueError, match="at least 2"):
        timeseries_average(np.ones(1))
    with pytest.raises(ValueError, match="non-finite"):
        timeseries_average(np.r_[np.ones(20), np.nan])


def test_equilibration_detection_cuts_a_known_transient():
    n, transient = 2000, 200
    for seed in range(4):
        stationary = lfilter([1], [1, -0.5], np.random.default_rng(seed).normal(size=n))
        shifted = stationary.copy()
        shifted[:transient] += 8.0  # 7σ above the stationary mean
        assert transient - 5 <= equilibration_start(shifted) <= transient + 60
        assert equilibration_start(stationary) < 0.05 * n
    # A series that never settles: the search stops at half the run.
    ramp = np.linspace(0, 10, n) + np.random.default_rng(9).normal(size=n)
    assert equilibration_start(ramp) == pytest.approx(n // 2, abs=n // 500 + 1)
    assert equilibration_start(np.ones(10)) == 0


def test_differences_and_seed_averages():
    z = z_difference(1.0, 0.3, 0.0, 0.4)
    assert (z.delta, z.stderr, z.statistic) == pytest.approx((1.0, 0.5, 2.0))
    assert z.p_value == pytest.approx(2 * stats.norm.sf(2.0))
    assert z.is_significant()
    a, b = [1.0, 1.2, 0.9, 1.1], [0.7, 0.8, 0.75]
    welch = welch_difference(a, b)
    reference = stats.ttest_ind(a, b, equal_var=False)
    assert welch.p_value == pytest.approx(reference.pvalue)
    assert welch.statistic == pytest.approx(reference.statistic)
    assert welch.delta / welch.stderr == pytest.approx(reference.statistic)
    seeds = seed_average(a)
    assert (seeds.mean, seeds.stderr) == pytest.approx((np.mean(a), np.std(a, ddof=1) / 2))
    single = seed_average([5.0], [0.25])
    assert (single.mean, single.stderr, single.error_kind) == (5.0, 0.25, "run")
    assert difference_of_averages(seeds, seed_average(b)).test == "welch_t"
    assert difference_of_averages(single, seeds).test == "z"
    with pytest.raises(ValueError, match="own standard error"):
        seed_average([1.0])


def single_run(mean, stderr):
    return SeedAverage(mean, stderr, (mean,), "run")


def test_equivalence_verdicts_against_a_margin():
    z = stats.norm.ppf(0.95)  # single runs: s = √(0.3² + 0.4²) = 0.5, normal quantile
    reference = single_run(0.0, 0.4)

    def tost(mean, margin):
        return equivalence_test(single_run(mean, 0.3), reference, margin, relative=False,
                                unit="x", aggregate_ps=10.0)

    equivalent = tost(0.2, 1.2)
    assert equivalent.ci90 == pytest.approx((0.2 - 0.5 * z, 0.2 + 0.5 * z))
    assert equivalent.minimum_detectable_difference == pytest.approx(0.5 * z)
    assert (equivalent.verdict, equivalent.extra_ps, equivalent.dof) == ("equivalent", 0.0, np.inf)
    assert tost(3.0, 1.0).verdict == "different" and tost(-3.0, 1.0).verdict == "different"
    # CI [−0.62, 1.02] straddles +1: k = (z·s / (δ − |d|))² times the time decides it.
    inconclusive = tost(0.2, 1.0)
    factor = (0.5 * z / 0.8) ** 2
    assert inconclusive.verdict == "inconclusive"
    assert inconclusive.extra_ps == pytest.approx((factor - 1) * 10.0)
    assert inconclusive.describe() == f"inconclusive — needs ≈ {(factor - 1) * 10:.3g} ps more"
    # With that much more time (s ∝ 1/√T) the same difference is just equivalent.
    for shrink, verdict in ((1.01, "equivalent"), (0.99, "inconclusive")):
        longer = equivalence_test(single_run(0.2, 0.3 / np.sqrt(factor * shrink)),
                                  single_run(0.0, 0.4 / np.sqrt(factor * shrink)), 1.0,
                                  relative=False, unit="x", aggregate_ps=10.0 * factor)
        assert longer.verdict == verdict
    # Where a difference sits beyond the margin, the time is the time to call it different.
    assert tost(1.5, 1.0).extra_ps == pytest.approx(((0.5 * z / 0.5) ** 2 - 1) * 10.0)
    undefined = equivalence_test(single_run(1.0, np.nan), reference, 1.0, relative=False,
                                 unit="x", aggregate_ps=1.0)
    assert undefined.verdict == "undefined" and np.isnan(undefined.ci90[0])
    assert undefined.describe() == "undefined — needs ≥ 2 runs"
    assert np.isnan(z_difference(1.0, np.nan, 0.0, 0.1).p_value)  # and no p-value either


def test_equivalence_over_seeds_uses_welch_and_relative_margins():
    a, b = [101.0, 101.4, 100.8], [100.0, 100.3, 99.8, 100.1]
    result = equivalence_test(seed_average(a), seed_average(b), 2.0, relative=True, unit="%",
                              aggregate_ps=15.0)
    welch = stats.ttest_ind(a, b, equal_var=False)
    reference = np.mean(b)
    assert result.dof == pytest.approx(welch.df)
    assert result.difference == pytest.approx(100 * (np.mean(a) - reference) / reference)
    stderr = np.sqrt(np.var(a, ddof=1) / 3 + np.var(b, ddof=1) / 4)
    assert (np.mean(a) - reference) / stderr == pytest.approx(welch.statistic)
    half_width = stats.t.ppf(0.95, welch.df) * 100 * stderr / reference
    assert result.ci90[1] - result.difference == pytest.approx(half_width)
    assert (result.verdict, result.n_replicas) == ("equivalent", 3)
    scaled = equivalence_test(seed_average(a), seed_average(b), 0.5, relative=False,
                              unit="meV", scale=1000.0, aggregate_ps=15.0)
    assert scaled.difference == pytest.approx(1000 * (np.mean(a) - reference))


def test_drift_is_tested_one_sided_against_one_and_a_half_times_fp32():
    z = stats.norm.ppf(0.95)
    fp32 = single_run(0.010, 0.001)

    def drift(mean, stderr=0.001):
        return drift_ratio_test(single_run(mean, stderr), fp32, 1.5, unit="meV/atom/ps",
                                aggregate_ps=5.0)

    within = drift(0.011)
    assert within.margin == pytest.approx(0.005) and within.difference == pytest.approx(0.001)
    assert within.stderr == pytest.approx(np.hypot(0.001, 1.5 * 0.001))
    assert within.ci90[1] == pytest.approx(0.001 + z * np.hypot(0.001, 0.0015))
    assert within.verdict == "equivalent"
    assert drift(-0.011).verdict == "equivalent"  # magnitudes are compared
    assert drift(0.0).verdict == "equivalent"  # a smaller drift never fails
    assert drift(0.05).verdict == "different"
    assert drift(0.016).verdict == "inconclusive"


def test_margins_from_toml(tmp_path):
    path = tmp_path / "margins.toml"
    path.write_text("[other]\nx = 1\n[equivalence]\ndensity_percent = 1\n"
                    "energy_drift_ratio = 2.0\n", encoding="utf-8")
    margins = load_margins(path)
    assert margins == {**DEFAULT_MARGINS, "density_percent": 1.0, "energy_drift_ratio": 2.0}
    assert DEFAULT_MARGINS["density_percent"] == 0.5  # the defaults are not changed
    for text, message in (("[equivalence]\ndensity = 1\n", "unknown margin 'density'"),
                          ("[equivalence]\ndensity_percent = 0\n", "positive number"),
                          ("[equivalence]\ndensity_percent = true\n", "positive number"),
                          ("density_percent = 1\n", r"no \[equivalence\] table"),
                          ("[equivalence\n", "not valid TOML")):
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            load_margins(path)


def test_protocols_without_a_conserved_energy_match_the_md_floor():
    from mace_lpcalc.md import NPT, NVE, NVT
    assert {cls.name for cls in (NVT, NPT, NVE) if not cls.conserves_energy} \
        == PROTOCOLS_WITHOUT_CONSERVED_ENERGY


def test_importing_the_analysis_prints_nothing():
    result = subprocess.run([sys.executable, "-c", "import mace_lpcalc.analysis.compare"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and (result.stdout, result.stderr) == ("", "")


def test_energy_drift_recovers_a_linear_trend_in_meV_per_atom_per_ps():
    rng = np.random.default_rng(8)
    time = np.linspace(0, 10, 501)
    n_atoms, slope = 96, 0.7  # meV/atom/ps
    energy = -500 + slope * 1e-3 * n_atoms * time + rng.normal(0, 0.01, time.size)
    drift, error = energy_drift(time, energy, n_atoms)
    assert abs(drift - slope) < 4 * error
    assert error == pytest.approx(0.01 / np.sqrt(np.sum((time - time.mean()) ** 2))
                                  * 1000 / n_atoms, rel=0.1)
    with pytest.raises(ValueError, match="equal length"):
        energy_drift(time, energy[:-1], n_atoms)


# --- static deviations ------------------------------------------------------------------

def test_identical_predictions_give_zero_deviations():
    rng = np.random.default_rng(9)
    forces = [rng.normal(size=(8, 3)) for _ in range(4)]
    result = static_deviations([-10.0, -11, -12, -13], forces, [-10.0, -11, -12, -13], forces)
    for label, (mean, p95) in result.summary().items():
        expected = 1.0 if label == "cos_F" else 0.0
        assert (mean, p95) == pytest.approx((expected, expected))


def test_known_perturbation_gives_expected_deviations():
    rng = np.random.default_rng(10)
    n_atoms, delta_eV_atom = 10, 2e-3
    shift = np.array([0.03, 0.0, -0.04])  # |shift| = 0.05 eV/Å on every atom
    energies = np.array([-50.0, -40.0, -30.0])
    forces = [rng.normal(size=(n_atoms, 3)) for _ in energies]
    result = static_deviations(energies, forces, energies + delta_eV_atom * n_atoms,
                               [f + shift for f in forces])
    assert result.energy_abs_error_eV_atom == pytest.approx([delta_eV_atom] * 3)
    assert result.energy_rel_error == pytest.approx(delta_eV_atom * n_atoms / np.abs(energies))
    assert result.force_abs_error_eV_A == pytest.approx([0.05] * 3)
    assert result.force_rel_error == pytest.approx(
        [0.05 * np.sqrt(n_atoms) / np.linalg.norm(f) for f in forces])
    cosines = [np.sum(f * (f + shift)) / np.linalg.norm(f) / np.linalg.norm(f + shift)
               for f in forces]
    assert result.force_cosine_similarity == pytest.approx(cosines)
    mean, p95 = result.summary()["RAE_E"]
    assert mean == pytest.approx(np.mean(result.energy_rel_error))
    assert p95 == pytest.approx(np.percentile(result.energy_rel_error, 95))
    with pytest.raises(ValueError, match="non-finite"):
        static_deviations(energies, forces, energies, [f * np.nan for f in forces])


def test_static_deviations_over_frames_with_ase_calculators():
    rng = np.random.default_rng(11)
    frames = []
    for _ in range(3):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
        atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
        frames.append(atoms)
    same = evaluate_static_deviations(frames, EMT(), EMT())
    assert np.all(same.energy_abs_error_eV_atom == 0) and np.all(same.force_rel_error == 0)
    # A test calculator that scales energy and forces by (1 + ε): RAE_E = RAE_F = ε exactly.
    epsilon = 1e-3
    scaled = evaluate_static_deviations(
        frames, EMT(), LinearCombinationCalculator([EMT()], [1 + epsilon]))
    assert scaled.energy_rel_error == pytest.approx([epsilon] * 3, rel=1e-6)
    assert scaled.force_rel_error == pytest.approx([epsilon] * 3, rel=1e-6)
    assert scaled.force_cosine_similarity == pytest.approx([1.0] * 3, abs=1e-12)
    energies = [f.copy() for f in frames]
    for atoms in energies:
        atoms.calc = EMT()
    assert scaled.energy_abs_error_eV_atom == pytest.approx(
        [epsilon * abs(a.get_potential_energy()) / len(a) for a in energies], rel=1e-6)
    assert all(atoms.calc is None for atoms in frames)  # callers' structures untouched
