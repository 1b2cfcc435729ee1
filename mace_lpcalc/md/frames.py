"""A trajectory's contents in memory: the :class:`Frame` a run logs, in ASE units, and the
:class:`TrajectoryData` that reading a file gives, in the file's units.

Neither knows the file's layout; :mod:`.trajectory` writes frames and reads data.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from ase import Atoms


@dataclasses.dataclass(frozen=True)
class Frame:
    """One logged MD frame in ASE units (Å, eV, K, eV/Å³); cell fields are None
    for systems that are not periodic in three dimensions."""

    step: int
    time_ps: float
    positions_A: np.ndarray  # (n_atoms, 3), unwrapped
    potential_energy_eV: float
    kinetic_energy_eV: float
    conserved_energy_eV: float
    temperature_K: float
    wall_time_per_step_s: float
    cell_A: np.ndarray | None = None  # (3, 3), rows are the cell vectors
    stress_eV_A3: np.ndarray | None = None  # (6,) Voigt, ideal gas included


def is_periodic(atoms: Atoms) -> bool:
    """True when ``atoms`` is periodic in all three directions with a 3D cell."""
    return bool(atoms.pbc.all()) and atoms.cell.rank == 3


def frame_from_atoms(atoms: Atoms, step: int, time_ps: float, conserved_energy_eV: float,
                     wall_time_per_step_s: float) -> Frame:
    """Snapshot ``atoms`` (with a calculator holding current results) as a :class:`Frame`."""
    periodic = is_periodic(atoms)
    return Frame(
        step=int(step),
        time_ps=float(time_ps),
        positions_A=atoms.get_positions(),
        potential_energy_eV=float(atoms.get_potential_energy()),
        kinetic_energy_eV=float(atoms.get_kinetic_energy()),
        conserved_energy_eV=float(conserved_energy_eV),
        temperature_K=float(atoms.get_temperature()),
        wall_time_per_step_s=float(wall_time_per_step_s),
        cell_A=np.array(atoms.cell) if periodic else None,
        stress_eV_A3=atoms.get_stress(include_ideal_gas=True) if periodic else None,
    )


@dataclasses.dataclass(frozen=True)
class TrajectoryData:
    """A trajectory read into memory: per-frame ``arrays`` in file ``units``, the
    per-atom ``masses`` (amu) and the root ``attrs`` (JSON attributes decoded)."""

    path: Path
    attrs: dict
    arrays: dict
    units: dict
    masses: np.ndarray
    #: The fp64 sentinel's checks: ``step`` and each deviation (empty if none were made).
    sentinel: dict = dataclasses.field(default_factory=dict)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    @property
    def n_frames(self) -> int:
        return len(self.arrays["step"])

    @property
    def n_atoms(self) -> int:
        return int(self.attrs["n_atoms"])
