"""The calculators' exact state check names the same changes as ASE's compare_atoms."""

import numpy as np
import pytest
from ase.build import molecule
from ase.calculators.calculator import all_changes, compare_atoms

from mace_lpcalc.system_changes import system_changes


def _changed(atoms, change):
    atoms = atoms.copy()
    if change == "positions":
        atoms.positions[1, 2] += 1e-9
    elif change == "cell":
        atoms.cell[0, 0] += 1e-9
    elif change == "pbc":
        atoms.pbc = [True, False, False]
    elif change == "numbers":
        atoms.numbers[0] = 6
    elif change == "initial_charges":
        atoms.set_initial_charges(np.ones(len(atoms)))
    elif change == "initial_magmoms":
        atoms.set_initial_magnetic_moments(np.ones(len(atoms)))
    elif change == "momenta only":
        atoms.set_momenta(np.ones((len(atoms), 3)))
    return atoms


@pytest.mark.parametrize("change", [*all_changes, "momenta only"])
def test_each_change_is_named_as_ase_names_it(change):
    atoms = molecule("H2O", cell=[5, 5, 5])
    changed = _changed(atoms, change)
    assert sorted(system_changes(atoms, changed)) == sorted(compare_atoms(atoms, changed))
    assert system_changes(atoms, changed) == ([] if change == "momenta only" else [change])


def test_no_previous_atoms_means_everything_changed_and_ignored_changes_are_left_out():
    atoms = molecule("H2O", cell=[5, 5, 5])
    assert system_changes(None, atoms) == list(all_changes)
    moved = _changed(_changed(atoms, "positions"), "cell")
    assert system_changes(atoms, moved, ignored=("cell",)) == ["positions"]
