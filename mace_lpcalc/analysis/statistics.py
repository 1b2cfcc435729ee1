"""Statistics for correlated MD series: blocking, seed averages and significance of differences.

* :func:`block_average` — mean and standard error of a time series by Flyvbjerg–Petersen
  blocking (J. Chem. Phys. 91, 461 (1989)), with the block size chosen by the criterion of
  Lee et al. (Phys. Rev. E 83, 066706 (2011), eq. 14), as in the ``pyblock`` package.
* :func:`seed_average` — the mean over independent runs (seeds) with its standard error.
* :func:`z_difference` / :func:`welch_difference` / :func:`difference_of_averages` — a
  difference between two estimates, its standard error and a two-sided p-value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

# Levels with fewer blocks than this give a standard error too noisy to use.
_MIN_BLOCKS = 8


@dataclass(frozen=True)
class BlockAverage:
    """Mean of a correlated series with its blocking standard error.

    ``stderr`` is the standard error at the chosen block size ``block_size`` (samples
    per block) and ``stderr_error`` its own uncertainty. ``naive_stderr`` is σ/√n, which
    is right only for uncorrelated samples. ``converged`` is False when no block size
    met the criterion (the series is too short for its correlation time); ``stderr``
    is then the largest estimate over levels with at least 8 blocks, a lower bound.
    """

    mean: float
    stderr: float
    stderr_error: float
    naive_stderr: float
    block_size: int
    n_samples: int
    converged: bool

    @property
    def statistical_inefficiency(self) -> float:
        """(stderr / naive stderr)²: samples per effectively independent sample."""
        return (self.stderr / self.naive_stderr) ** 2 if self.naive_stderr > 0 else 1.0


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
    (``error_kind = "run"``, e.g. a blocking error). ``values`` holds the per-run numbers.
    """

    mean: float
    stderr: float
    values: tuple[float, ...]
    error_kind: str

    @property
    def n_runs(self) -> int:
        return len(self.values)


def block_average(series) -> BlockAverage:
    """Flyvbjerg–Petersen block average of a 1-D series, shape ``(n_samples,)``.

    The series is halved repeatedly by averaging neighbouring pairs; at each level the
    standard error σ_k/√n_k is computed. The level used is the smallest block size B
    with B³ > 2 n (SE_B / SE_1)⁴ (Lee et al. 2011), i.e. long enough compared with the
    correlation time that the blocks are independent.
    """
    data = np.asarray(series, dtype=float)
    if data.ndim != 1:
        raise ValueError(f"series must be one-dimensional, got shape {data.shape}")
    if len(data) < 2 * _MIN_BLOCKS:
        raise ValueError(f"block averaging needs at least {2 * _MIN_BLOCKS} samples, "
                         f"got {len(data)}")
    if not np.all(np.isfinite(data)):
        raise ValueError("series contains non-finite values")
    n_samples = len(data)
    mean = float(data.mean())
    levels = []  # (block size, stderr, stderr error)
    block_size = 1
    while len(data) >= _MIN_BLOCKS:
        n_blocks = len(data)
        stderr = float(np.sqrt(data.var(ddof=1) / n_blocks))
        levels.append((block_size, stderr, stderr / np.sqrt(2.0 * (n_blocks - 1))))
        paired = 2 * (n_blocks // 2)
        data = 0.5 * (data[0:paired:2] + data[1:paired:2])
        block_size *= 2
    naive = levels[0][1]
    if naive == 0.0:
        return BlockAverage(mean, 0.0, 0.0, 0.0, 1, n_samples, True)
    for size, stderr, stderr_error in levels:
        if size**3 > 2.0 * n_samples * (stderr / naive) ** 4:
            return BlockAverage(mean, stderr, stderr_error, naive, size, n_samples, True)
    size, stderr, stderr_error = max(levels, key=lambda level: level[1])
    return BlockAverage(mean, stderr, stderr_error, naive, size, n_samples, False)


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
    """``a − b`` with stderr √(SE_a² + SE_b²) and a two-sided normal-approximation p-value."""
    if stderr_a < 0 or stderr_b < 0:
        raise ValueError("standard errors must be non-negative")
    delta = float(mean_a - mean_b)
    stderr = float(np.hypot(stderr_a, stderr_b))
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


def _ratio(delta: float, stderr: float) -> float:
    if stderr > 0:
        return delta / stderr
    return 0.0 if delta == 0 else float(np.copysign(np.inf, delta))
