"""The trajectory file: MDTraj compatibility, units, validation, resume truncation."""

import dataclasses

import h5py
import mdtraj
import numpy as np
import pytest
from ase import Atoms, units
from ase.build import molecule

from mace_lpcalc.systems import water_box, water_density_g_cm3
from mace_lpcalc.md.frames import Frame, frame_from_atoms
from mace_lpcalc.md.trajectory import UNITS, TrajectoryError, TrajectoryWriter, read_trajectory

METADATA = {"protocol": "nvt", "settings": {"temperature_K": 300.0, "steps": 4},
            "model_hash": "abc123", "policy": "fp64", "backend": "e3nn",
            "versions": {"ase": "3.29.0"}, "seed": 7}


def _frame(atoms, step, *, positions=None, stress=None, cell=None):
    rng = np.random.default_rng(step)
    periodic = atoms.pbc.all()
    return Frame(step=step, time_ps=step * 1e-3,
                 positions_A=atoms.positions + 0.3 * step if positions is None else positions,
                 potential_energy_eV=-10.0 - step, kinetic_energy_eV=0.5 + 0.01 * step,
                 conserved_energy_eV=-9.0, temperature_K=290.0 + step,
                 wall_time_per_step_s=0.01 * step,
                 cell_A=(np.array(atoms.cell) if cell is None else cell) if periodic else None,
                 stress_eV_A3=(rng.normal(size=6) * 1e-3 if stress is None else stress)
                 if periodic else None)


def test_round_trip_through_mdtraj_and_h5py(tmp_path):
    atoms = water_box(8)
    path = tmp_path / "run.h5"
    frames = [_frame(atoms, step) for step in (0, 5, 10)]
    with TrajectoryWriter.create(path, atoms, METADATA) as writer:
        for frame in frames:
            writer.append(frame)

    trajectory = mdtraj.load(str(path))
    assert trajectory.n_frames == 3 and trajectory.n_atoms == 24
    # Coordinates come back unwrapped (frame 2 is shifted 6 Å, out of the 6.2 Å box).
    np.testing.assert_allclose(trajectory.xyz * 10, [f.positions_A for f in frames], atol=2e-6)
    np.testing.assert_allclose(trajectory.time, [0.0, 0.005, 0.01], rtol=1e-6)
    np.testing.assert_allclose(trajectory.unitcell_lengths * 10,
                               [atoms.cell.lengths()] * 3, rtol=1e-6)
    np.testing.assert_allclose(trajectory.unitcell_angles, 90.0)
    topology = trajectory.topology
    assert [residue.name for residue in topology.residues] == ["HOH"] * 8
    assert topology.n_bonds == 16
    assert [atom.element.symbol for atom in topology.atoms] == atoms.get_chemical_symbols()

    with h5py.File(path, "r") as handle:
        for name, unit in UNITS.items():
            assert handle[name].attrs["units"] == unit
        assert handle.attrs["model_hash"] == "abc123" and handle.attrs["seed"] == 7
        assert handle.attrs["n_atoms"] == 24 and handle.attrs["protocol"] == "nvt"
        assert handle["coordinates"].dtype == np.float32
        assert handle["total_energy"].dtype == np.float64

    data = read_trajectory(path)
    assert data.attrs["settings"] == METADATA["settings"]
    assert data.attrs["versions"] == METADATA["versions"]
    np.testing.assert_array_equal(data["step"], [0, 5, 10])
    stresses = np.array([f.stress_eV_A3 for f in frames])
    np.testing.assert_array_equal(data["stress"], stresses)
    np.testing.assert_allclose(data["pressure"], -stresses[:, :3].mean(axis=1) / units.bar)
    np.testing.assert_array_equal(data["total_energy"], [f.potential_energy_eV
                                                         + f.kinetic_energy_eV for f in frames])
    np.testing.assert_allclose(data["volume"], atoms.get_volume())
    np.testing.assert_allclose(data["density"], water_density_g_cm3(atoms))
    np.testing.assert_array_equal(data["wall_time_per_step"], [0.0, 0.05, 0.1])


