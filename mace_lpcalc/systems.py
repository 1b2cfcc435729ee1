"""Structures used throughout: periodic water boxes, diamond supercells, carbon clusters.

All builders return :class:`ase.Atoms` with positions in Å; every one is deterministic
for a given ``seed``.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.data import atomic_masses
from ase.neighborlist import natural_cutoffs, neighbor_list
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial.transform import Rotation

from mace_lpcalc.units import CM3_PER_A3, GRAM_PER_AMU, density_g_cm3 as mass_density_g_cm3

#: TIP3P-like geometry of one water molecule (O at the origin), Å.
_WATER = np.array([[0.0, 0.0, 0.0], [0.9572, 0.0, 0.0],
                   [0.9572 * np.cos(np.radians(104.52)), 0.9572 * np.sin(np.radians(104.52)), 0.0]])
_WATER_MASS_G_MOL = float(atomic_masses[8] + 2 * atomic_masses[1])  # ASE's masses, as MD uses
_MIN_INTERMOLECULAR_A = 1.6
#: Bonded: closer than this times the sum of covalent radii (see :func:`molecule_ids`).
MOLECULE_BOND_TOLERANCE = 1.3


def water_box(n_molecules: int, density_g_cm3: float = 1.0, seed: int = 0) -> Atoms:
    """A cubic periodic box of ``n_molecules`` rigid-geometry waters at the given density.

    Molecules sit on a simple-cubic lattice (even-parity sites first) with random
    orientations, re-drawn until no atom of one molecule is closer than 1.6 Å
    (minimum image) to an atom of another.
    """
    if n_molecules < 1:
        raise ValueError(f"n_molecules must be positive, got {n_molecules}")
    if not 0.1 <= density_g_cm3 <= 3.0:
        raise ValueError(f"density_g_cm3={density_g_cm3} is not a liquid water density")
    volume_A3 = n_molecules * _WATER_MASS_G_MOL * GRAM_PER_AMU / (density_g_cm3 * CM3_PER_A3)
    box = volume_A3 ** (1.0 / 3.0)
    per_side = int(np.ceil(n_molecules ** (1.0 / 3.0)))
    spacing = box / per_side
    rng = np.random.default_rng(seed)
    # Even-parity sites first, so a box that fills only part of the lattice gets an
    # fcc-like arrangement with neighbours sqrt(2) lattice spacings apart.
    lattice = sorted(((i, j, k) for i in range(per_side) for j in range(per_side)
                      for k in range(per_side)), key=lambda site: (sum(site) % 2, site))
    sites = np.array(lattice[:n_molecules], dtype=float)
    centre = _WATER.mean(axis=0)
    # Only molecules on lattice sites next to the new one can come within 1.6 Å of it
    # (sites are >= 2.4 Å apart at liquid densities), so checking those keeps this O(N).
    placed: dict[tuple[int, int, int], np.ndarray] = {}
    for site in sites:
        origin = (site + 0.5) * spacing
        key = tuple(int(i) for i in site)
        nearby = [placed[neighbour] for neighbour in _lattice_neighbours(key, per_side)
                  if neighbour in placed]
        for _attempt in range(2000):
            rotated = Rotation.random(random_state=rng).apply(_WATER - centre) + origin
            if not nearby or _min_image_distance(rotated, np.concatenate(nearby), box) \
                    >= _MIN_INTERMOLECULAR_A:
                placed[key] = rotated
                break
        else:
            raise RuntimeError(f"could not place {n_molecules} waters at {density_g_cm3} g/cm3")
    atoms = Atoms("OH2" * n_molecules, positions=np.concatenate(list(placed.values())),
                  cell=np.eye(3) * box, pbc=True)
    atoms.wrap()
    return atoms


def _lattice_neighbours(site: tuple[int, int, int], per_side: int):
    """The site and its 26 neighbours on a periodic cubic lattice (fewer if it is tiny)."""
    return {tuple((site[axis] + offset[axis]) % per_side for axis in range(3))
            for offset in np.ndindex(3, 3, 3)
            for offset in [tuple(o - 1 for o in offset)]}


def _min_image_distance(a: np.ndarray, b: np.ndarray, box: float) -> float:
    delta = a[:, None, :] - b[None, :, :]
    delta -= box * np.round(delta / box)
    return float(np.sqrt((delta ** 2).sum(-1)).min())


def water_density_g_cm3(atoms: Atoms) -> float:
    """Mass density of a periodic structure (water or not) in g/cm³."""
    return mass_density_g_cm3(atoms.get_masses().sum(), atoms.get_volume())


def diamond(n: int, a: float = 3.567) -> Atoms:
    """An ``n × n × n`` supercell of the 8-atom cubic diamond cell (lattice constant Å)."""
    return bulk("C", "diamond", a=a, cubic=True).repeat((n, n, n))


def carbon_cluster(n_atoms: int = 64, seed: int = 0, spacing_A: float = 1.54) -> Atoms:
    """A non-periodic carbon cluster: a diamond fragment around the origin, jittered.

    The ``n_atoms`` diamond-lattice sites nearest the centre are kept, then each atom
    is displaced by up to 0.05 Å so the structure has no symmetry.
    """
    lattice = diamond(6, a=spacing_A * 4 / np.sqrt(3))
    positions = lattice.positions - lattice.positions.mean(axis=0)
    keep = np.argsort(np.linalg.norm(positions, axis=1), kind="stable")[:n_atoms]
    rng = np.random.default_rng(seed)
    jitter = rng.uniform(-0.05, 0.05, size=(n_atoms, 3))
    return Atoms(f"C{n_atoms}", positions=positions[keep] + jitter, pbc=False)


def covalent_bonds(atoms: Atoms, bond_tolerance: float = MOLECULE_BOND_TOLERANCE):
    """Bonded atom pairs ``(first, second)``, int arrays, each pair in both orders.

    Two atoms are bonded when closer (minimum image) than ``bond_tolerance`` times the sum
    of their covalent radii (ASE's ``natural_cutoffs``). The default 1.3 (O–H up to
    1.26 Å) covers thermally stretched O–H bonds of flexible water (up to ~1.15 Å at
    400 K) while hydrogen bonds (O···H > 1.4 Å) stay unbonded.
    """
    return neighbor_list("ij", atoms, natural_cutoffs(atoms, mult=bond_tolerance))


def molecule_ids(atoms: Atoms, bond_tolerance: float = MOLECULE_BOND_TOLERANCE) -> np.ndarray:
    """Molecule index of each atom, shape ``(n_atoms,)``: connected components of
    :func:`covalent_bonds`."""
    first, second = covalent_bonds(atoms, bond_tolerance)
    bonds = coo_matrix((np.ones(len(first)), (first, second)), shape=(len(atoms), len(atoms)))
    _, labels = connected_components(bonds, directed=False)
    return labels
