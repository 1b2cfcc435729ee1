"""Reference-engine NPT (OpenMM SPC/Fw) and the physical check of MACE runs against it."""

import json

import ase.io
import mdtraj
import numpy as np
import pytest
from scipy import stats

openmm = pytest.importorskip("openmm")

from mace_lpcalc.analysis import (RadialDistribution, first_peak, load_run,  # noqa: E402
                                  timeseries_average)
from mace_lpcalc.analysis.report import production_start_frame  # noqa: E402
from mace_lpcalc.training.reference.check import (DENSITY_TARGET_RELATIVE,  # noqa: E402
                                                  PEAK_WINDOWS_A, compare_groups, main)
from mace_lpcalc.training.reference.npt import (POLICY, ReferenceNPTSettings,  # noqa: E402
                                       forcefield_hash, run_reference_npt, unwrap_step)
from mace_lpcalc.systems import water_box  # noqa: E402
from mace_lpcalc.md.frames import Frame  # noqa: E402
from mace_lpcalc.md.trajectory import TrajectoryWriter, read_trajectory  # noqa: E402

# 16 molecules make a 7.8 Å box, so the cut-off must be below half of it. One CPU thread:
# OpenMM's CPU platform is bit-reproducible only then.
TINY = dict(steps=300, equilibration_ps=0.05, log_every=20, cutoff_A=3.0, platform="CPU",
            threads=1)


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
    """The tiny reference NPT twice with seed 3 and once with seed 4."""
    root = tmp_path_factory.mktemp("reference_npt")
    atoms = water_box(16, seed=1)
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        run_reference_npt(atoms, root / f"{name}.h5", ReferenceNPTSettings(seed=seed, **TINY),
                          equilibrated_out=root / f"{name}.xyz", log=lambda message: None)
        runs[name] = root / name
    return runs


def test_reference_npt_writes_a_readable_npt_trajectory(reference_runs):
    path = reference_runs["a"].with_suffix(".h5")
    trajectory = mdtraj.load(str(path))
    assert (trajectory.n_frames, trajectory.n_atoms, trajectory.n_residues) == (16, 48, 16)
    data = read_trajectory(path)
    assert data.attrs["policy"] == POLICY and data.attrs["protocol"] == "npt"
    assert data.attrs["model_hash"] == forcefield_hash()
    assert data.attrs["settings"]["openmm_seeds"]["barostat"] >= 1
    assert list(data["step"]) == list(range(0, 301, 20))
    # The barostat moves the volume, keeping the cell cubic; the density stays liquid-like.
    assert np.ptp(data["volume"]) > 1.0
    assert np.allclose(trajectory.unitcell_lengths, trajectory.unitcell_lengths[:, :1])
    assert np.all((data["density"] > 0.8) & (data["density"] < 1.2))
    assert np.all((data["temperature"] > 50) & (data["temperature"] < 600))
    assert np.allclose(data["total_energy"], data["potential_energy"] + data["kinetic_energy"])
    # OpenMM gives only the (isotropic) pressure: equal diagonal, no shear.
    stress = data["stress"]
    assert np.all(stress[:, :3] == stress[:, :1]) and np.all(stress[:, 3:] == 0)
    assert np.all(np.abs(data["pressure"]) < 2e4) and np.ptp(data["pressure"]) > 0
    # Unwrapped: molecules whole without minimum image, no jumps between frames.
    xyz = trajectory.xyz.reshape(16, 16, 3, 3) * 10
    bonds = np.linalg.norm(xyz[:, :, 1:] - xyz[:, :, :1], axis=-1)
    assert bonds.max() < 1.3
    assert np.abs(np.diff(trajectory.xyz, axis=0)).max() * 10 < 1.0


def test_same_seed_gives_identical_runs_other_seed_differs(reference_runs):
    a, b, c = (read_trajectory(reference_runs[name].with_suffix(".h5"))
               for name in ("a", "b", "c"))
    for name in ("coordinates", "volume", "potential_energy", "pressure", "temperature"):
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["volume"], c["volume"])


def test_equilibrated_structure_is_wrapped_with_whole_molecules(reference_runs):
    atoms = ase.io.read(reference_runs["a"].with_suffix(".xyz"))
    trajectory = mdtraj.load(str(reference_runs["a"].with_suffix(".h5")))
    assert atoms.get_chemical_symbols() == ["O", "H", "H"] * 16
    # The first production frame is the equilibrated state, up to a cell vector per molecule.
    np.testing.assert_allclose(atoms.cell.lengths(), trajectory.unitcell_lengths[0] * 10,
                               rtol=1e-6)
    molecules = atoms.positions.reshape(16, 3, 3)
    assert np.linalg.norm(molecules[:, 1:] - molecules[:, :1], axis=-1).max() < 1.3
    centres = molecules.mean(axis=1) @ np.linalg.inv(atoms.cell)
    assert np.all((centres >= 0) & (centres < 1))
    shift = (atoms.positions - trajectory.xyz[0] * 10) @ np.linalg.inv(atoms.cell)
    np.testing.assert_allclose(shift, np.round(shift), atol=1e-4)
    assert np.abs(atoms.get_momenta()).max() > 0
    assert atoms.info["policy"] == POLICY


