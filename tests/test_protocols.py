"""MD protocols: exact resume after SIGKILL, ensembles, energy conservation, bad input."""

import dataclasses
import os
import signal
import subprocess
import sys
import time

import ase.io
import mdtraj
import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk, molecule
from ase.calculators.calculator import (CalculationFailed, Calculator, CalculatorSetupError,
                                        all_changes)
from ase.calculators.emt import EMT
from scipy import stats

from mace_lpcalc.fastpath import compiled
from mace_lpcalc.md.checkpoint import Checkpoint, checkpoint_path
from mace_lpcalc.md.cli import read_settings_file, settings_from_command_line
from mace_lpcalc.md.npt import NPT, NPTSettings, mtk_barostat_damping_fs
from mace_lpcalc.md.nve import NVE, NVESettings
from mace_lpcalc.md.nvt import NVT, NVTSettings
from mace_lpcalc.md.trajectory import read_trajectory

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Exact equality between processes needs the same torch thread count in each.
SINGLE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
EMT_CU_LATTICE_A = 3.5898  # EMT's 0 K fcc copper lattice constant (ase.eos fit)
EMT_CU_BULK_MODULUS_GPA = 134.3


pytestmark = pytest.mark.usefixtures("single_thread")


class Harmonic(Calculator):
    """Atoms tethered to their starting sites by springs (eV/Å²). With ``fail_from``,
    the forces on atom 1 turn NaN (or huge) from the ``fail_from``-th configuration on."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, anchors, spring_eV_A2, fail_from=None, failure="nan"):
        super().__init__()
        self.anchors, self.spring = np.array(anchors), spring_eV_A2
        self.fail_from, self.failure, self.configurations = fail_from, failure, 0

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.configurations += bool(system_changes)
        displacement = self.atoms.positions - self.anchors
        forces = -self.spring * displacement
        if self.fail_from is not None and self.configurations >= self.fail_from:
            forces[1] = np.nan if self.failure == "nan" else 1e5
        energy = 0.5 * self.spring * float((displacement ** 2).sum())
        self.results = {"energy": energy, "free_energy": energy, "forces": forces,
                        "stress": np.zeros(6)}


def _argon_cluster(n_atoms=4):
    return Atoms(f"Ar{n_atoms}", positions=np.arange(n_atoms * 3).reshape(-1, 3) * 1.3)


def _deterministic_series(path):
    data = read_trajectory(path)
    return {name: values for name, values in data.arrays.items()
            if name != "wall_time_per_step"}


def _assert_same_run(path, reference):
    run, expected = _deterministic_series(path), _deterministic_series(reference)
    assert run.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(run[name], expected[name], err_msg=name)
    final, final_expected = (Checkpoint.load(checkpoint_path(p)) for p in (path, reference))
    assert final.step == final_expected.step
    np.testing.assert_array_equal(final.atoms.positions, final_expected.atoms.positions)
    np.testing.assert_array_equal(final.atoms.get_momenta(), final_expected.atoms.get_momenta())


def _kill_after_first_checkpoint(processes, folder, checkpoint_every, timeout_s=240):
    """SIGKILL each run shortly (0.05 s, a step or two) after its first checkpoint past
    step 0. The runs are watched together because they progress at different rates."""
    kill_time = {}
    deadline = time.monotonic() + timeout_s
    while any(process.poll() is None for process in processes.values()):
        assert time.monotonic() < deadline, f"no checkpoints within {timeout_s} s"
        for name, process in processes.items():
            checkpoint = checkpoint_path(folder / f"{name}_killed.h5")
            if process.poll() is not None or not checkpoint.exists():
                continue
            if name not in kill_time and Checkpoint.load(checkpoint).step >= checkpoint_every:
                kill_time[name] = time.monotonic() + 0.05
            if name in kill_time and time.monotonic() >= kill_time[name]:
                process.send_signal(signal.SIGKILL)
                process.wait()
        time.sleep(0.01)
    for name, process in processes.items():
        assert process.returncode == -signal.SIGKILL, (folder / f"{name}.log").read_text()


def test_sigkilled_runs_resume_bit_for_bit(water_files, tmp_path):
    """NVE and Langevin NVT (RNG state restored) continue exactly after SIGKILL."""
    structure, model = water_files
    total_steps, log_every, checkpoint_every = 18, 2, 6
    common = dict(structure=str(structure), model=str(model), policy="fp64", seed=3,
                  log_every=log_every, checkpoint_every=checkpoint_every, timestep_fs=0.5)
    protocols = {"nve": (NVE, NVESettings), "nvt": (NVT, NVTSettings)}
    processes = {}
    for name in protocols:  # both start at once, so their slow imports overlap
        killed = tmp_path / f"{name}_killed.h5"
        with open(tmp_path / f"{name}.log", "w") as log:
            processes[name] = subprocess.Popen(
                [sys.executable, "-m", f"mace_lpcalc.protocols.{name}", str(structure),
                 "--model", str(model), "--policy", "fp64", "--seed", "3", "--dt", "0.5",
                 "--log-every", str(log_every), "--checkpoint-every", str(checkpoint_every),
                 "--steps", "100000", "--out", str(killed)],
                cwd=REPOSITORY, env=SINGLE_THREAD, stdout=log, stderr=log)
    try:
        _kill_after_first_checkpoint(processes, tmp_path, checkpoint_every)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()

    for name, (protocol, settings) in protocols.items():
        reference, killed = tmp_path / f"{name}.h5", tmp_path / f"{name}_killed.h5"
        protocol(settings(**common, steps=total_steps, out=str(reference))).run()
        resumed_from = Checkpoint.load(checkpoint_path(killed)).step
        assert 0 < resumed_from < total_steps
        summary = protocol(settings(**common, steps=total_steps, out=str(killed),
                                    resume=True)).run()
        assert summary["steps_run"] == total_steps - resumed_from
        _assert_same_run(killed, reference)


def test_interrupted_npt_resumes_exactly_and_drops_frames_after_the_checkpoint(tmp_path):
    """MTK's thermostat, barostat and reference cell are restored: same trajectory."""
    ase.io.write(tmp_path / "cu.xyz", bulk("Cu", "fcc", a=3.62, cubic=True).repeat(2))
    settings = NPTSettings(structure=str(tmp_path / "cu.xyz"), steps=40, timestep_fs=5.0,
                           log_every=4, checkpoint_every=10, thermostat_time_fs=50.0,
                           barostat_time_fs=100.0, bulk_modulus_GPa=EMT_CU_BULK_MODULUS_GPA,
                           out=str(tmp_path / "ref.h5"))
    NPT(settings, calculator=EMT()).run()

    interrupted = dataclasses.replace(settings, out=str(tmp_path / "cut.h5"))

    class InterruptedEMT(EMT):
        """Interrupts the run when asked for the forces of step 27."""

        configurations = 0

        def calculate(self, atoms=None, properties=None, system_changes=all_changes):
            self.configurations += bool(system_changes)
            if self.configurations == 1 + 27:
                raise KeyboardInterrupt
            super().calculate(atoms, properties, system_changes)

    with pytest.raises(KeyboardInterrupt):
        NPT(interrupted, calculator=InterruptedEMT()).run()
    assert Checkpoint.load(checkpoint_path(interrupted.out)).step == 20
    assert read_trajectory(interrupted.out)["step"][-1] == 24
    NPT(dataclasses.replace(interrupted, resume=True), calculator=EMT()).run()
    _assert_same_run(interrupted.out, settings.out)


