"""The MDTraj topology a trajectory file carries, built from the atoms alone.

Each bonded molecule (from covalent bonds, :func:`mace_lpcalc.systems.molecule_ids`)
becomes one residue with its bonds; :mod:`.trajectory` stores the topology as the file's
JSON ``topology`` dataset, which ``mdtraj.load`` reads, and :func:`topology_from_dict`
reads it back without PyTables.
"""

from __future__ import annotations

import operator

import mdtraj
from ase import Atoms

from mace_lpcalc.systems import covalent_bonds, molecule_ids


def mdtraj_topology(atoms: Atoms) -> mdtraj.Topology:
    """An MDTraj topology with one residue per bonded molecule
    (:func:`mace_lpcalc.systems.molecule_ids`). Residues are named by Hill formula,
    water as ``HOH``."""
    first, second = covalent_bonds(atoms)
    molecule_of_atom = molecule_ids(atoms)
    n_molecules = int(molecule_of_atom.max()) + 1 if len(atoms) else 0
    # Residues numbered in order of their first atom, so atom order is preserved.
    order = {label: rank for rank, label in enumerate(dict.fromkeys(molecule_of_atom))}
    topology = mdtraj.Topology()
    chain = topology.add_chain()
    residues = [None] * n_molecules
    symbols = atoms.get_chemical_symbols()
    for index, label in enumerate(molecule_of_atom):
        rank = order[label]
        if residues[rank] is None:
            formula = atoms[molecule_of_atom == label].get_chemical_formula("hill")
            residues[rank] = topology.add_residue("HOH" if formula == "H2O" else formula,
                                                  chain, resSeq=rank + 1)
        topology.add_atom(symbols[index], mdtraj.element.get_by_symbol(symbols[index]),
                          residues[rank])
    topology_atoms = list(topology.atoms)
    for i, j in zip(first, second, strict=True):
        if i < j:
            topology.add_bond(topology_atoms[i], topology_atoms[j])
    return topology


def topology_from_dict(description: dict) -> mdtraj.Topology:
    """The topology of a file's JSON ``topology`` dataset (mdtraj's
    ``HDF5TrajectoryFile.convert_topology_to_dict``), built as ``mdtraj.load`` builds it.
    MDTraj only has this inside its HDF5 reader, which needs PyTables; this needs nothing
    but the JSON. Bond orders and types are left out: :func:`mdtraj_topology` sets none."""
    topology = mdtraj.Topology()
    by_index = operator.itemgetter("index")
    for chain_entry in sorted(description["chains"], key=by_index):
        chain = topology.add_chain(chain_entry.get("chain_id"))
        for residue_entry in sorted(chain_entry["residues"], key=by_index):
            residue = topology.add_residue(residue_entry["name"], chain,
                                           resSeq=residue_entry.get("resSeq"),
                                           segment_id=residue_entry.get("segmentID", ""))
            for atom_entry in sorted(residue_entry["atoms"], key=by_index):
                topology.add_atom(atom_entry["name"],
                                  mdtraj.element.get_by_symbol(atom_entry["element"]), residue)
    atoms = list(topology.atoms)
    for first, second in description["bonds"]:
        topology.add_bond(atoms[first], atoms[second])
    return topology
