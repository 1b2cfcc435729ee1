"""Neighbour lists against ASE and mace's own (matscipy) lists; Verlet skin rebuild logic."""

import mace  # noqa: F401  -- before e3nn
import numpy as np
import pytest
import torch
from ase.neighborlist import primitive_neighbor_list
from mace.data.neighborhood import get_neighborhood

from mace_lpcalc.fastpath.neighbors import VerletNeighborList, neighbor_list

TRICLINIC = np.array([[5.0, 0.0, 0.0], [1.2, 4.6, 0.0], [0.6, -0.8, 6.1]])
SMALL_CELL = np.array([[2.1, 0.0, 0.0], [0.4, 2.3, 0.0], [0.3, 0.2, 1.9]])


def _triples(edge_index, unit_shifts):
    edge_index = np.asarray(edge_index)
    unit_shifts = np.rint(np.asarray(unit_shifts)).astype(int)
    return {(int(i), int(j), tuple(s)) for i, j, s in zip(*edge_index, unit_shifts)}


def _ours(positions, cell, pbc, cutoff):
    edge_index, unit_shifts = neighbor_list(torch.tensor(positions), torch.tensor(cell), pbc,
                                            cutoff)
    return edge_index.numpy(), unit_shifts.numpy()


CASES = {
    # name: (positions, cell, pbc, cutoff)
    "triclinic": (np.random.default_rng(0).uniform(size=(30, 3)) @ TRICLINIC, TRICLINIC,
                  (True, True, True), 3.0),
    "cutoff_6A": (np.random.default_rng(1).uniform(size=(30, 3)) @ TRICLINIC, TRICLINIC,
                  (True, True, True), 6.0),
    "small_cell_self_images": (np.random.default_rng(2).uniform(size=(2, 3)) @ SMALL_CELL,
                               SMALL_CELL, (True, True, True), 4.5),
    "unwrapped": (np.random.default_rng(3).uniform(size=(20, 3)) @ TRICLINIC
                  + np.random.default_rng(4).integers(-3, 4, size=(20, 3)) @ TRICLINIC,
                  TRICLINIC, (True, True, True), 3.5),
    "open_cluster": (np.random.default_rng(5).uniform(-4, 4, size=(25, 3)), np.zeros((3, 3)),
                     (False, False, False), 3.0),
    "slab_mixed_pbc": (np.random.default_rng(6).uniform(size=(30, 3)) @ TRICLINIC, TRICLINIC,
                       (True, True, False), 4.0),
}


@pytest.mark.parametrize("name", CASES)
def test_matches_ase_and_mace_lists(name):
    positions, cell, pbc, cutoff = CASES[name]
    edge_index, unit_shifts = _ours(positions, cell, pbc, cutoff)
    ours = _triples(edge_index, unit_shifts)

    i, j, shifts = primitive_neighbor_list("ijS", pbc, cell, positions, cutoff,
                                           self_interaction=False)
    assert ours == _triples(np.stack((i, j)), shifts)
    mace_edges, _, mace_unit_shifts, _ = get_neighborhood(positions, cutoff, pbc, cell.copy())
    assert ours == _triples(mace_edges, mace_unit_shifts)
    assert len(ours) == edge_index.shape[1] > 0  # no duplicates, not trivially empty


@pytest.mark.parametrize("name", CASES)
def test_mace_convention(name):
    positions, cell, pbc, cutoff = CASES[name]
    edge_index, unit_shifts = _ours(positions, cell, pbc, cutoff)
    assert edge_index.dtype == np.int64 and edge_index.shape[0] == 2
    assert unit_shifts.dtype == np.float64 and np.array_equal(unit_shifts, np.rint(unit_shifts))
    sender, receiver = edge_index
    vectors = positions[receiver] - positions[sender] + unit_shifts @ cell
    assert np.linalg.norm(vectors, axis=1).max() < cutoff
    assert not np.any((sender == receiver) & np.all(unit_shifts == 0, axis=1))
    triples = _triples(edge_index, unit_shifts)
    assert {(j, i, tuple(-s for s in shift)) for i, j, shift in triples} == triples
    assert not np.any(unit_shifts[:, ~np.array(pbc)])


