"""The drift test's floor: a policy may always drift as much as fp32 plus a fixed amount,
so that fp32 drifting zero within its error does not make every policy fail."""

import pytest
from scipy import stats

from mace_lpcalc.analysis import DEFAULT_MARGINS, SeedAverage, drift_ratio_test


def _run(mean, stderr):
    return SeedAverage(mean, stderr, (mean,), "run")


def test_a_zero_fp32_drift_leaves_the_floor_as_the_margin():
    fp32, policy = _run(0.0, 0.0005), _run(0.001, 0.0005)
    floor = DEFAULT_MARGINS["energy_drift_floor_meV_atom_ps"]
    without = drift_ratio_test(policy, fp32, 1.5, unit="meV/atom/ps", aggregate_ps=5.0)
    with_floor = drift_ratio_test(policy, fp32, 1.5, unit="meV/atom/ps", aggregate_ps=5.0,
                                  floor=floor)
    assert without.margin == 0.0 and without.verdict != "equivalent"
    assert with_floor.margin == floor == 0.005
    upper = 0.001 + stats.norm.ppf(0.95) * (0.0005 ** 2 + (1.5 * 0.0005) ** 2) ** 0.5
    assert with_floor.ci90[1] == pytest.approx(upper) and upper < floor
    assert with_floor.verdict == "equivalent"
    assert drift_ratio_test(_run(0.5, 0.02), fp32, 1.5, unit="meV/atom/ps", aggregate_ps=5.0,
                            floor=floor).verdict == "different"


def test_where_half_of_fp32s_drift_exceeds_the_floor_the_ratio_decides():
    fp32 = _run(0.1, 0.001)
    result = drift_ratio_test(_run(0.12, 0.001), fp32, 1.5, unit="meV/atom/ps",
                              aggregate_ps=5.0, floor=0.005)
    assert result.margin == pytest.approx(0.05)
