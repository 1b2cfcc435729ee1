"""Static deviations of a reduced-precision calculation from an FP64 reference.

Per structure s with N_s atoms, reference (E⁶⁴, F⁶⁴) and test (Ê, F̂):

* AE_E  = |Ê − E⁶⁴| / N_s                         (eV/atom)
* RAE_E = |Ê − E⁶⁴| / |E⁶⁴|
* AE_F  = (1/N_s) Σ_a ‖f̂_a − f⁶⁴_a‖₂               (eV/Å)
* RAE_F = ‖F̂ − F⁶⁴‖_F / ‖F⁶⁴‖_F
* cos_F = ⟨F̂, F⁶⁴⟩ / (‖F̂‖_F ‖F⁶⁴‖_F), the cosine between the flattened 3N force vectors

aggregated over structures as the mean and the 95th percentile. A relative error or
cosine whose denominator is zero (e.g. forces of a perfect lattice) is NaN and is left out
of the aggregates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: (attribute, label, unit) of each per-structure metric, in report order.
METRICS = (
    ("energy_abs_error_eV_atom", "AE_E", "eV/atom"),
    ("energy_rel_error", "RAE_E", ""),
    ("force_abs_error_eV_A", "AE_F", "eV/Å"),
    ("force_rel_error", "RAE_F", ""),
    ("force_cosine_similarity", "cos_F", ""),
)


@dataclass(frozen=True)
class StaticDeviations:
    """Per-structure deviation metrics, each of shape ``(n_structures,)``."""

    energy_abs_error_eV_atom: np.ndarray
    energy_rel_error: np.ndarray
    force_abs_error_eV_A: np.ndarray
    force_rel_error: np.ndarray
    force_cosine_similarity: np.ndarray

    @property
    def n_structures(self) -> int:
        return len(self.energy_abs_error_eV_atom)

    def summary(self) -> dict[str, tuple[float, float]]:
        """``{label: (mean, P95)}`` over structures, NaN entries left out."""
        result = {}
        for attribute, label, _unit in METRICS:
            values = getattr(self, attribute)
            finite = values[np.isfinite(values)]
            result[label] = ((float(finite.mean()), float(np.percentile(finite, 95)))
                             if len(finite) else (np.nan, np.nan))
        return result


def static_deviations(reference_energies_eV, reference_forces_eV_A,
                      test_energies_eV, test_forces_eV_A) -> StaticDeviations:
    """Deviation metrics of test against reference predictions (pure function).

    Energies: shape ``(n_structures,)``, eV. Forces: a sequence of ``n_structures``
    arrays of shape ``(N_s, 3)``, eV/Å (or one array ``(n_structures, N, 3)``).
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
    metrics = np.full((n_structures, 5), np.nan)
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
    return StaticDeviations(*metrics.T.copy())


def evaluate_static_deviations(structures, reference_calculator,
                               test_calculator) -> StaticDeviations:
    """Evaluate every structure (ASE ``Atoms``) under both calculators and compare.

    The structures are copied, so the caller's ``Atoms`` keep their own calculators.
    """
    structures = list(structures)
    if not structures:
        raise ValueError("evaluate_static_deviations needs at least one structure")
    results = {}
    for name, calculator in (("reference", reference_calculator), ("test", test_calculator)):
        energies, forces = [], []
        for atoms in structures:
            atoms = atoms.copy()
            atoms.calc = calculator
            energies.append(atoms.get_potential_energy())
            forces.append(atoms.get_forces())
        results[name] = (energies, forces)
    return static_deviations(*results["reference"], *results["test"])


def _safe_ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator > 0 else np.nan
