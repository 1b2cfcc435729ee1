"""The fast path's results in mace's calculator's layout, and its first-call agreement check.

mace's ``MACECalculator.calculate`` hands its model a cell with a long axis in each open
direction and returns ASE results with its own keys, units, dtypes, committee statistics
and Voigt stresses; :func:`cell_as_mace_sees_it` and :func:`results_like_mace` do the
same around the engines. At the first call the calculator evaluates the structure on
mace's path too: :func:`largest_deviation` measures the difference and
:func:`fast_path_tolerance` says how much a policy may differ by rounding alone.
"""

from __future__ import annotations

import numpy as np
import torch
from ase.calculators.calculator import CalculationFailed
from ase.stress import full_3x3_to_voigt_6_stress

#: Largest relative deviation between the fast path and mace's path at the first call,
#: per model dtype: both run the same (policy-transformed) model, so they differ only by
#: summation order; a misread layout differs by order 1. "reduced": 16-bit operands or
#: TF32 matmuls (10-bit mantissas), where a different summation order moves results by
#: ~1e-3.
FAST_PATH_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4, "reduced": 5e-2}

#: Each engine output's unit as a power of (energy unit, length unit), and its result key.
_RESULT_UNITS = {"energy": (1, 0), "node_energy": (1, 0), "forces": (1, -1), "stress": (1, -3),
                 "atomic_stresses": (1, -3), "atomic_virials": (1, -3), "dipole": (0, 0)}
_RESULT_KEYS = {"atomic_stresses": "stresses", "atomic_virials": "virials"}
#: Results of which mace's calculator also keeps each committee member's value and the variance.
_COMMITTEE_KEYS = ("energy", "forces", "stress", "dipole")


def results_like_mace(outs: list[dict], energy_unit: float, length_unit: float) -> dict:
    """ASE results from the engines' outputs (one per committee member, each in the dtype
    the model returned it), with the keys, units, dtypes and committee statistics of
    mace's ``MACECalculator.calculate``."""
    results = {}
    for name, (energy_power, length_power) in _RESULT_UNITS.items():
        if name not in outs[0]:
            continue
        members = np.stack([np.asarray(out[name]) for out in outs])
        unit = energy_unit ** energy_power * length_unit ** length_power
        key = _RESULT_KEYS.get(name, name)
        mean = members.mean(axis=0)
        results[key] = (float(mean) if name == "energy" else mean) * unit
        if len(outs) > 1 and name in _COMMITTEE_KEYS:
            results[f"{key}_comm"] = members * unit
            variance = members.var(axis=0)
            results[f"{key}_var"] = (float(variance) if name == "energy" else variance) * unit
    if "energy" in results:
        results["free_energy"] = results["energy"]
    if "node_energy" in results:
        results["energies"] = results["node_energy"].copy()
        results["node_energy"] -= outs[0]["node_e0"] * energy_unit  # in place, as mace does
    if "stress" in results:
        results["stress"] = full_3x3_to_voigt_6_stress(results["stress"])
    if "stresses" in results:
        results["stresses"] = np.asarray([full_3x3_to_voigt_6_stress(stress)
                                          for stress in results["stresses"]])
    return results


def cell_as_mace_sees_it(cell: np.ndarray, pbc: np.ndarray, positions: np.ndarray,
                         r_max: float) -> np.ndarray:
    """The cell mace's calculator hands its model (``mace.data.neighborhood``): each open
    direction gets a long axis vector. It changes only the stress of systems that are not
    fully periodic (through the volume), which then equals mace's."""
    if pbc.all():
        return cell
    cell = cell.copy() if cell.any() else np.identity(3)
    extent = (np.abs(positions).max() + 1) * 5 * r_max
    for axis in np.flatnonzero(~pbc):
        cell[axis] = extent * np.identity(3)[axis]
    return cell


def largest_deviation(results: dict, reference: dict) -> float:
    """Largest relative L2 difference over the results both have (energy, forces, ...)."""
    deviations = [0.0]
    for key in ("energy", "forces", "stress", "dipole", "node_energy"):
        if key in results and key in reference:
            difference = np.asarray(results[key], dtype=np.float64) - reference[key]
            # The floor keeps an exact zero (a lone atom's forces) from dividing by zero.
            scale = np.linalg.norm(np.asarray(reference[key], dtype=np.float64)) + 1e-3
            deviations.append(float(np.linalg.norm(difference) / scale))
    return max(deviations)


def fast_path_tolerance(policy) -> float:
    """The :data:`FAST_PATH_TOLERANCE` of a :class:`~mace_lpcalc.precision.policies.PrecisionPolicy`."""
    reduced = policy.reduced_dtypes or policy.allow_tf32
    return FAST_PATH_TOLERANCE["reduced" if reduced else policy.model_dtype]


def check_results(results: dict, policy_name: str, max_force_eV_A: float) -> None:
    """Raise ``CalculationFailed`` for a non-finite energy or force, or a force above
    ``max_force_eV_A`` (the model has left its domain)."""
    energy, forces = results.get("energy"), results.get("forces")
    if energy is not None and not np.isfinite(energy):
        raise CalculationFailed(f"MACE returned a non-finite energy ({energy}) "
                                f"under policy {policy_name!r}")
    if forces is not None:
        if not np.isfinite(forces).all():
            bad = np.flatnonzero(~np.isfinite(forces).all(axis=1))
            raise CalculationFailed(f"MACE returned non-finite forces on atom(s) "
                                    f"{bad[:10].tolist()} under policy {policy_name!r}")
        largest = float(np.sqrt(np.einsum("ij,ij->i", forces, forces).max(initial=0.0)))
        if largest > max_force_eV_A:
            raise CalculationFailed(
                f"exploding forces: max |F| = {largest:.3g} eV/Å exceeds max_force_eV_A = "
                f"{max_force_eV_A:g} eV/Å (atoms too close or the model is out of domain)")
