"""The static screen: what static fp64-relative deviations predict about a policy's dynamics.

From a handful of frames re-evaluated under fp64 and under a policy
(:mod:`mace_lpcalc.analysis.deviations`) and the fp64 group's own NPT volume series, this
module predicts the policy's NPT density shift, bounds the drift its force error can add,
and compares the prediction with the dynamic equivalence test of the density.

**Compressibility** (:func:`isothermal_compressibility`). In the NPT ensemble the volume
fluctuates as ⟨δV²⟩ = k_B T ⟨V⟩ κ_T, so κ_T = ⟨δV²⟩ / (k_B T ⟨V⟩) from the fp64 run's
production volumes V_t (Å³) and its mean temperature T (K): with k_B T in eV, κ_T comes out
in Å³/eV and is multiplied by 1 bar = 6.24·10⁻⁷ eV/Å³ to give bar⁻¹ (water: ≈ 4.5·10⁻⁵).
⟨δV²⟩ is the mean of y_t = (V_t − V̄)²·n/(n − 1) and its standard error that of a
correlated mean, √(g_y s_y² / n), g_y the statistical inefficiency of y
(:func:`~mace_lpcalc.analysis.statistics.timeseries_average`); for independent Gaussian
volumes this is the familiar relative error √(2/n). The error of ⟨V⟩ in the denominator is
smaller by a factor δV/V and is left out. Several fp64 runs: κ_T per run, then the mean
over runs with the seeds' standard error (:func:`seed_compressibility`).

**Density shift** (:func:`predicted_density_shift`). Let P₆₄(V) be fp64's equation of state
and the policy's be P_π(V) = P₆₄(V) + ΔP, ΔP = ⟨P_π − P₆₄⟩ at the same configurations (the
static pressure deviation; the kinetic term is the same under both). At the barostat's
pressure P₀ fp64 settles at V₆₄ with P₆₄(V₆₄) = P₀ and the policy at V_π with
P_π(V_π) = P₀. To first order, P₆₄(V_π) = P₀ + (∂P/∂V)_T (V_π − V₆₄) with
(∂P/∂V)_T = −1/(κ_T V), so P₀ = P₀ − (V_π − V₆₄)/(κ_T V) + ΔP, i.e. δV/V = +κ_T ΔP: a
policy whose pressure is higher at fixed volume expands at fixed pressure. Since ρ ∝ 1/V,

    Δρ/ρ = −κ_T ΔP,    σ(Δρ/ρ)² = (κ_T σ_ΔP)² + (ΔP σ_κ)²    (×100 for %).

Assumptions: ΔP is small (linear response) and does not change over the volume range
δV; and the policy's energy error does not change which configurations are sampled at a
given volume. Thermodynamic perturbation theory adds −β cov(ΔU, P) to ΔP at first order;
it vanishes when the energy error is uncorrelated with the pressure (as rounding noise
is) and is not estimated here, since a handful of frames cannot resolve a covariance.

**Drift** (:func:`force_work_drift_bound`). A defensible *prediction* of the drift cannot
be made from static frames alone: the conservative part of the force error, −∇(Ê − E⁶⁴),
only changes which energy is conserved, while the rest does work whose mean over a
trajectory depends on how the error correlates with the velocities along it, which frames
evaluated once do not contain. What static frames do give is an upper bound. Integrated
exactly, dynamics under the policy's forces F̂ change the fp64 energy as
d(E⁶⁴ + K)/dt = Σ_a δf_a·v_a, δf_a = f̂_a − f⁶⁴_a, and the policy's logged conserved energy
differs from E⁶⁴ + K by the bounded Ê − E⁶⁴, whose rate averages to zero in a stationary
state. With Maxwell–Boltzmann velocities independent of the positions (the canonical
ensemble), ⟨(Σ δf·v)²⟩ = k_B T ⟨Σ_a ‖δf_a‖²/m_a⟩, and by Cauchy–Schwarz

    |drift| ≤ √(k_B T ⟨Σ_a ‖δf_a‖²/m_a⟩) / N          (eV/ps after the ASE time unit).

It is a bound on the drift the force error adds (the integrator's own truncation drift,
shared with fp64, is not in it) and is typically loose, because random errors cancel
along a trajectory. In NPT the pressure error also does work on the barostat, at a rate
ΔP·dV/dt that depends on the barostat's mass and is not in the bound.

**Screen verdict** (:attr:`ScreenResult.verdict`), with z = 1.645 (one-sided 95 %) and
margin δ the density margin of :mod:`mace_lpcalc.analysis.equivalence`: "passes the
screen" when |Δρ/ρ| + zσ < δ; "rejected by the static screen" when |Δρ/ρ| − zσ > δ;
"screen inconclusive" otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ase import units
from scipy import stats

from mace_lpcalc.analysis.deviations import StaticDeviations
from mace_lpcalc.analysis.equivalence import ALPHA, Equivalence, json_number
from mace_lpcalc.analysis.report import DRIFT_METRIC, Summary
from mace_lpcalc.analysis.statistics import seed_average, timeseries_average

#: One picosecond in ASE time units.
_ASE_TIME_PER_PS = 1000.0 * units.fs
_Z = float(stats.norm.ppf(1 - ALPHA))


@dataclass(frozen=True)
class Compressibility:
    """κ_T (bar⁻¹) with its standard error; ``error_kind`` is ``"run"`` (statistical
    inefficiency of one run's squared volume fluctuations) or ``"seeds"`` (spread over
    ``n_runs`` runs)."""

    kappa_per_bar: float
    stderr_per_bar: float
    error_kind: str
    n_runs: int


@dataclass(frozen=True)
class ScreenResult:
    """One policy's static screen: the predicted density shift (% of fp64's) and its error,
    from ``delta_pressure_bar`` (mean static ΔP over frames, with its error) and κ_T; the
    dynamic density test it is compared with (``observed``, None without one); the
    ``margin_percent`` it is screened against; and ``drift_bound_meV_atom_ps`` (NaN
    without masses)."""

    predicted_percent: float
    stderr_percent: float
    delta_pressure_bar: float
    delta_pressure_stderr_bar: float
    compressibility: Compressibility
    margin_percent: float
    drift_bound_meV_atom_ps: float
    observed: Equivalence | None = None

    @property
    def verdict(self) -> str:
        """"passes the screen", "rejected by the static screen" or "screen inconclusive"
        (see the module docstring); "screen undefined" without a finite prediction."""
        if not (np.isfinite(self.predicted_percent) and np.isfinite(self.stderr_percent)):
            return "screen undefined"
        size = abs(self.predicted_percent)
        if size + _Z * self.stderr_percent < self.margin_percent:
            return "passes the screen"
        if size - _Z * self.stderr_percent > self.margin_percent:
            return "rejected by the static screen"
        return "screen inconclusive"

    @property
    def inside_observed_ci(self) -> bool | None:
        """Whether the prediction lies in the dynamic 90 % interval (None: no interval)."""
        if self.observed is None or not self.observed.is_defined:
            return None
        low, high = self.observed.ci90
        return bool(low <= self.predicted_percent <= high)

    def as_json(self) -> dict:
        """The ``static_screen`` entry of ``certificate.json`` (undefined numbers: None)."""
        return {"predicted_density_shift_percent": json_number(self.predicted_percent),
                "predicted_density_shift_stderr_percent": json_number(self.stderr_percent),
                "delta_pressure_bar": json_number(self.delta_pressure_bar),
                "delta_pressure_stderr_bar": json_number(self.delta_pressure_stderr_bar),
                "kappa_T_per_bar": json_number(self.compressibility.kappa_per_bar),
                "kappa_T_stderr_per_bar": json_number(self.compressibility.stderr_per_bar),
                "margin_percent": json_number(self.margin_percent), "verdict": self.verdict,
                "inside_observed_ci90": self.inside_observed_ci,
                "force_work_drift_bound_meV_atom_ps": json_number(self.drift_bound_meV_atom_ps)}


def isothermal_compressibility(volume_A3, temperature_K: float) -> Compressibility:
    """κ_T = ⟨δV²⟩ / (k_B T ⟨V⟩), bar⁻¹, from one NPT run's production volumes.

    ``volume_A3``: shape ``(n_frames,)``, Å³, at least 3 frames, positive and not all
    equal (a fixed box has no compressibility to read); ``temperature_K`` positive.
    """
    volumes = np.asarray(volume_A3, dtype=float)
    if volumes.ndim != 1 or len(volumes) < 3:
        raise ValueError(f"volume_A3 must be one-dimensional with at least 3 frames, got "
                         f"shape {volumes.shape}")
    if not np.all(np.isfinite(volumes)) or not np.all(volumes > 0):
        raise ValueError("volumes must be finite and positive")
    if np.ptp(volumes) == 0:
        raise ValueError("the volume does not fluctuate: κ_T needs an NPT run")
    if not (np.isfinite(temperature_K) and temperature_K > 0):
        raise ValueError(f"temperature_K must be positive, got {temperature_K}")
    n = len(volumes)
    squared = (volumes - volumes.mean()) ** 2 * n / (n - 1)
    fluctuation = timeseries_average(squared)
    to_per_bar = units.bar / (units.kB * temperature_K * volumes.mean())
    return Compressibility(fluctuation.mean * to_per_bar, fluctuation.stderr * to_per_bar,
                           "run", 1)


def seed_compressibility(volume_series, temperatures_K) -> Compressibility:
    """κ_T over one or more runs: each run's :func:`isothermal_compressibility`, then
    their mean with the seeds' standard error (one run: its own error)."""
    if len(volume_series) == 0 or len(volume_series) != len(temperatures_K):
        raise ValueError("need one temperature for each of at least one volume series")
    per_run = [isothermal_compressibility(v, t) for v, t in zip(volume_series, temperatures_K,
                                                                strict=True)]
    average = seed_average([k.kappa_per_bar for k in per_run],
                           [k.stderr_per_bar for k in per_run])
    return Compressibility(average.mean, average.stderr, average.error_kind, average.n_runs)