def test_langevin_heats_a_crystal_to_the_canonical_distribution(tmp_path):
    """1000 tethered atoms start at rest; the thermostat must bring them to the canonical
    ensemble: momentum components N(0, m kT) and total kinetic energy Gamma(3N/2, kT)
    (Langevin with fixcm off keeps all 3N degrees of freedom)."""
    atoms = Atoms("Ar1000", positions=np.indices((10, 10, 10)).reshape(3, -1).T * 3.0)
    ase.io.write(tmp_path / "ar.xyz", atoms)
    mass, period_fs, temperature_K = atoms.get_masses()[0], 100.0, 300.0
    spring = mass * (2 * np.pi / (period_fs * units.fs)) ** 2
    settings = NVTSettings(structure=str(tmp_path / "ar.xyz"), steps=2000, timestep_fs=2.0,
                           temperature_K=temperature_K, friction_per_fs=0.05,
                           velocities_from_structure=True, log_every=10,
                           checkpoint_every=2000, out=str(tmp_path / "nvt.h5"))
    NVT(settings, calculator=Harmonic(atoms.positions, spring)).run()
    kT, shape = units.kB * temperature_K, 3 * len(atoms) / 2

    momenta = Checkpoint.load(checkpoint_path(settings.out)).atoms.get_momenta()
    assert stats.kstest(momenta.ravel() / np.sqrt(mass * kT), "norm").pvalue > 1e-3
    # Frames 20 fs apart, twice the kinetic-energy correlation time 1/(2 friction);
    # the first 1 ps (50 friction times) is equilibration.
    kinetic = read_trajectory(settings.out)["kinetic_energy"][50:]
    assert kinetic[0] > 0.9 * shape * kT  # heated from 0 K
    assert stats.kstest(kinetic, stats.gamma(shape, scale=kT).cdf).pvalue > 1e-3
    assert kinetic.mean() == pytest.approx(shape * kT, rel=4 / np.sqrt(shape * len(kinetic)))
    assert kinetic.var() / (shape * kT ** 2) == pytest.approx(1.0, abs=0.4)


