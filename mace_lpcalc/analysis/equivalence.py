"""Equivalence tests: does a precision policy reproduce FP64 within a stated margin?

A p-value above 0.05 is absence of evidence, not evidence of equivalence. Each
comparison here is a two one-sided tests (TOST) procedure at α = 0.05 against a margin δ
fixed before looking at the data:

* d = test − reference (for a relative margin, 100·d / |reference mean|, in %; the
  reference mean in the denominator is taken as exact, a second-order approximation);
* s, its standard error: Welch's √(SE_t² + SE_r²) over seeds with the
  Welch–Satterthwaite degrees of freedom when both groups have two or more runs,
  otherwise the same √(SE_t² + SE_r²) from the runs' own autocorrelation-aware errors
  with a normal quantile;
* the 90 % confidence interval d ± t₀.₉₅·s. Rejecting both d ≤ −δ and d ≥ δ at
  α = 0.05 is the same as this interval lying inside (−δ, δ).

Verdicts (:attr:`Equivalence.verdict`): **equivalent** when the interval lies inside
(−δ, δ); **different** when it lies wholly outside it; **inconclusive** otherwise;
**undefined** when s is (a single run of an observable with no per-run error: no
interval, no p-value). The **minimum detectable difference** is t₀.₉₅·s, the
half-width of the interval: the smallest margin these data would call equivalent were d
exactly 0. For an inconclusive result the simulated time still needed is estimated
from s ∝ 1/√T (T: total production time; more seeds or longer runs, both groups
extended by the same factor k) with d and t held at their current values: the interval
clears the nearer margin edge when t₀.₉₅·s/√k = |δ − |d||, so
k = (t₀.₉₅·s / |δ − |d||)² and the test group needs (k − 1)·T_test more ps.

The energy-drift test is one-sided and relative to the FP32 group: the policy's drift
magnitude must not exceed ρ = 1.5 times FP32's (:func:`drift_ratio_test`), or FP32's
plus an absolute floor, whichever allows more: FP32's own drift is often zero within its
error, and 1.5 × zero is a margin nothing could meet.

Margins (:data:`DEFAULT_MARGINS`, overridable from the ``[equivalence]`` table of a TOML
file, :func:`load_margins`):

=============================  =======  ==============================================
key                            default  compares
=============================  =======  ==============================================
``density_percent``            0.5      mean density, % of FP64's
``temperature_percent``        0.5      mean temperature, % of FP64's
``potential_energy_meV_atom``  0.5      mean potential energy per atom, meV/atom
``rdf_peak_height_percent``    2        first peak height of the heaviest element's
                                        like-pair g(r) (O–O in water), % of FP64's
``rdf_peak_position_percent``  2        its position, % of FP64's
``diffusion_percent``          10       each element's self-diffusion coefficient, %
``energy_drift_ratio``         1.5      conserved-energy drift magnitude, at most this
                                        times the FP32 group's (NVE, NPT; never NVT)
=============================  =======  ==============================================

and ``energy_drift_floor_meV_atom_ps`` = 0.005: the drift magnitude may always exceed
FP32's by this much (meV/atom/ps; 5 meV/atom per ns).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from mace_lpcalc.analysis.statistics import SeedAverage
from mace_lpcalc.toml_files import read_toml

#: Margin per observable; see the module docstring for what each compares.
DEFAULT_MARGINS = {
    "density_percent": 0.5,
    "temperature_percent": 0.5,
    "potential_energy_meV_atom": 0.5,
    "rdf_peak_height_percent": 2.0,
    "rdf_peak_position_percent": 2.0,
    "diffusion_percent": 10.0,
    "energy_drift_ratio": 1.5,
    "energy_drift_floor_meV_atom_ps": 0.005,
}
#: The TOML table margins are read from.
MARGINS_TABLE = "equivalence"
#: Each test's size: the 90 % interval is the pair of one-sided 95 % bounds.
ALPHA = 0.05


@dataclass(frozen=True)
class Equivalence:
    """One equivalence test: ``difference`` d with standard error ``stderr`` s against
    ``margin`` δ (all in ``unit``).

    ``dof`` is Welch's degrees of freedom, ``inf`` for a normal quantile. ``one_sided``:
    only d < δ is required (a smaller drift is never a failure). ``aggregate_ps`` is the
    test group's total production time and ``n_replicas`` its number of runs.
    """

    difference: float
    stderr: float
    dof: float
    margin: float
    unit: str
    aggregate_ps: float
    n_replicas: int
    one_sided: bool = False

    @property
    def critical_value(self) -> float:
        """t₀.₉₅ at ``dof`` (the normal quantile 1.645 for ``inf``)."""
        if np.isfinite(self.dof):
            return float(stats.t.ppf(1 - ALPHA, self.dof))
        return float(stats.norm.ppf(1 - ALPHA))

    @property
    def is_defined(self) -> bool:
        return bool(np.isfinite(self.difference) and np.isfinite(self.stderr))

    @property
    def minimum_detectable_difference(self) -> float:
        """t₀.₉₅·s: the smallest margin these data would call equivalent at d = 0."""
        return self.critical_value * self.stderr if self.is_defined else np.nan

    @property
    def ci90(self) -> tuple[float, float]:
        """The 90 % confidence interval d ± t₀.₉₅·s, (NaN, NaN) when undefined."""
        half_width = self.minimum_detectable_difference
        return self.difference - half_width, self.difference + half_width

    @property
    def verdict(self) -> str:
        """``equivalent``, ``different``, ``inconclusive`` or ``undefined`` (no s)."""
        if not self.is_defined:
            return "undefined"
        low, high = self.ci90
        if self.one_sided:
            inside, outside = high < self.margin, low > self.margin
        else:
            inside = -self.margin < low and high < self.margin
            outside = high < -self.margin or low > self.margin
        return "equivalent" if inside else "different" if outside else "inconclusive"

    @property
    def extra_ps(self) -> float:
        """Further production ps the test group needs to decide (see the module docstring):
        0 when decided, NaN when undefined, ``inf`` when d sits exactly on the margin."""
        verdict = self.verdict
        if verdict == "undefined":
            return np.nan
        if verdict != "inconclusive":
            return 0.0
        gap = self.margin - (self.difference if self.one_sided else abs(self.difference))
        if gap == 0:
            return np.inf
        factor = (self.minimum_detectable_difference / abs(gap)) ** 2
        return (factor - 1.0) * self.aggregate_ps

    def describe(self) -> str:
        """The verdict as a reader wants it, e.g. ``inconclusive — needs ≈ 40 ps more``."""
        verdict = self.verdict
        if verdict == "undefined":
            return ("undefined — needs ≥ 2 runs" if np.isfinite(self.difference)
                    else "undefined — no reference value")
        if verdict == "inconclusive":
            extra = self.extra_ps
            return ("inconclusive — the difference sits on the margin" if np.isinf(extra)
                    else f"inconclusive — needs ≈ {extra:.3g} ps more")
        return verdict


def json_number(value: float) -> float | None:
    """``value`` as a float, or ``None`` (JSON ``null``) where it is NaN or infinite."""
    return float(value) if np.isfinite(value) else None


def equivalence_test(test: SeedAverage, reference: SeedAverage, margin: float, *,
                     relative: bool, unit: str, scale: float = 1.0,
                     aggregate_ps: float) -> Equivalence:
    """TOST of ``test`` against ``reference`` (seed averages of one observable) at ``margin``.

    With ``relative`` the difference and its error are in % of the reference mean;
    otherwise they are multiplied by ``scale`` (e.g. 1000 for eV/atom against a margin in
    meV/atom). ``aggregate_ps``: the test group's total production time.
    """
    difference = test.mean - reference.mean
    stderr, dof = _difference_error(test, reference)
    if relative:
        to_percent = 100.0 / abs(reference.mean) if reference.mean != 0 else np.nan
        difference, stderr = difference * to_percent, stderr * to_percent
    else:
        difference, stderr = difference * scale, stderr * scale
    return Equivalence(float(difference), float(stderr), dof, float(margin), unit,
                       float(aggregate_ps), test.n_runs)


def drift_ratio_test(test: SeedAverage, fp32: SeedAverage, ratio: float, *, unit: str,
                     aggregate_ps: float, floor: float = 0.0) -> Equivalence:
    """One-sided test that the drift magnitude of ``test`` is at most ``ratio`` × FP32's,
    or FP32's + ``floor`` (in the drifts' unit) where that is larger.

    With D the seed-averaged drifts, d = |D_test| − |D_fp32| and δ = (ρ − 1)·|D_fp32|, so
    d < δ is |D_test| < ρ·|D_fp32|. δ is itself uncertain; its error enters s:
    s² = SE_test² + ρ² SE_fp32², so the interval's upper end, d + t₀.₉₅·s, is the one-sided
    95 % bound of |D_test| − ρ|D_fp32| shifted by δ. "equivalent" then means "not above
    ρ × FP32's drift" and "different" "above it". A drift within its error of zero has a
    magnitude biased upwards, which makes the test conservative for the policy.
    """
    reference_magnitude = abs(fp32.mean)
    stderr, dof = _difference_error(test, fp32, reference_weight=ratio)
    return Equivalence(float(abs(test.mean) - reference_magnitude), float(stderr), dof,
                       float(max((ratio - 1.0) * reference_magnitude, floor)), unit,
                       float(aggregate_ps),
                       test.n_runs, one_sided=True)


def load_margins(path) -> dict[str, float]:
    """The default margins updated from the ``[equivalence]`` table of TOML file ``path``.

    Other tables in the file are left alone. A key not in :data:`DEFAULT_MARGINS`, or a
    value that is not a positive number, is a ``ValueError`` naming the key.
    """
    path = Path(path)
    data = read_toml(path, "margins")
    table = data.get(MARGINS_TABLE)
    if not isinstance(table, dict):
        raise ValueError(f"{path} has no [{MARGINS_TABLE}] table")
    margins = dict(DEFAULT_MARGINS)
    for key, value in table.items():
        if key not in DEFAULT_MARGINS:
            raise ValueError(f"{path}: unknown margin '{key}' in [{MARGINS_TABLE}] "
                             f"(known: {', '.join(DEFAULT_MARGINS)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
                or not np.isfinite(value):
            raise ValueError(f"{path}: margin '{key}' must be a positive number, got {value!r}")
        margins[key] = float(value)
    return margins


def _difference_error(test: SeedAverage, reference: SeedAverage,
                      reference_weight: float = 1.0) -> tuple[float, float]:
    """s of test − w·reference and its Welch degrees of freedom (``inf``: normal quantile)."""
    test_error, reference_error = test.stderr, reference_weight * reference.stderr
    stderr = float(np.hypot(test_error, reference_error))
    if test.n_runs >= 2 and reference.n_runs >= 2 and stderr > 0:
        dof = stderr**4 / (test_error**4 / (test.n_runs - 1)
                           + reference_error**4 / (reference.n_runs - 1))
        return stderr, float(dof)
    return stderr, np.inf