def predicted_density_shift(kappa: Compressibility, delta_pressure_bar: float,
                            delta_pressure_stderr_bar: float) -> tuple[float, float]:
    """Δρ/ρ = −κ_T ΔP in % of fp64's density, and its propagated standard error (%).

    ``delta_pressure_bar`` is the policy's pressure minus fp64's at the same
    configurations (bar), ``delta_pressure_stderr_bar`` its standard error (NaN: unknown,
    giving a NaN error). Derivation and assumptions in the module docstring.
    """
    if not np.isfinite(delta_pressure_bar):
        raise ValueError(f"delta_pressure_bar must be finite, got {delta_pressure_bar}")
    if delta_pressure_stderr_bar < 0:
        raise ValueError("delta_pressure_stderr_bar must be non-negative")
    shift = -kappa.kappa_per_bar * delta_pressure_bar
    stderr = np.hypot(kappa.kappa_per_bar * delta_pressure_stderr_bar,
                      delta_pressure_bar * kappa.stderr_per_bar)
    return float(100.0 * shift), float(100.0 * stderr)


def force_work_drift_bound(force_error_sq_over_mass_eV2_A2_amu, temperature_K: float,
                           n_atoms: int) -> float:
    """Upper bound on |drift| added by the force error, meV/atom/ps (module docstring).

    ``force_error_sq_over_mass_eV2_A2_amu``: Σ_a ‖δf_a‖²/m_a per frame, shape
    ``(n_frames,)`` (NaN frames left out); NaN when no frame has it.
    """
    values = np.asarray(force_error_sq_over_mass_eV2_A2_amu, dtype=float)
    if not (np.isfinite(temperature_K) and temperature_K > 0) or n_atoms < 1:
        raise ValueError(f"need a positive temperature and atom count, got {temperature_K} "
                         f"K and {n_atoms} atoms")
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return np.nan
    if np.any(values < 0):
        raise ValueError("Σ‖δf‖²/m cannot be negative")
    rate_eV_per_ase_time = np.sqrt(units.kB * temperature_K * values.mean())
    return float(1000.0 * rate_eV_per_ase_time * _ASE_TIME_PER_PS / n_atoms)