def test_unwrap_step_removes_cell_jumps_while_the_cell_changes():
    cell = np.diag([10.0, 10.0, 10.0])
    new_cell = cell * 1.01
    previous_raw = np.array([[9.9, 5.0, 0.1], [1.0, 2.0, 3.0]])
    previous_unwrapped = previous_raw + [[10.0, 0.0, -10.0], [0.0, 0.0, 0.0]]
    moved = np.array([[0.2, -0.1, 0.05], [0.1, 0.1, 0.1]])
    # Atom 0 crossed x = L and z = 0 and was wrapped back in the new cell by OpenMM.
    raw = previous_raw + moved - [[new_cell[0, 0], 0, -new_cell[2, 2]], [0, 0, 0]]
    unwrapped = unwrap_step(previous_unwrapped, previous_raw, raw, new_cell)
    np.testing.assert_allclose(unwrapped, previous_unwrapped + moved)


@pytest.mark.parametrize("centre_A", [2.8, 2.8137])
def test_first_peak_in_a_window_recovers_a_gaussian_peak_between_bins(centre_A):
    r_A = np.arange(0.025, 6.0, 0.05)
    g = 3.0 * np.exp(-0.5 * ((r_A - centre_A) / 0.12) ** 2) + 1e-12
    position_A, height = first_peak(RadialDistribution(("O", "O"), r_A, g, 0.03),
                                    PEAK_WINDOWS_A["O-O first"][1])
    assert abs(position_A - centre_A) < 0.005
    assert height == pytest.approx(3.0, rel=1e-3)


def test_first_peak_refuses_a_window_without_a_maximum():
    r_A = np.arange(0.025, 6.0, 0.05)
    rdf = RadialDistribution(("O", "O"), r_A, np.exp(-r_A), 0.03)
    with pytest.raises(ValueError, match="2.4–3.3 Å: no peak inside"):
        first_peak(rdf, (2.4, 3.3))


def _constructed_run(path, density_means, seed):
    """A 16-water NPT-like file whose density is ``mean + noise`` frame by frame."""
    atoms = water_box(16, seed=1)
    mass_g = atoms.get_masses().sum() * 1.66053906660e-24
    rng = np.random.default_rng(seed)
    metadata = {"protocol": "npt", "policy": "fp32", "seed": seed, "backend": "e3nn"}
    with TrajectoryWriter.create(path, atoms, metadata) as writer:
        for step, density in enumerate(density_means + rng.normal(0, 0.002, len(density_means))):
            side = (mass_g / density * 1e24) ** (1 / 3)
            scale = side / atoms.cell[0, 0]
            writer.append(Frame(step=step, time_ps=step * 0.01, positions_A=atoms.positions * scale,
                                potential_energy_eV=0.0, kinetic_energy_eV=1.0,
                                conserved_energy_eV=1.0, temperature_K=300.0,
                                wall_time_per_step_s=1e-3, cell_A=np.eye(3) * side,
                                stress_eV_A3=np.zeros(6)))
    return read_trajectory(path)["density"]