def test_small_cell_has_self_image_edges():
    positions, cell, pbc, cutoff = CASES["small_cell_self_images"]
    edge_index, unit_shifts = _ours(positions, cell, pbc, cutoff)
    self_images = edge_index[0] == edge_index[1]
    assert self_images.sum() > 20
    assert np.all(np.any(unit_shifts[self_images] != 0, axis=1))


def test_unit_shifts_dtype_follows_request():
    positions, cell, pbc, cutoff = CASES["triclinic"]
    _, unit_shifts = neighbor_list(torch.tensor(positions), torch.tensor(cell), pbc, cutoff,
                                   dtype=torch.float32)
    assert unit_shifts.dtype == torch.float32


@pytest.mark.parametrize("pbc, cell, message", [
    ((True, True), TRICLINIC, "pbc"),
    ((True, True, True), np.zeros((3, 3)), "linearly"),
    ((True, True, False), np.array([[1.0, 0, 0], [2.0, 0, 0], [0, 0, 0]]), "linearly"),
])
def test_bad_input_is_refused(pbc, cell, message):
    with pytest.raises(ValueError, match=message):
        neighbor_list(torch.zeros(4, 3, dtype=torch.float64), torch.tensor(cell), pbc, 3.0)


def test_bad_cutoff_skin_and_positions_are_refused():
    with pytest.raises(ValueError, match="cutoff_A"):
        neighbor_list(torch.zeros(2, 3), torch.eye(3), True, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        neighbor_list(torch.full((2, 3), float("nan")), torch.eye(3), True, 1.0)
    with pytest.raises(ValueError, match="skin_A"):
        VerletNeighborList(3.0, -0.1)


# ---------------------------------------------------------------- Verlet skin


def _water_like(n_atoms=40, box=8.0, seed=0):
    rng = np.random.default_rng(seed)
    positions = torch.tensor(rng.uniform(0, box, size=(n_atoms, 3)))
    return positions, torch.eye(3, dtype=torch.float64) * box


def _pairs_within(edge_index, unit_shifts, positions, cell, cutoff):
    """(i, j, vector rounded to 1e-6 Å) of list edges shorter than ``cutoff``."""
    sender, receiver = edge_index
    vectors = positions[receiver] - positions[sender] + unit_shifts @ cell
    keep = torch.linalg.vector_norm(vectors, dim=1) < cutoff
    return {(int(i), int(j), tuple(np.round(v.tolist(), 6)))
            for i, j, v in zip(sender[keep], receiver[keep], vectors[keep])}


def _assert_verlet_list_complete(verlet, positions, cell, cutoff):
    """Every pair inside ``cutoff`` that a fresh list finds is in the (skin) list too."""
    assert (_pairs_within(verlet.edge_index, verlet.unit_shifts, positions, cell, cutoff)
            == _pairs_within(*neighbor_list(positions, cell, True, cutoff),
                             positions, cell, cutoff))


UNIT_DIRECTION = torch.tensor([0.6, 0.0, 0.8], dtype=torch.float64)


def test_rebuilds_exactly_when_an_atom_crosses_half_the_skin():
    positions, cell = _water_like()
    verlet = VerletNeighborList(3.0, skin_A=0.4)
    assert verlet.update(positions, cell, True) and verlet.n_builds == 1
    step = torch.zeros_like(positions)
    for distance in (0.1, 0.2 - 1e-9):  # not yet: the rule is "moved more than skin/2"
        step[7] = UNIT_DIRECTION * distance
        assert not verlet.update(positions + step, cell, True)
    step[7] = UNIT_DIRECTION * (0.2 + 1e-9)
    assert verlet.update(positions + step, cell, True) and verlet.n_builds == 2
    # The reference moved with the rebuild: displacement is now measured from there.
    step[7] = UNIT_DIRECTION * 0.39
    assert not verlet.update(positions + step, cell, True)


def test_zero_skin_rebuilds_on_any_change_only():
    positions, cell = _water_like()
    verlet = VerletNeighborList(3.0, skin_A=0.0)
    verlet.update(positions, cell, True)
    assert not verlet.update(positions.clone(), cell.clone(), True)
    moved = positions.clone()
    moved[3, 1] += 1e-12
    assert verlet.update(moved, cell, True)


def test_unwrapped_atoms_leaving_the_box_keep_their_list():
    positions, cell = _water_like()
    positions[:10, 0] = 8.0 - 0.05  # at the +x face
    verlet = VerletNeighborList(3.0, skin_A=0.4)
    verlet.update(positions, cell, True)
    moved = positions.clone()
    moved[:10, 0] += 0.1  # now outside the box, unwrapped
    assert not verlet.update(moved, cell, True)
    _assert_verlet_list_complete(verlet, moved, cell, 3.0)


def test_skin_list_stays_complete_along_a_random_walk():
    positions, cell = _water_like(seed=1)
    cutoff = 3.0
    verlet = VerletNeighborList(cutoff, skin_A=0.5)
    rng = np.random.default_rng(2)
    for _ in range(40):
        positions = positions + torch.tensor(rng.normal(0, 0.03, size=positions.shape))
        verlet.update(positions, cell, True)
        _assert_verlet_list_complete(verlet, positions, cell, cutoff)
    assert 2 <= verlet.n_builds < 20


def test_cell_deformation_uses_the_skin_budget():
    """NPT: a barostat step r -> r F, H -> H F costs (cutoff + skin) |F - I| of the skin."""
    positions, cell = _water_like(seed=3)
    cutoff, skin = 3.0, 0.5
    verlet = VerletNeighborList(cutoff, skin_A=skin)
    verlet.update(positions, cell, True)
    budget_strain = skin / (cutoff + skin)
    for strain, expect_rebuild in ((0.5 * budget_strain, False), (1.01 * budget_strain, True)):
        deformation = torch.eye(3, dtype=torch.float64)
        deformation[0, 1] = strain  # a pure shear, |F - I|_F = strain
        assert verlet.update(positions @ deformation, cell @ deformation, True) == expect_rebuild


def test_skin_list_stays_complete_under_a_fluctuating_cell():
    positions, cell = _water_like(seed=4)
    cutoff = 3.0
    verlet = VerletNeighborList(cutoff, skin_A=0.6)
    rng = np.random.default_rng(5)
    for _ in range(30):
        deformation = torch.eye(3, dtype=torch.float64) + torch.tensor(rng.normal(0, 0.004, (3, 3)))
        positions = positions @ deformation + torch.tensor(rng.normal(0, 0.02, positions.shape))
        cell = cell @ deformation
        verlet.update(positions, cell, True)
        _assert_verlet_list_complete(verlet, positions, cell, cutoff)
    assert verlet.n_builds < 30  # cell changes alone did not force a rebuild every step


def test_mixed_pbc_rebuilds_when_a_periodic_cell_vector_changes():
    positions, cell = _water_like()
    verlet = VerletNeighborList(3.0, skin_A=0.4)
    pbc = (True, True, False)
    verlet.update(positions, cell, pbc)
    changed = cell.clone()
    changed[2, 2] += 1.0  # non-periodic direction: irrelevant
    assert not verlet.update(positions, changed, pbc)
    changed[0, 0] += 1e-9
    assert verlet.update(positions, changed, pbc)


def test_nan_positions_force_a_rebuild_which_refuses_them():
    positions, cell = _water_like()
    verlet = VerletNeighborList(3.0, skin_A=0.4)
    verlet.update(positions, cell, True)
    positions[5, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        verlet.update(positions, cell, True)


def test_open_system_ignores_the_cell_and_pbc_change_rebuilds():
    positions, cell = _water_like()
    verlet = VerletNeighborList(3.0, skin_A=0.4)
    verlet.update(positions, torch.zeros(3, 3, dtype=torch.float64), False)
    assert not verlet.update(positions, cell, False)
    assert verlet.update(positions, cell, True)
