"""Labelled data for training: extended-XYZ frames with mace's ``REF_`` labels, as mace graphs.

A :class:`Split` (train, validation or test) keeps the ASE frames, whose labels the
error metrics read, beside the ``AtomicData`` graphs the model is trained and evaluated
on.
"""

from __future__ import annotations

from dataclasses import dataclass

import ase.io
from mace_lpcalc import compat  # noqa: F401  -- mace before e3nn; version check
from mace import data as mace_data
from mace.tools import AtomicNumberTable

#: Keys of the reference labels in the extended XYZ files (mace's REF_ convention).
KEYS = mace_data.KeySpecification(
    info_keys={"energy": "REF_energy", "stress": "REF_stress"},
    arrays_keys={"forces": "REF_forces"})


@dataclass
class Split:
    """One data split: the labelled ASE frames and their mace graphs."""

    name: str
    atoms: list
    graphs: list

    @property
    def n_atoms(self) -> int:
        return sum(len(a) for a in self.atoms)


def read_frames(path) -> list:
    """Read an extended-XYZ file (optionally compressed); raise ``ValueError`` if unlabelled."""
    frames = ase.io.read(str(path), index=":")
    if not frames:
        raise ValueError(f"{path} holds no structures")
    for index, atoms in enumerate(frames):
        if "REF_energy" not in atoms.info or "REF_forces" not in atoms.arrays:
            raise ValueError(f"{path}: frame {index} lacks REF_energy or REF_forces")
    return frames


def make_split(name: str, frames: list, z_table: AtomicNumberTable, r_max: float) -> Split:
    """Convert frames to mace ``AtomicData`` graphs in the current default dtype."""
    unknown = sorted({int(z) for a in frames for z in a.numbers} - set(z_table.zs))
    if unknown:
        raise ValueError(f"{name} set has elements {unknown} absent from the training set "
                         f"{z_table.zs}")
    graphs = [mace_data.AtomicData.from_config(
        mace_data.config_from_atoms(atoms, key_specification=KEYS), z_table=z_table, cutoff=r_max)
        for atoms in frames]
    return Split(name, frames, graphs)