def test_density_comparison_of_constructed_runs(tmp_path):
    reference = _constructed_run(tmp_path / "ref.h5", np.full(64, 1.00), seed=0)
    test = _constructed_run(tmp_path / "run.h5", np.full(64, 0.97), seed=1)
    out = tmp_path / "check.json"
    main([str(tmp_path / "ref.h5"), str(tmp_path / "run.h5"), "--out", str(out),
          "--discard-fraction", "0", "--segments", "2"])
    result = json.loads(out.read_text())
    ref_average, test_average = timeseries_average(reference), timeseries_average(test)
    ref_density = result["reference"]["density_g_cm3"]
    assert ref_density["mean"] == pytest.approx(ref_average.mean)
    assert ref_density["stderr"] == pytest.approx(ref_average.stderr)
    assert ref_density["statistical_inefficiency"] == pytest.approx(
        ref_average.statistical_inefficiency)
    assert ref_density["reliable"] is True
    group = result["groups"]["fp32"]
    assert group["density_g_cm3"]["error_kind"] == "run"
    assert group["density_g_cm3"]["unreliable_runs"] == []
    relative = group["density_relative_difference"]
    assert relative["value"] == pytest.approx(test_average.mean / ref_average.mean - 1)
    assert relative["value"] == pytest.approx(-0.03, abs=0.002)
    assert relative["stderr"] == pytest.approx(
        np.hypot(ref_average.stderr, test_average.stderr) / ref_average.mean)
    # 3 % off, known to a few hundredths of a percent: the interval lies beyond −2 %.
    assert relative["met"] is False and relative["verdict"] == "different"
    assert relative["ci90"][1] < -DENSITY_TARGET_RELATIVE
    assert relative["extra_ps"] == 0.0
    # Without --discard-fraction each run's production starts where compare puts it.
    main([str(tmp_path / "ref.h5"), str(tmp_path / "run.h5"), "--out", str(out),
          "--segments", "2"])
    detected = json.loads(out.read_text())
    assert detected["settings"]["discard_fraction"] is None
    for summary in detected["runs"]:
        run = load_run(summary["path"])
        assert summary["n_frames_used"] == run.n_frames - production_start_frame(run)
    main([str(tmp_path / "ref.h5"), "--out", str(out), "--discard-fraction", "0.25",
          "--segments", "2"])
    assert json.loads(out.read_text())["reference"]["n_frames_used"] == 48
    with pytest.raises(SystemExit, match=r"must lie in \[0, 1\)"):
        main([str(tmp_path / "ref.h5"), "--discard-fraction", "1"])
    # Without runs only the reference is summarised.
    main([str(tmp_path / "ref.h5"), "--out", str(out), "--discard-fraction", "0",
          "--segments", "2"])
    alone = json.loads(out.read_text())
    assert "groups" not in alone and alone["reference"]["density_g_cm3"] == \
        result["reference"]["density_g_cm3"]


def test_seed_average_and_verdicts_per_group():
    def summary(mean, stderr, seed, oo_peak_A):
        peak = {"position_A": oo_peak_A, "position_stderr_A": 0.004, "height": 3.0,
                "height_stderr": 0.05}
        return {"seed": seed, "path": f"run{seed}.h5", "time_used_ps": [10.0, 60.0],
                "density_g_cm3": {"mean": mean, "stderr": stderr, "reliable": seed != 2},
                "rdf_peaks": {name: peak for name in PEAK_WINDOWS_A}}

    reference = summary(1.000, 0.002, 0, 2.80)
    runs = [summary(0.985, 0.003, 1, 2.83), summary(0.995, 0.003, 2, 2.85),
            summary(1.050, 0.004, 1, 2.90)]
    result = compare_groups(reference, runs, ["fp32", "fp32", "bf16"])
    fp32, bf16 = result["fp32"], result["bf16"]
    # Two seeds: the error is their spread, std / √2 = 0.005.
    assert fp32["density_g_cm3"]["mean"] == pytest.approx(0.990)
    assert fp32["density_g_cm3"]["stderr"] == pytest.approx(0.005)
    relative = fp32["density_relative_difference"]
    assert relative["value"] == pytest.approx(-0.010)
    assert relative["stderr"] == pytest.approx(np.hypot(0.005, 0.002))
    assert fp32["density_g_cm3"]["unreliable_runs"] == ["run2.h5"]
    # −1 % ± 0.54 %: the 90 % interval (normal quantile, one reference run) lies inside ±2 %.
    assert relative["met"] and relative["verdict"] == "equivalent"
    half_width = stats.norm.ppf(0.95) * np.hypot(0.005, 0.002)
    assert relative["ci90"] == pytest.approx([-0.010 - half_width, -0.010 + half_width])
    shift = fp32["rdf_peaks"]["O-O first"]["position_difference_A"]
    assert shift["value"] == pytest.approx(0.04) and shift["met"]
    # 0.04 ± 0.011 Å: the interval reaches past 0.05 Å, so more production time is needed.
    assert shift["verdict"] == "inconclusive"
    assert shift["stderr"] == pytest.approx(np.hypot(0.01, 0.004))
    k = (stats.norm.ppf(0.95) * shift["stderr"] / 0.01) ** 2
    assert shift["extra_ps"] == pytest.approx((k - 1) * 100.0)
    # Peaks without a target get a difference and its test of a zero shift.
    untargeted = fp32["rdf_peaks"]["O-H intramolecular"]["position_difference_A"]
    assert untargeted["value"] == pytest.approx(0.04) and "verdict" not in untargeted
    assert 0 < untargeted["p_value"] < 1
    # One run: its own error; 5 % and 0.1 Å are outside the targets by far.
    assert bf16["density_relative_difference"]["stderr"] == pytest.approx(np.hypot(0.004, 0.002))
    assert not bf16["density_relative_difference"]["met"]
    assert bf16["density_relative_difference"]["verdict"] == "different"
    assert not bf16["rdf_peaks"]["O-O first"]["position_difference_A"]["met"]
    assert bf16["rdf_peaks"]["O-O first"]["position_difference_A"]["verdict"] == "different"
