"""A cheaper form of ASE's check of what changed since the last calculation.

ASE's ``Calculator.get_property`` asks ``check_state`` before it returns a cached result,
and an MD step asks several times (forces, stress, energy, the run's own checks). ASE's
``compare_atoms`` does each comparison with ``np.allclose(..., atol=1e-15)``: about 0.23 ms
for 648 atoms, so ~1 ms of every step of an NPT replica went to it. An absolute 1e-15 Å
is below one unit in the last place of any coordinate beyond 4.4 Å, so the comparison is
exact in effect; :func:`system_changes` compares exactly (0.02 ms) and names the same
changes.
"""

from __future__ import annotations

import numpy as np
from ase.calculators.calculator import all_changes

_ATTRIBUTES = ("cell", "pbc")
_ARRAYS = tuple(name for name in all_changes if name not in _ATTRIBUTES)


def system_changes(previous, atoms, ignored=()) -> list[str]:
    """What differs between ``previous`` (the atoms of the last calculation, or None) and
    ``atoms``, among ASE's ``all_changes`` but ``ignored``, as ``compare_atoms`` names it."""
    if previous is None:
        return list(all_changes)
    changes = [name for name in _ATTRIBUTES if name not in ignored
               and not np.array_equal(getattr(previous, name), getattr(atoms, name))]
    before, now = previous.arrays, atoms.arrays
    for name in _ARRAYS:
        if name in ignored:
            continue
        if (name in before) != (name in now) or (
                name in now and not np.array_equal(before[name], now[name])):
            changes.append(name)
    return changes


class ExactStateCheck:
    """Mixin for ASE ``Calculator`` subclasses: ``check_state`` by :func:`system_changes`."""

    def check_state(self, atoms, tol=1e-15):
        return system_changes(self.atoms, atoms, self.ignored_changes)
