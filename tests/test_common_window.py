"""compare analyses every run only up to the end of the shortest, so that a group run for
longer does not differ from a shorter one merely because the system was still drifting."""

import json

import numpy as np
from ase import units

from mace_lpcalc.analysis.compare import main
from mace_lpcalc.analysis.runs import cut_to_time, load_run
from mace_lpcalc.md.frames import Frame
from mace_lpcalc.md.trajectory import TrajectoryWriter
from mace_lpcalc.systems import water_box


def _drifting_run(path, *, policy, seed, n_frames):
    """NPT-like frames whose box shrinks for all of the run (density rising 0.5 % per
    frame-block); the series depend on the seed only, so a shorter run of the same seed
    is the first part of a longer one."""
    rng = np.random.default_rng(seed)
    atoms = water_box(8, seed=0)
    noise = rng.normal(0, 1e-3, 200)
    with TrajectoryWriter.create(path, atoms, {
            "protocol": "npt", "policy": policy, "backend": "e3nn", "seed": seed,
            "model_hash": "0" * 64, "settings": {"timestep_fs": 1.0},
            "versions": {"mace_lpcalc": "test"}}) as writer:
        for i in range(n_frames):
            scale = (1 - 2e-4 * i) * (1 + noise[i])
            writer.append(Frame(
                step=10 * i, time_ps=0.01 * i, positions_A=atoms.positions * scale,
                potential_energy_eV=-4.0 * len(atoms) + noise[i + 1],
                kinetic_energy_eV=1.5 * len(atoms) * units.kB * 300,
                conserved_energy_eV=-3.0 * len(atoms), temperature_K=300.0 + noise[i + 2],
                wall_time_per_step_s=0.01, cell_A=np.array(atoms.cell) * scale,
                stress_eV_A3=np.zeros(6)))
    return path


def _density_difference(paths, out, *extra):
    assert main([*map(str, paths), "--out-dir", str(out), "--discard-fraction", "0", *extra]) == 0
    certificate = json.loads((out / "certificate.json").read_text())
    return (certificate["policies"]["fp32"]["density"]["difference"],
            (out / "summary.md").read_text())


def test_runs_of_different_length_are_compared_over_the_same_time(tmp_path):
    paths = [_drifting_run(tmp_path / f"{policy}_{seed}.h5", policy=policy, seed=seed,
                           n_frames=n_frames)
             for policy, n_frames in (("fp64", 120), ("fp32", 60)) for seed in (1, 2)]
    difference, summary = _density_difference(paths, tmp_path / "window")
    assert abs(difference) < 1e-9  # the same frames on both sides
    assert "analysed up to 0.59 ps" in summary
    full_difference, _ = _density_difference(paths, tmp_path / "full", "--full-runs")
    assert full_difference < -0.3  # % : the longer fp64 runs went on densifying


def test_cut_to_time_keeps_frames_up_to_the_time_and_refuses_too_few(tmp_path):
    run = load_run(_drifting_run(tmp_path / "run.h5", policy="fp64", seed=1, n_frames=30))
    cut = cut_to_time(run, 0.105)
    assert cut.n_frames == 11 and cut.series["density"].shape == (11,)
    np.testing.assert_array_equal(cut.series["density"], run.series["density"][:11])
    assert cut_to_time(run, 1.0) is run
    try:
        cut_to_time(run, 0.001)
    except ValueError as err:
        assert "fewer than two frames" in str(err)
    else:
        raise AssertionError("a cut to one frame was accepted")
