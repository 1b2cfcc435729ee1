"""Structure builders: density, no overlaps, shapes."""

import numpy as np
import pytest
from ase.geometry import get_distances

from mace_lpcalc.systems import carbon_cluster, diamond, water_box, water_density_g_cm3


@pytest.mark.parametrize("n_molecules", [1, 4, 12, 64])
def test_water_box_density_and_no_overlaps(n_molecules):
    atoms = water_box(n_molecules, density_g_cm3=0.997, seed=5)
    assert len(atoms) == 3 * n_molecules
    assert water_density_g_cm3(atoms) == pytest.approx(0.997, rel=1e-10)
    _, distances = get_distances(atoms.positions, cell=atoms.cell, pbc=True)
    molecule = np.arange(len(atoms)) // 3
    intermolecular = distances[molecule[:, None] != molecule[None, :]]
    assert intermolecular.size == 0 or intermolecular.min() >= 1.6 - 1e-9
    intramolecular_oh = distances[0, 1:3]
    np.testing.assert_allclose(intramolecular_oh, 0.9572, atol=1e-9)


def test_water_box_is_reproducible_and_seeded():
    np.testing.assert_array_equal(water_box(8, seed=2).positions, water_box(8, seed=2).positions)
    assert not np.allclose(water_box(8, seed=2).positions, water_box(8, seed=3).positions)


def test_water_box_rejects_nonsense():
    with pytest.raises(ValueError, match="positive"):
        water_box(0)
    with pytest.raises(ValueError, match="density"):
        water_box(8, density_g_cm3=50)


def test_diamond_and_cluster():
    crystal = diamond(2)
    assert len(crystal) == 64 and crystal.pbc.all()
    np.testing.assert_allclose(crystal.cell.lengths(), 2 * 3.567)
    _, distances = get_distances(crystal.positions, cell=crystal.cell, pbc=True)
    assert np.sort(distances[0])[1] == pytest.approx(3.567 * np.sqrt(3) / 4)
    cluster = carbon_cluster(30, seed=1)
    assert len(cluster) == 30 and not cluster.pbc.any()
    _, distances = get_distances(cluster.positions)
    assert np.sort(distances, axis=1)[:, 1].min() > 1.3