def test_frame_from_atoms_reads_the_calculator(tmp_path):
    from ase.calculators.lj import LennardJones

    atoms = water_box(4)
    atoms.calc = LennardJones(sigma=2.5, epsilon=0.01, rc=3.0)
    atoms.set_momenta(np.random.default_rng(0).normal(size=(len(atoms), 3)))
    frame = frame_from_atoms(atoms, step=3, time_ps=0.003, conserved_energy_eV=1.5,
                             wall_time_per_step_s=0.2)
    assert frame.potential_energy_eV == atoms.get_potential_energy()
    assert frame.kinetic_energy_eV == atoms.get_kinetic_energy()
    # The stress includes the kinetic (ideal-gas) term, so it is the full pressure.
    np.testing.assert_array_equal(frame.stress_eV_A3, atoms.get_stress(include_ideal_gas=True))
    assert not np.allclose(frame.stress_eV_A3, atoms.get_stress())


def test_triclinic_cell_matches_mdtraj_minimum_image(tmp_path):
    """A cell that is not lower-triangular is rotated into MDTraj's orientation, so
    MDTraj's periodic distances equal ASE's minimum-image ones."""
    cell = np.array([[6.0, 1.2, 0.6], [0.0, 6.5, 0.9], [0.0, 0.0, 7.0]])
    rng = np.random.default_rng(1)
    atoms = Atoms("Ar12", positions=rng.uniform(0, 6, (12, 3)), cell=cell, pbc=True)
    path = tmp_path / "tric.h5"
    with TrajectoryWriter.create(path, atoms, METADATA) as writer:
        writer.append(_frame(atoms, 0, positions=atoms.positions))
    trajectory = mdtraj.load(str(path))
    pairs = np.array([(i, j) for i in range(12) for j in range(i + 1, 12)])
    ase_distances = [atoms.get_distance(i, j, mic=True) for i, j in pairs]
    mdtraj_distances = mdtraj.compute_distances(trajectory, pairs, periodic=True)[0] * 10
    np.testing.assert_allclose(mdtraj_distances, ase_distances, rtol=1e-5)


def test_molecule_without_cell_has_no_cell_series(tmp_path):
    atoms = molecule("CH3CH2OH")
    path = tmp_path / "mol.h5"
    with TrajectoryWriter.create(path, atoms, METADATA) as writer:
        writer.append(_frame(atoms, 0))
        with pytest.raises(TrajectoryError, match="not periodic"):
            writer.append(dataclasses.replace(_frame(atoms, 1), cell_A=np.eye(3) * 10))
    trajectory = mdtraj.load(str(path))
    assert trajectory.unitcell_lengths is None
    assert [residue.name for residue in trajectory.topology.residues] == ["C2H6O"]
    data = read_trajectory(path)
    assert "pressure" not in data.arrays and data.n_frames == 1


@pytest.mark.parametrize("bad, message", [
    (lambda atoms: _frame(atoms, 10, positions=atoms.positions[:-1]), "shape"),
    (lambda atoms: _frame(atoms, 10, positions=np.full((24, 3), np.nan)), "non-finite"),
    (lambda atoms: _frame(atoms, 10, stress=np.array([np.inf, 0, 0, 0, 0, 0])),
     "non-finite stress"),
    (lambda atoms: _frame(atoms, 10, stress=np.zeros(3)), "stress"),
    (lambda atoms: _frame(atoms, 5), "does not follow"),
    (lambda atoms: {"step": 10, "positions_A": atoms.positions}, "expected a Frame"),
    (lambda atoms: dataclasses.replace(_frame(atoms, 10), step=10.5), "must be an integer"),
    (lambda atoms: dataclasses.replace(_frame(atoms, 10), potential_energy_eV=np.nan),
     "non-finite potential_energy"),
])
def test_append_refuses_bad_frames_and_keeps_good_ones(tmp_path, bad, message):
    atoms = water_box(8)
    path = tmp_path / "run.h5"
    with TrajectoryWriter.create(path, atoms, METADATA) as writer:
        writer.append(_frame(atoms, 5))
        with pytest.raises(TrajectoryError, match=message):
            writer.append(bad(atoms))
        writer.append(_frame(atoms, 20))
    np.testing.assert_array_equal(read_trajectory(path)["step"], [5, 20])
    assert mdtraj.load(str(path)).n_frames == 2


def test_refuses_to_overwrite_unless_asked(tmp_path):
    atoms = water_box(8)
    path = tmp_path / "run.h5"
    with TrajectoryWriter.create(path, atoms, METADATA) as writer:
        writer.append(_frame(atoms, 0))
    with pytest.raises(FileExistsError, match="run.h5"):
        TrajectoryWriter.create(path, atoms, METADATA)
    assert read_trajectory(path).n_frames == 1
    TrajectoryWriter.create(path, atoms, METADATA, overwrite=True).close()
    assert read_trajectory(path).n_frames == 0


