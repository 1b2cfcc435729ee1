"""Errors of a model's predictions against a split's ``REF_`` labels, in meV units.

RMSEs of the energy per atom, the force components (also relative to the RMS reference
force) and the stress components, and of the forces' intra- and inter-molecular parts
(:func:`intra_inter_forces`), which show whether the small inter-molecular forces are
learnt as well as the large intra-molecular ones.
"""

from __future__ import annotations

import numpy as np
from ase.stress import voigt_6_to_full_3x3_stress

from mace_lpcalc.systems import molecule_ids
from mace_lpcalc.training.data import Split


def intra_inter_forces(forces: np.ndarray, masses: np.ndarray, molecules: np.ndarray):
    """Split atomic forces into inter- and intra-molecular parts.

    The inter-molecular part of atom i is the total force on its molecule shared by mass,
    ``m_i / M_mol * sum_{j in mol} F_j`` (it moves the molecule's centre of mass); the
    intra-molecular part is the remainder. Shapes: forces ``(n, 3)``, masses ``(n,)``,
    molecules ``(n,)`` ints; returns ``(intra, inter)``, each ``(n, 3)``, same units.
    """
    forces = np.asarray(forces, dtype=float)
    masses = np.asarray(masses, dtype=float)
    molecules = np.asarray(molecules)
    if forces.ndim != 2 or forces.shape[1] != 3:
        raise ValueError(f"forces must have shape (n, 3), got {forces.shape}")
    if masses.shape != (len(forces),) or molecules.shape != (len(forces),):
        raise ValueError("masses and molecules must have shape (n,) matching forces")
    n_molecules = int(molecules.max()) + 1
    molecule_force = np.zeros((n_molecules, 3))
    np.add.at(molecule_force, molecules, forces)
    molecule_mass = np.bincount(molecules, weights=masses, minlength=n_molecules)
    inter = (masses / molecule_mass[molecules])[:, None] * molecule_force[molecules]
    return forces - inter, inter


def error_metrics(split: Split, predictions: list[dict]) -> dict:
    """RMSEs of ``predictions`` against the split's REF_ labels (meV units).

    Energy per atom (meV/atom), forces per Cartesian component (meV/Å, and % of the RMS
    reference force), stress per tensor component (meV/Å³), and the forces' intra- and
    inter-molecular parts (:func:`intra_inter_forces`), each with its relative error.
    """
    energy_errors, force_errors, force_refs, stress_errors = [], [], [], []
    parts = {"intra": ([], []), "inter": ([], [])}
    for atoms, predicted in zip(split.atoms, predictions):
        reference_forces = atoms.arrays["REF_forces"]
        energy_errors.append((predicted["energy"] - atoms.info["REF_energy"]) / len(atoms))
        force_errors.append(predicted["forces"] - reference_forces)
        force_refs.append(reference_forces)
        if "REF_stress" in atoms.info:
            reference_stress = voigt_6_to_full_3x3_stress(atoms.info["REF_stress"])
            stress_errors.append(predicted["stress"] - reference_stress)
        molecules = molecule_ids(atoms)
        masses = atoms.get_masses()
        ref_intra, ref_inter = intra_inter_forces(reference_forces, masses, molecules)
        err_intra, err_inter = intra_inter_forces(force_errors[-1], masses, molecules)
        parts["intra"][0].append(err_intra)
        parts["intra"][1].append(ref_intra)
        parts["inter"][0].append(err_inter)
        parts["inter"][1].append(ref_inter)

    def rms(values) -> float:
        return float(np.sqrt(np.mean(np.square(np.concatenate([np.ravel(v) for v in values])))))

    metrics = {
        "frames": len(split.atoms), "atoms": split.n_atoms,
        "energy_rmse_meV_per_atom": 1e3 * rms(energy_errors),
        "forces_rmse_meV_A": 1e3 * rms(force_errors),
        "forces_rel_rmse_percent": 100 * rms(force_errors) / rms(force_refs),
    }
    if stress_errors:
        metrics["stress_rmse_meV_A3"] = 1e3 * rms(stress_errors)
    for name, (errors, references) in parts.items():
        metrics[f"forces_{name}_rmse_meV_A"] = 1e3 * rms(errors)
        metrics[f"forces_{name}_rel_rmse_percent"] = 100 * rms(errors) / rms(references)
    return metrics