def static_screen(deviations: dict[str, StaticDeviations], kappa: Compressibility,
                  temperature_K: float, n_atoms: int, summary: Summary) -> dict[str, ScreenResult]:
    """Screen every group of ``deviations`` that has a pressure deviation: predicted
    density shift, its verdict against ``summary``'s density margin, and the group's
    dynamic density test from ``summary.equivalence`` to compare it with."""
    margin = summary.margins["density_percent"]
    results = {}
    for group, deviation in deviations.items():
        if not deviation.has_pressure:
            continue
        delta_pressure = deviation.summary()["ΔP"][0]
        delta_pressure_stderr = deviation.stderrs()["ΔP"]
        shift, stderr = predicted_density_shift(kappa, delta_pressure, delta_pressure_stderr)
        observed = next((row.result for row in summary.equivalence.get(group, ())
                         if row.observable == "density"), None)
        results[group] = ScreenResult(
            shift, stderr, delta_pressure, delta_pressure_stderr, kappa, margin,
            force_work_drift_bound(deviation.force_error_sq_over_mass_eV2_A2_amu,
                                   temperature_K, n_atoms), observed)
    return results


def screen_markdown(results: dict[str, ScreenResult], summary: Summary) -> list[str]:
    """The "static screen" section of ``summary.md``: one row per screened group."""
    if not results:
        return []
    kappa = next(iter(results.values())).compressibility
    lines = ["", f"## Static screen vs {summary.reference} (density from static ΔP, before MD)",
             "", "| Group | ΔP (bar) | Predicted Δρ (%) | Observed Δρ (%) | Observed 90 % CI | "
             "Inside CI | Screen | Drift bound (meV/atom/ps) | Observed drift − "
             f"{summary.reference} (meV/atom/ps) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for group, result in results.items():
        observed = result.observed
        defined = observed is not None and observed.is_defined
        inside = {True: "yes", False: "no", None: "—"}[result.inside_observed_ci]
        drift = summary.differences.get(group, {}).get(DRIFT_METRIC)
        lines.append("| " + " | ".join([
            group, _estimate(result.delta_pressure_bar, result.delta_pressure_stderr_bar),
            _estimate(result.predicted_percent, result.stderr_percent),
            f"{observed.difference:+.3g}" if observed is not None
            and np.isfinite(observed.difference) else "—",
            "[{:+.3g}, {:+.3g}]".format(*observed.ci90) if defined else "—", inside,
            result.verdict, f"{result.drift_bound_meV_atom_ps:.2g}"
            if np.isfinite(result.drift_bound_meV_atom_ps) else "—",
            _estimate(drift.delta, drift.stderr) if drift is not None else "—"]) + " |")
    lines += ["", f"Predicted Δρ/ρ = −κ_T·ΔP, κ_T = ⟨δV²⟩/(k_B T⟨V⟩) = "
              f"{kappa.kappa_per_bar:.3g} ± {kappa.stderr_per_bar:.2g} bar⁻¹ "
              f"from {summary.reference}'s production volumes ({kappa.n_runs} run(s)); ΔP: the "
              "policy's virial pressure minus fp64's on the same sampled frames (mean ± "
              "standard error over frames). Screen, against the density margin "
              f"±{summary.margins['density_percent']:g} %: passes when |Δρ| + 1.645σ is "
              "inside it, rejected when |Δρ| − 1.645σ is beyond it, inconclusive otherwise. "
              "The prediction is first order and leaves out how the energy error reweights "
              "configurations. Drift bound: √(k_B T⟨Σ‖δf‖²/m⟩)/N, an upper bound on the drift "
              "the force error adds under exact integration (not a prediction; in NPT the "
              "barostat work of ΔP is not in it)."]
    return lines


def _estimate(mean: float, stderr: float) -> str:
    if not np.isfinite(mean):
        return "—"
    return f"{mean:+.3g} ± {stderr:.2g}" if np.isfinite(stderr) else f"{mean:+.3g}"

