"""A campaign's runs carried between machines: packed into parts, restored elsewhere, and
continued there exactly as they would have continued in place."""

import filecmp

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT

from mace_lpcalc.campaign.state import PART_PREFIX, StateError, main, pack, unpack
from mace_lpcalc.md.checkpoint import Checkpoint, checkpoint_path
from mace_lpcalc.md.nvt import NVT, NVTSettings
from mace_lpcalc.md.trajectory import read_trajectory

pytestmark = pytest.mark.usefixtures("single_thread")


def _nvt(out, structure, steps, resume=False):
    settings = NVTSettings(structure=str(structure), out=str(out), steps=steps, log_every=2,
                           seed=3, checkpoint_every=4, temperature_K=500.0, resume=resume)
    return NVT(settings, calculator=EMT()).run()


@pytest.fixture
def first_leg(tmp_path):
    """A run directory after a first leg of 8 steps of a 16-step run."""
    structure = tmp_path / "cu.xyz"
    bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2).write(structure)
    here = tmp_path / "here" / "nvt"
    here.mkdir(parents=True)
    _nvt(here / "run.h5", structure, steps=8)
    return structure, here.parent


def test_runs_packed_restored_elsewhere_and_continued_equal_those_continued_in_place(
        first_leg, tmp_path):
    structure, here = first_leg
    record = pack(here, tmp_path / "state", part_bytes=4096)  # several parts
    assert len(record["parts"]) > 1 and set(record["files"]) == {
        "nvt/run.h5", "nvt/run.checkpoint.npz"}
    there = tmp_path / "there"
    assert unpack(tmp_path / "state", there) == sorted(record["files"])
    for name in record["files"]:
        assert filecmp.cmp(here / name, there / name, shallow=False)
    for directory in (here, there):  # the second leg, in place and on the "other machine"
        _nvt(directory / "nvt" / "run.h5", structure, steps=16, resume=True)
    finals = [Checkpoint.load(checkpoint_path(directory / "nvt" / "run.h5"))
              for directory in (here, there)]
    assert finals[0].step == finals[1].step == 16
    np.testing.assert_array_equal(finals[1].atoms.positions, finals[0].atoms.positions)
    energies = [read_trajectory(directory / "nvt" / "run.h5")["potential_energy"]
                for directory in (here, there)]
    assert len(energies[1]) == 9 and np.array_equal(energies[1], energies[0])


def test_a_state_that_cannot_come_back_whole_is_refused_by_name(first_leg, tmp_path):
    _, here = first_leg
    with pytest.raises(StateError, match=r"parts of 0.00390625 MiB where at most 1 may be"):
        pack(here, tmp_path / "state", part_bytes=4096, max_parts=1)
    with pytest.raises(StateError, match="holds no run files"):
        pack(tmp_path / "state", tmp_path / "elsewhere")


def test_restoring_refuses_missing_or_foreign_parts_and_never_replaces_a_run(first_leg,
                                                                              tmp_path):
    _, here = first_leg
    state = tmp_path / "state"
    record = pack(here, state, part_bytes=4096)
    with pytest.raises(StateError, match="already holds nvt/run"):
        unpack(state, here)
    last = state / record["parts"][-1]
    kept = last.read_bytes()
    last.write_bytes(kept[:-1])
    with pytest.raises(StateError, match="do not make the archive"):
        unpack(state, tmp_path / "there")
    last.unlink()
    with pytest.raises(StateError, match=f"lacks part.*{PART_PREFIX}"):
        unpack(state, tmp_path / "there")
    with pytest.raises(SystemExit, match="error: .* holds no state.json"):
        main(["unpack", str(tmp_path), str(tmp_path / "there")])
    assert not (tmp_path / "there").exists()  # nothing half-restored