def test_foreign_corrupt_and_missing_files_name_the_file(tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("not an HDF5 file\n")
    with pytest.raises(TrajectoryError, match="notes.h5 is not an HDF5 file"):
        read_trajectory(text)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as handle:
        handle["coordinates"] = np.zeros((1, 2, 3))
    with pytest.raises(TrajectoryError, match="foreign.h5 is an HDF5 file but not"):
        read_trajectory(foreign)
    with pytest.raises(TrajectoryError, match="foreign.h5"):
        TrajectoryWriter.reopen(foreign, keep_through_step=0, n_atoms=2)
    with pytest.raises(FileNotFoundError, match="absent.h5"):
        read_trajectory(tmp_path / "absent.h5")

    good = tmp_path / "good.h5"
    atoms = water_box(8)
    with TrajectoryWriter.create(good, atoms, METADATA) as writer:
        writer.append(_frame(atoms, 0))
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[:3000])
    with pytest.raises(TrajectoryError, match="truncated.h5"):
        read_trajectory(truncated)


def test_reopen_cuts_back_to_the_checkpoint_and_ignores_half_written_frames(tmp_path):
    atoms = water_box(8)
    path = tmp_path / "run.h5"
    with TrajectoryWriter.create(path, atoms, METADATA) as writer:
        for step in (0, 10, 20, 30):
            writer.append(_frame(atoms, step))
    # A writer killed mid-append leaves some series one frame longer than "step".
    with h5py.File(path, "r+") as handle:
        handle["coordinates"].resize(5, axis=0)
        handle["potential_energy"].resize(5, axis=0)
    assert read_trajectory(path).n_frames == 4

    with TrajectoryWriter.reopen(path, keep_through_step=15, n_atoms=24) as writer:
        assert writer.last_step == 10
        writer.append(_frame(atoms, 20))
    data = read_trajectory(path)
    np.testing.assert_array_equal(data["step"], [0, 10, 20])
    assert data["coordinates"].shape == (3, 24, 3)
    assert mdtraj.load(str(path)).n_frames == 3
    with pytest.raises(TrajectoryError, match="24 atoms"):
        TrajectoryWriter.reopen(path, keep_through_step=15, n_atoms=12)


_READ_IN_ANOTHER_PROCESS = """
import sys, h5py, mdtraj
from mace_lpcalc.md.trajectory import read_trajectory
path = sys.argv[1]
with h5py.File(path, "r") as handle:
    h5py_frames = handle["step"].shape[0]
print(h5py_frames, read_trajectory(path).n_frames, mdtraj.load(path).n_frames)
"""


def test_a_running_trajectory_is_readable_by_other_processes_and_writable_by_none(tmp_path):
    import subprocess
    import sys
    atoms = water_box(8)
    path = tmp_path / "run.h5"
    with TrajectoryWriter.create(path, atoms, METADATA) as writer:
        for step in (0, 5):
            writer.append(_frame(atoms, step))
        reader = subprocess.run([sys.executable, "-c", _READ_IN_ANOTHER_PROCESS, str(path)],
                                capture_output=True, text=True, timeout=120)
        assert reader.returncode == 0, reader.stderr
        assert reader.stdout.split() == ["2", "2", "2"]
        with pytest.raises(TrajectoryError, match="being written by another process"):
            TrajectoryWriter.reopen(path, keep_through_step=5, n_atoms=len(atoms))
        writer.append(_frame(atoms, 10))
    with TrajectoryWriter.reopen(path, keep_through_step=10, n_atoms=len(atoms)) as again:
        assert again.last_step == 10



def test_reading_and_analysing_a_trajectory_loads_neither_torch_nor_mace(tmp_path):
    """The analysis floor stands on the trajectory file alone."""
    import subprocess
    import sys
    atoms = water_box(8)
    path = tmp_path / "run.h5"
    with TrajectoryWriter.create(path, atoms, METADATA) as writer:
        for step in (0, 10, 20, 30):
            writer.append(_frame(atoms, step))
    script = ("import sys\n"
              "from mace_lpcalc.analysis import compare, load_run, radial_distribution\n"
              f"run = load_run({str(path)!r})\n"
              "rdf = radial_distribution(run.trajectory, ('O', 'O'), r_max_A=3.0)\n"
              "assert run.trajectory.n_frames == 4 and len(rdf.g) > 0\n"
              "print(sorted(m for m in ('torch', 'mace', 'e3nn') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