def test_initial_velocities_are_seeded_and_carry_no_drift_or_rotation(tmp_path):
    atoms = molecule("CH3CH2OH")
    ase.io.write(tmp_path / "mol.xyz", atoms)

    def initial_momenta(seed, name):
        settings = NVTSettings(structure=str(tmp_path / "mol.xyz"), steps=0, seed=seed,
                               temperature_K=500.0, out=str(tmp_path / f"{name}.h5"))
        NVT(settings, calculator=Harmonic(atoms.positions, 1.0)).run()
        return Checkpoint.load(checkpoint_path(settings.out)).atoms

    first, again, other = initial_momenta(1, "a"), initial_momenta(1, "b"), initial_momenta(2, "c")
    np.testing.assert_array_equal(first.get_momenta(), again.get_momenta())
    assert not np.allclose(first.get_momenta(), other.get_momenta())
    np.testing.assert_allclose(first.get_momenta().sum(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(first.get_angular_momentum(), 0.0, atol=1e-10)
    assert 100 < first.get_temperature() < 1500


def test_nve_energy_error_shrinks_as_timestep_squared(water_files, tmp_path):
    """Velocity Verlet's energy error is O(dt²): halving dt over the same time cuts the
    deviation of the total energy from its start 4-fold."""
    structure, model = water_files
    deviations = []
    for timestep_fs, steps, log_every in ((1.0, 20, 1), (0.5, 40, 2)):
        settings = NVESettings(structure=str(structure), model=str(model), policy="fp64",
                               steps=steps, timestep_fs=timestep_fs, log_every=log_every,
                               out=str(tmp_path / f"nve_{timestep_fs}.h5"))
        summary = NVE(settings).run()
        total = read_trajectory(settings.out)["total_energy"]
        deviations.append(np.abs(total - total[0]).max())
        assert summary["fluctuation_ratio"] < 0.01
        assert np.isfinite(summary["energy_drift_stderr_meV_atom_ps"])
    assert deviations[0] / deviations[1] == pytest.approx(4.0, rel=0.1)


def test_a_run_that_switches_to_the_compiled_model_midway_follows_the_uncompiled_run(
        water_files, tmp_path, monkeypatch):
    """compile_model: MD starts on the uncompiled model while the call compiles in the
    background (trace only here, held up for 0.5 s), then continues on the compiled one."""
    calls = []

    def slow_compile(graph, inputs):
        time.sleep(0.5)
        return lambda *values: calls.append(1) or graph(*values)
    monkeypatch.setattr(compiled, "compile_graph", slow_compile)
    structure, model = water_files
    frames = {}
    for compile_model in ("off", "on"):
        settings = NVESettings(structure=str(structure), model=str(model), policy="fp32",
                               steps=100, log_every=5, compile_model=compile_model,
                               out=str(tmp_path / f"nve_compiled_{compile_model}.h5"))
        NVE(settings).run()
        frames[compile_model] = read_trajectory(settings.out)
    assert len(calls) > 10  # the check, then MD steps on the compiled call
    assert frames["on"].attrs["settings"]["compile_model"] == "on"
    np.testing.assert_allclose(frames["on"]["coordinates"], frames["off"]["coordinates"],
                               rtol=0, atol=1e-5)  # nm: fp32 rounding, grown by chaos
    np.testing.assert_allclose(frames["on"]["total_energy"], frames["off"]["total_energy"],
                               rtol=0, atol=1e-5)


def _copper(tmp_path, lattice_A, name):
    path = tmp_path / f"{name}.xyz"
    ase.io.write(path, bulk("Cu", "fcc", a=lattice_A, cubic=True).repeat(2))
    return str(path)


def test_npt_volume_oscillates_with_the_period_ptime_and_bulk_modulus_set(tmp_path):
    """Near 0 K a strained crystal's volume oscillates with period 2π ptime / √3,
    the Melchionna barostat frequency that mtk_barostat_damping_fs reproduces."""
    barostat_time_fs = 100.0
    settings = NPTSettings(structure=_copper(tmp_path, EMT_CU_LATTICE_A * 1.003, "cu"),
                           steps=250, timestep_fs=5.0, temperature_K=1.0, pressure_bar=0.0,
                           barostat_time_fs=barostat_time_fs,
                           bulk_modulus_GPa=EMT_CU_BULK_MODULUS_GPA, log_every=1,
                           out=str(tmp_path / "osc.h5"))
    NPT(settings, calculator=EMT()).run()
    data = read_trajectory(settings.out)
    volume = data["volume"] - data["volume"].mean()
    crossings_ps = data["time"][1:][np.sign(volume[1:]) != np.sign(volume[:-1])]
    period_fs = 2 * np.diff(crossings_ps).mean() * 1000
    assert period_fs == pytest.approx(2 * np.pi * barostat_time_fs / np.sqrt(3), rel=0.03)
    assert mtk_barostat_damping_fs(100.0, 2.2, 30.0, 3, 300.0) == pytest.approx(
        100.0 * np.sqrt(3 * 30.0 * 2.2 * units.GPa / (12 * units.kB * 300.0)))


def test_npt_reaches_the_same_volume_from_both_sides_and_conserves_its_energy(tmp_path):
    volumes = []
    for lattice_A in (3.65, 3.53):  # 5 % too large and too small in volume
        settings = NPTSettings(structure=_copper(tmp_path, lattice_A, f"cu{lattice_A}"),
                               steps=400, timestep_fs=5.0, temperature_K=300.0,
                               barostat_time_fs=100.0, bulk_modulus_GPa=EMT_CU_BULK_MODULUS_GPA,
                               log_every=5, out=str(tmp_path / f"npt{lattice_A}.h5"))
        NPT(settings, calculator=EMT()).run()
        data = read_trajectory(settings.out)
        half = data.n_frames // 2
        volumes.append(data["volume"][half:].mean() / (len(data.masses) * EMT_CU_LATTICE_A ** 3
                                                       / 4))
        # MTK's conserved quantity stays put while the total energy moves by ~0.4 eV.
        kT_per_atom = units.kB * settings.temperature_K
        assert data["conserved_energy"].std() / len(data.masses) < 0.01 * kT_per_atom
        assert data["temperature"][half:].mean() == pytest.approx(300.0, rel=0.1)
    # Both starts end within ~1.5 % (thermal expansion) above the 0 K volume, and agree.
    assert all(1.0 < volume < 1.04 for volume in volumes)
    assert volumes[0] == pytest.approx(volumes[1], rel=0.015)


def test_npt_refuses_a_structure_without_a_3d_cell(tmp_path):
    ase.io.write(tmp_path / "h2o.xyz", molecule("H2O"))
    settings = NPTSettings(structure=str(tmp_path / "h2o.xyz"), out=str(tmp_path / "x.h5"))
    with pytest.raises(ValueError, match="NPT needs a structure periodic in three"):
        NPT(settings, calculator=EMT()).run()
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize("failure, message", [("nan", "non-finite forces"),
                                              ("huge", "exploding forces")])
def test_bad_forces_stop_the_run_and_keep_what_was_logged(tmp_path, failure, message):
    atoms = _argon_cluster()
    ase.io.write(tmp_path / "ar.xyz", atoms)
    settings = NVTSettings(structure=str(tmp_path / "ar.xyz"), steps=100, log_every=5,
                           checkpoint_every=10, out=str(tmp_path / "run.h5"))
    calculator = Harmonic(atoms.positions, 1.0, fail_from=1 + 17, failure=failure)
    with pytest.raises(CalculationFailed, match=f"step 17: {message}.*intact up to step 15"):
        NVT(settings, calculator=calculator).run()
    np.testing.assert_array_equal(read_trajectory(settings.out)["step"], [0, 5, 10, 15])
    assert mdtraj.load(settings.out).n_frames == 4
    assert Checkpoint.load(checkpoint_path(settings.out)).step == 10


def test_bad_structures_fail_before_any_file_is_written(water_files, tmp_path):
    _, model = water_files
    out = tmp_path / "run.h5"

    def run(structure):
        NVT(NVTSettings(structure=str(structure), model=str(model), out=str(out))).run()

    with pytest.raises(FileNotFoundError, match="absent.xyz"):
        run(tmp_path / "absent.xyz")
    (tmp_path / "garbage.xyz").write_text("three\nnot a comment\nX 1 2\n")
    with pytest.raises(ValueError, match="cannot read structure file .*garbage.xyz"):
        run(tmp_path / "garbage.xyz")
    ase.io.write(tmp_path / "silica.xyz", Atoms("SiO2", positions=[[0, 0, 0], [1.6, 0, 0],
                                                                    [-1.6, 0, 0]]))
    with pytest.raises(CalculatorSetupError, match="does not know element.*Si"):
        run(tmp_path / "silica.xyz")
    assert not out.exists()


def test_existing_output_and_changed_settings_are_refused(tmp_path):
    atoms = _argon_cluster()
    ase.io.write(tmp_path / "ar.xyz", atoms)
    settings = NVTSettings(structure=str(tmp_path / "ar.xyz"), steps=10,
                           out=str(tmp_path / "run.h5"))
    NVT(settings, calculator=Harmonic(atoms.positions, 1.0)).run()
    with pytest.raises(FileExistsError, match="run.h5 already exists"):
        NVT(settings, calculator=Harmonic(atoms.positions, 1.0)).run()
    changed = dataclasses.replace(settings, temperature_K=350.0, steps=20, resume=True)
    with pytest.raises(ValueError, match="temperature_K = 350.0 .checkpoint: 300.0"):
        NVT(changed, calculator=Harmonic(atoms.positions, 1.0)).run()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        NVT(dataclasses.replace(settings, out=str(tmp_path / "new.h5"), resume=True),
            calculator=Harmonic(atoms.positions, 1.0)).run()
    rerun = NVT(dataclasses.replace(settings, overwrite=True),
                calculator=Harmonic(atoms.positions, 1.0)).run()
    assert rerun["final_step"] == 10


def test_command_line_overrides_the_settings_file(tmp_path):
    settings_file = tmp_path / "run.toml"
    settings_file.write_text("friction_per_fs = 0.02\ntimestep_fs = 2.0\nsteps = 50\n")
    settings = settings_from_command_line(
        NVTSettings, ["water.xyz", "--settings", str(settings_file), "--dt", "0.5",
                      "--overwrite"], prog="nvt")
    assert (settings.structure, settings.friction_per_fs, settings.timestep_fs,
            settings.steps, settings.overwrite) == ("water.xyz", 0.02, 0.5, 50, True)
    settings_file.write_text("frictions = 0.02\n")
    with pytest.raises(ValueError, match="run.toml: unknown setting.*frictions"):
        read_settings_file(settings_file, NVTSettings)
    settings_file.write_text("steps = 'many'\n")
    with pytest.raises(ValueError, match="steps must be int"):
        read_settings_file(settings_file, NVTSettings)


@pytest.mark.parametrize("name, settings_class", [("nvt_langevin", NVTSettings),
                                                  ("npt_water", NPTSettings),
                                                  ("nve_drift", NVESettings)])
def test_shipped_settings_files_load(name, settings_class):
    values = read_settings_file(os.path.join(REPOSITORY, "protocols", f"{name}.toml"),
                                settings_class)
    settings = settings_class(structure="water.xyz", **values)
    assert settings.timestep_fs == 1.0 and settings.temperature_K == 300.0


def test_checkpoints_come_by_wall_time_as_well_as_by_step(tmp_path, monkeypatch):
    atoms = _argon_cluster()
    ase.io.write(tmp_path / "ar.xyz", atoms)
    saved_steps = []
    save = Checkpoint.save
    monkeypatch.setattr(Checkpoint, "save",
                        lambda self, path: (saved_steps.append(self.step), save(self, path)))
    by_step = NVTSettings(structure=str(tmp_path / "ar.xyz"), steps=12, log_every=4,
                          checkpoint_every=5, out=str(tmp_path / "a.h5"))
    NVT(by_step, calculator=Harmonic(atoms.positions, 1.0)).run()
    assert saved_steps == [0, 5, 10, 12]
    saved_steps.clear()
    by_time = dataclasses.replace(by_step, checkpoint_every=1000, checkpoint_every_s=1e-9,
                                  out=str(tmp_path / "b.h5"))
    NVT(by_time, calculator=Harmonic(atoms.positions, 1.0)).run()
    assert saved_steps == list(range(13))


def test_off_a_terminal_progress_is_plain_lines_at_the_interval(tmp_path, capsys):
    atoms = _argon_cluster()
    ase.io.write(tmp_path / "ar.xyz", atoms)
    settings = NVESettings(structure=str(tmp_path / "ar.xyz"), steps=20, log_every=2,
                           progress_every_s=3600.0, out=str(tmp_path / "run.h5"))
    NVE(settings, calculator=Harmonic(atoms.positions, 1.0)).run()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("nve ")]
    # The first logged frame and the last step; the interval suppresses the rest.
    assert [line.split(",")[0] for line in lines] == [
        "nve run.h5: step 2/20 (0.002 ps)", "nve run.h5: step 20/20 (0.02 ps)"]
    assert all(" ns/day" in line and "ETA " in line and " K" in line for line in lines)
    change = float(lines[-1].split("conserved energy change ")[1].split()[0])
    data = read_trajectory(settings.out)
    expected = (data["conserved_energy"][-1] - data["conserved_energy"][1]) / len(atoms) * 1e3
    assert change == pytest.approx(expected, rel=1e-2, abs=1e-6)


def test_fp32_npt_with_stress_resumes_bit_for_bit_on_two_threads(water_files, tmp_path):
    """The deterministic setting (on by default) makes fp32 sums repeatable."""
    structure, model = water_files
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        common = dict(structure=str(structure), model=str(model), policy="fp32", seed=1,
                      log_every=2, checkpoint_every=100)
        NPT(NPTSettings(**common, steps=12, out=str(tmp_path / "whole.h5"))).run()
        NPT(NPTSettings(**common, steps=6, out=str(tmp_path / "cut.h5"))).run()
        summary = NPT(NPTSettings(**common, steps=12, out=str(tmp_path / "cut.h5"),
                                  resume=True)).run()
    finally:
        torch.set_num_threads(threads)
    assert summary["steps_run"] == 6 and not torch.are_deterministic_algorithms_enabled()
    _assert_same_run(tmp_path / "cut.h5", tmp_path / "whole.h5")
