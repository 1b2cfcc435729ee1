"""Statistics for correlated MD series: averages with errors, seed averages, differences.

* :func:`timeseries_average` — mean of a time series with the standard error from its
  statistical inefficiency g = 1 + 2τ (pymbar's ``timeseries.statistical_inefficiency``,
  Chodera et al., J. Chem. Theory Comput. 3, 26 (2007)): SE = √(g s² / n).
* :func:`equilibration_start` — where a series' production part starts, by the
  criterion of pymbar's ``timeseries.detect_equilibration`` (Chodera, J. Chem. Theory
  Comput. 12, 1799 (2016)): the origin, within the first half, that maximises the number
  of effectively independent samples after it.
* :func:`seed_average` — the mean over independent runs (seeds) with its standard error.
* :func:`z_difference` / :func:`welch_difference` / :func:`difference_of_averages` — a
  difference between two estimates, its standard error and a two-sided p-value (NaN where
  the standard error is undefined). Whether two policies agree is decided by the
  equivalence tests of :mod:`mace_lpcalc.analysis.equivalence`, not by these p-values.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import stats


def _import_pymbar_timeseries():
    """pymbar's ``timeseries`` module, imported without the warnings pymbar logs on import.

    Importing any part of pymbar logs a caution about correlation times (which
    :class:`TimeseriesAverage` carries as ``reliable``) and a note about the optional JAX
    solver of its MBAR estimator (not used here); neither belongs on a user's terminal.
    """
    logger = logging.getLogger("pymbar")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from pymbar import timeseries
    finally:
        logger.setLevel(level)
    return timeseries


_timeseries = _import_pymbar_timeseries()

# Below this many effectively independent samples the correlation function that g is
# summed from is too noisy (it is cut at its first zero crossing), and g tends to be
# underestimated.
_MIN_EFFECTIVE_SAMPLES = 10
# equilibration_start tries this many time origins at most (evenly spaced): each costs
# one statistical-inefficiency estimate over the rest of the series.
_MAX_EQUILIBRATION_ORIGINS = 500


@dataclass(frozen=True)
class TimeseriesAverage:
    """Mean of a correlated series with its autocorrelation-aware standard error.

    ``stderr = √(g s² / n)``: s² is the sample variance of the ``n_samples`` values and
    ``statistical_inefficiency`` g = 1 + 2τ the number of samples per effectively
    independent one (τ the integrated autocorrelation time in samples). ``reliable`` is
    False when fewer than 10 effectively independent samples remain: g then tends to be
    underestimated, and so does the error.
    """

    mean: float
    stderr: float
    statistical_inefficiency: float
    n_samples: int

    @property
    def n_effective(self) -> float:
        return self.n_samples / self.statistical_inefficiency

    @property
    def reliable(self) -> bool:
        return self.n_effective >= _MIN_EFFECTIVE_SAMPLES


@dataclass(frozen=True)
class Difference:
    """``delta = a − b`` with its standard error and a two-sided test of delta = 0.

    ``test`` is ``"z"`` (normal approximation from the two standard errors) or
    ``"welch_t"`` (Welch's unequal-variance t test over per-run values, ``dof`` degrees
    of freedom).
    """

    delta: float
    stderr: float
    statistic: float
    p_value: float
    test: str
    dof: float = np.inf

    def is_significant(self, alpha: float = 0.05) -> bool:
        return self.p_value < alpha


@dataclass(frozen=True)
class SeedAverage:
    """Mean of one observable over independent runs.

    With two or more runs ``stderr`` is their sample standard deviation over √n
    (``error_kind = "seeds"``); with one run it is that run's own error estimate
    (``error_kind = "run"``, e.g. a statistical-inefficiency error). ``values`` holds the
    per-run numbers.
    """

    mean: float
    stderr: float
    values: tuple[float, ...]
    error_kind: str

    @property
    def n_runs(self) -> int:
        return len(self.values)


def statistical_inefficiency(series) -> float:
    """g = 1 + 2τ of a 1-D series (pymbar), 1 for a constant series (nothing correlates)."""
    data = _check_series(series, 2)
    if np.ptp(data) == 0:
        return 1.0
    return float(_timeseries.statistical_inefficiency(data))


def timeseries_average(series) -> TimeseriesAverage:
    """Mean of a 1-D series, shape ``(n_samples,)``, with its statistical-inefficiency error.

    See :class:`TimeseriesAverage`. For an AR(1) series x_t = φ x_{t−1} + ε_t the error
    tends to σ_ε / ((1 − φ) √n), the analytic standard error of the mean.
    """
    data = _check_series(series, 2)
    g = statistical_inefficiency(data)
    return TimeseriesAverage(float(data.mean()), float(np.sqrt(g * data.var(ddof=1) / len(data))),
                             g, len(data))


def equilibration_start(series) -> int:
    """Index of the first production sample of a 1-D series, shape ``(n_samples,)``.

    The criterion of pymbar's ``timeseries.detect_equilibration`` (Chodera, J. Chem.
    Theory Comput. 12, 1799 (2016)): the start t₀ maximises the effective number of
    samples (n − t₀) / g(t₀) after it, g from pymbar's ``statistical_inefficiency`` (full
    correlation sum, not its "fast" approximation), so an initial transient, which
    inflates g, is cut off and a stationary series keeps (nearly) everything. Unlike
    pymbar's function, t₀ is searched over the first half of the series only: on short
    series the noise of g lets the unbounded search pick late starts for a stationary
    series (for 120 samples of an AR(1) series with φ = 0.7 it discards over half in one
    case in eight). A start at the limit means the series may not have equilibrated. At
    most 500 evenly spaced origins are tried (pymbar's ``nskip``); a constant series, or
    a constant remainder, counts as one effective sample, as in pymbar.
    """
    data = _check_series(series, 3)
    if np.ptp(data) == 0:
        return 0
    last = len(data) // 2
    nskip = max(1, int(np.ceil((last + 1) / _MAX_EQUILIBRATION_ORIGINS)))
    # The limit itself is always tried, so that a start at the limit can be recognised.
    origins = np.union1d(np.arange(0, last + 1, nskip), [last])
    n_effective = [(len(data) - t) / _timeseries.statistical_inefficiency(data[t:])
                   if np.ptp(data[t:]) > 0 else 1.0 for t in origins]
    return int(origins[int(np.argmax(n_effective))])


def seed_average(run_means, run_stderrs=None) -> SeedAverage:
    """Average one observable over runs; ``run_means`` and ``run_stderrs`` shape ``(n_runs,)``.

    ``run_stderrs`` (each run's own error) is used only when there is a single run.
    """
    values = np.asarray(run_means, dtype=float).ravel()
    if len(values) == 0:
        raise ValueError("seed_average needs at least one run")
    if len(values) == 1:
        if run_stderrs is None:
            raise ValueError("a single run needs its own standard error (run_stderrs)")
        stderr = float(np.asarray(run_stderrs, dtype=float).ravel()[0])
        return SeedAverage(float(values[0]), stderr, (float(values[0]),), "run")
    return SeedAverage(float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values))),
                       tuple(float(v) for v in values), "seeds")


def z_difference(mean_a: float, stderr_a: float, mean_b: float, stderr_b: float) -> Difference:
    """``a − b`` with stderr √(SE_a² + SE_b²) and a two-sided normal-approximation p-value.

    A NaN standard error (e.g. a single run of an observable with no per-run error) gives
    a NaN statistic and p-value: there is nothing to test against.
    """
    if stderr_a < 0 or stderr_b < 0:
        raise ValueError("standard errors must be non-negative")
    delta = float(mean_a - mean_b)
    stderr = float(np.hypot(stderr_a, stderr_b))
    if not np.isfinite(stderr):
        return Difference(delta, stderr, np.nan, np.nan, "z")
    statistic = _ratio(delta, stderr)
    return Difference(delta, stderr, statistic, float(2.0 * stats.norm.sf(abs(statistic))), "z")


def welch_difference(samples_a, samples_b) -> Difference:
    """``mean(a) − mean(b)`` over per-run values, tested with Welch's t (``scipy.stats``)."""
    a = np.asarray(samples_a, dtype=float).ravel()
    b = np.asarray(samples_b, dtype=float).ravel()
    if len(a) < 2 or len(b) < 2:
        raise ValueError("Welch's t test needs at least two values in each group")
    delta = float(a.mean() - b.mean())
    stderr = float(np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)))
    if stderr == 0.0:  # scipy returns NaN here; the answer is exact
        statistic = _ratio(delta, stderr)
        return Difference(delta, 0.0, statistic, 1.0 if delta == 0 else 0.0, "welch_t",
                          float(len(a) + len(b) - 2))
    result = stats.ttest_ind(a, b, equal_var=False)
    return Difference(delta, stderr, float(result.statistic), float(result.pvalue), "welch_t",
                      float(result.df))


def difference_of_averages(test: SeedAverage, reference: SeedAverage) -> Difference:
    """``test − reference``: Welch's t over seeds when both have ≥ 2 runs, else a z test."""
    if test.n_runs >= 2 and reference.n_runs >= 2:
        return welch_difference(test.values, reference.values)
    return z_difference(test.mean, test.stderr, reference.mean, reference.stderr)


def _check_series(series, min_samples: int) -> np.ndarray:
    data = np.asarray(series, dtype=float)
    if data.ndim != 1:
        raise ValueError(f"series must be one-dimensional, got shape {data.shape}")
    if len(data) < min_samples:
        raise ValueError(f"the series needs at least {min_samples} samples, got {len(data)}")
    if not np.all(np.isfinite(data)):
        raise ValueError("series contains non-finite values")
    return data


def _ratio(delta: float, stderr: float) -> float:
    if stderr > 0:
        return delta / stderr
    return 0.0 if delta == 0 else float(np.copysign(np.inf, delta))
