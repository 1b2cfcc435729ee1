"""Static deviations of a reduced-precision calculation from an FP64 reference.

Per structure s with N_s atoms, reference (E⁶⁴, F⁶⁴) and test (Ê, F̂):

* AE_E  = |Ê − E⁶⁴| / N_s                         (eV/atom)
* RAE_E = |Ê − E⁶⁴| / |E⁶⁴|
* AE_F  = (1/N_s) Σ_a ‖f̂_a − f⁶⁴_a‖₂               (eV/Å)
* RAE_F = ‖F̂ − F⁶⁴‖_F / ‖F⁶⁴‖_F
* cos_F = ⟨F̂, F⁶⁴⟩ / (‖F̂‖_F ‖F⁶⁴‖_F), the cosine between the flattened 3N force vectors
* ME_E  = (Ê − E⁶⁴) / N_s, signed                   (eV/atom)
* ΔP    = P̂ − P⁶⁴, P = −tr(σ)/3 from the virial stress σ at the same configuration, signed
  (bar; periodic structures only, NaN for the others)

aggregated over structures as the mean and the 95th percentile (of the magnitude for the
signed ME_E and ΔP), and the standard error of the mean, s/√n over the structures
(sampled far apart along a trajectory, they are taken as independent). A relative error or
cosine whose denominator is zero (e.g. forces of a perfect lattice) is NaN and is left out
of the aggregates; ΔP is left out of :meth:`StaticDeviations.summary` where no structure is
periodic. Each structure also keeps Σ_a ‖f̂_a − f⁶⁴_a‖² / m_a (eV²/Å²/amu, masses m_a
when given), what the force error's work on thermal velocities scales with
(:func:`mace_lpcalc.analysis.screening.force_work_drift_bound`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ase import units

from mace_lpcalc.md.frames import is_periodic

#: (attribute, label, unit) of each per-structure metric, in report order.
METRICS = (
    ("energy_abs_error_eV_atom", "AE_E", "eV/atom"),
    ("energy_rel_error", "RAE_E", ""),
    ("force_abs_error_eV_A", "AE_F", "eV/Å"),
    ("force_rel_error", "RAE_F", ""),
    ("force_cosine_similarity", "cos_F", ""),
    ("energy_error_eV_atom", "ME_E", "eV/atom"),
    ("pressure_error_bar", "ΔP", "bar"),
)
#: Labels of the signed metrics, whose P95 is that of their magnitude.
SIGNED_METRICS = frozenset({"ME_E", "ΔP"})


@dataclass(frozen=True)
class StaticDeviations:
    """Per-structure deviation metrics, each of shape ``(n_structures,)``
    (``pressure_error_bar`` NaN for non-periodic structures, ``force_error_sq_over_mass``
    NaN when no masses were given)."""

    energy_abs_error_eV_atom: np.ndarray
    energy_rel_error: np.ndarray
    force_abs_error_eV_A: np.ndarray
    force_rel_error: np.ndarray
    force_cosine_similarity: np.ndarray
    energy_error_eV_atom: np.ndarray
    pressure_error_bar: np.ndarray
    force_error_sq_over_mass_eV2_A2_amu: np.ndarray

    @property
    def n_structures(self) -> int:
        return len(self.energy_abs_error_eV_atom)

    @property
    def has_pressure(self) -> bool:
        """Whether any structure was periodic (and so has a pressure deviation)."""
        return bool(np.any(np.isfinite(self.pressure_error_bar)))

    def summary(self) -> dict[str, tuple[float, float]]:
        """``{label: (mean, P95)}`` over structures, NaN entries left out (P95 of the
        magnitude for :data:`SIGNED_METRICS`; ΔP only where :attr:`has_pressure`)."""
        result = {}
        for attribute, label, _unit in self._reported_metrics():
            finite = self._finite(attribute)
            magnitude = np.abs(finite) if label in SIGNED_METRICS else finite
            result[label] = ((float(finite.mean()), float(np.percentile(magnitude, 95)))
                             if len(finite) else (np.nan, np.nan))
        return result

    def stderrs(self) -> dict[str, float]:
        """``{label: s/√n}``, the standard error of each mean in :meth:`summary` (NaN for
        fewer than two finite entries)."""
        result = {}
        for attribute, label, _unit in self._reported_metrics():
            finite = self._finite(attribute)
            result[label] = (float(finite.std(ddof=1) / np.sqrt(len(finite)))
                             if len(finite) >= 2 else np.nan)
        return result

    def _reported_metrics(self):
        return [metric for metric in METRICS if metric[1] != "ΔP" or self.has_pressure]

    def _finite(self, attribute: str) -> np.ndarray:
        values = getattr(self, attribute)
        return values[np.isfinite(values)]


def static_deviations(reference_energies_eV, reference_forces_eV_A,
                      test_energies_eV, test_forces_eV_A, *, reference_pressures_bar=None,
                      test_pressures_bar=None, masses_amu=None) -> StaticDeviations:
    """Deviation metrics of test against reference predictions (pure function).

    Energies: shape ``(n_structures,)``, eV. Forces: a sequence of ``n_structures``
    arrays of shape ``(N_s, 3)``, eV/Å (or one array ``(n_structures, N, 3)``).
    Pressures (optional, both or neither): shape ``(n_structures,)``, bar, NaN for a
    non-periodic structure (in both). Masses (optional): a sequence of ``n_structures``
    arrays of shape ``(N_s,)``, amu, positive.
    """
    reference_energies = np.asarray(reference_energies_eV, dtype=float)
    test_energies = np.asarray(test_energies_eV, dtype=float)
    if reference_energies.ndim != 1 or reference_energies.shape != test_energies.shape:
        raise ValueError(f"energies must be 1-D and of equal length, got "
                         f"{reference_energies.shape} and {test_energies.shape}")
    if not np.all(np.isfinite(reference_energies)) or not np.all(np.isfinite(test_energies)):
        raise ValueError("energies must be finite")
    n_structures = len(reference_energies)
    if n_structures == 0:
        raise ValueError("static_deviations needs at least one structure")
    if len(reference_forces_eV_A) != n_structures or len(test_forces_eV_A) != n_structures:
        raise ValueError(f"need forces for each of the {n_structures} structures")
    pressure_error = _pressure_errors(reference_pressures_bar, test_pressures_bar, n_structures)
    if masses_amu is not None and len(masses_amu) != n_structures:
        raise ValueError(f"need masses for each of the {n_structures} structures")
    metrics = np.full((n_structures, 8), np.nan)
    for s, (ref_f, test_f) in enumerate(zip(reference_forces_eV_A, test_forces_eV_A, strict=True)):
        ref_f = np.asarray(ref_f, dtype=float)
        test_f = np.asarray(test_f, dtype=float)
        if ref_f.ndim != 2 or ref_f.shape[1] != 3 or ref_f.shape != test_f.shape \
                or len(ref_f) == 0:
            raise ValueError(f"structure {s}: forces must both have shape (N, 3) with N > 0, got "
                             f"{ref_f.shape} and {test_f.shape}")
        if not (np.all(np.isfinite(ref_f)) and np.all(np.isfinite(test_f))):
            raise ValueError(f"structure {s}: forces contain non-finite values")
        n_atoms = len(ref_f)
        energy_error = abs(test_energies[s] - reference_energies[s])
        ref_norm = np.linalg.norm(ref_f)
        test_norm = np.linalg.norm(test_f)
        metrics[s, 0] = energy_error / n_atoms
        metrics[s, 1] = _safe_ratio(energy_error, abs(reference_energies[s]))
        metrics[s, 2] = np.linalg.norm(test_f - ref_f, axis=1).mean()
        metrics[s, 3] = _safe_ratio(np.linalg.norm(test_f - ref_f), ref_norm)
        metrics[s, 4] = _safe_ratio(np.sum(test_f * ref_f), ref_norm * test_norm)
        metrics[s, 5] = (test_energies[s] - reference_energies[s]) / n_atoms
        if masses_amu is not None:
            masses = np.asarray(masses_amu[s], dtype=float)
            if masses.shape != (n_atoms,) or not np.all(masses > 0):
                raise ValueError(f"structure {s}: masses must be positive, shape ({n_atoms},), "
                                 f"got shape {masses.shape}")
            metrics[s, 7] = float(np.sum(np.sum((test_f - ref_f) ** 2, axis=1) / masses))
    metrics[:, 6] = pressure_error
    return StaticDeviations(*metrics.T.copy())


def evaluate_static_deviations(structures, reference_calculator,
                               test_calculator) -> StaticDeviations:
    """Evaluate every structure (ASE ``Atoms``) under both calculators and compare.

    Periodic structures also give the pressure, −tr(σ)/3 of the calculator's stress σ
    (the virial alone: the kinetic term is the same under both). The structures are
    copied, so the caller's ``Atoms`` keep their own calculators.
    """
    structures = list(structures)
    if not structures:
        raise ValueError("evaluate_static_deviations needs at least one structure")
    results = {}
    for name, calculator in (("reference", reference_calculator), ("test", test_calculator)):
        energies, forces, pressures = [], [], []
        for atoms in structures:
            atoms = atoms.copy()
            atoms.calc = calculator
            energies.append(atoms.get_potential_energy())
            forces.append(atoms.get_forces())
            pressures.append(-np.sum(atoms.get_stress()[:3]) / 3.0 / units.bar
                             if is_periodic(atoms) else np.nan)
        results[name] = (energies, forces, pressures)
    (reference_energies, reference_forces, reference_pressures) = results["reference"]
    test_energies, test_forces, test_pressures = results["test"]
    return static_deviations(reference_energies, reference_forces, test_energies, test_forces,
                             reference_pressures_bar=reference_pressures,
                             test_pressures_bar=test_pressures,
                             masses_amu=[atoms.get_masses() for atoms in structures])


def _pressure_errors(reference_pressures_bar, test_pressures_bar,
                     n_structures: int) -> np.ndarray:
    """P̂ − P⁶⁴ per structure, NaN throughout when no pressures are given."""
    if reference_pressures_bar is None and test_pressures_bar is None:
        return np.full(n_structures, np.nan)
    if reference_pressures_bar is None or test_pressures_bar is None:
        raise ValueError("give both reference and test pressures, or neither")
    reference = np.asarray(reference_pressures_bar, dtype=float)
    test = np.asarray(test_pressures_bar, dtype=float)
    if reference.shape != (n_structures,) or test.shape != (n_structures,):
        raise ValueError(f"pressures must have shape ({n_structures},), got {reference.shape} "
                         f"and {test.shape}")
    if not np.array_equal(np.isnan(reference), np.isnan(test)) \
            or np.any(np.isinf(reference)) or np.any(np.isinf(test)):
        raise ValueError("pressures must be finite, or NaN (non-periodic) in both")
    return test - reference


def _safe_ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator > 0 else np.nan
