"""Batched replicas: several configurations of one system in one model call.

The invariant is "batched equals single": every replica's energy, forces and stress
from one batched evaluation equal those of evaluating it alone (and mace's calculator),
for replicas with different positions, cells, neighbour counts and rebuild histories.
"""

import dataclasses

import mace  # noqa: F401  -- before e3nn
import numpy as np
import pytest
from ase.stress import voigt_6_to_full_3x3_stress
from mace.calculators import MACECalculator

from mace_lpcalc.fastpath.engine import MACEEngine
from mace_lpcalc.models import build_tiny_model
from mace_lpcalc.systems import diamond, water_box

ELEMENTS = (1, 6, 8)
R_MAX = 4.0

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(ELEMENTS, r_max=R_MAX)


@pytest.fixture(scope="module")
def reference(model):
    return MACECalculator(models=model, device="cpu", default_dtype="float64")


def _replicas(build, n_replicas, strain=0.03):
    """Rattled copies of one structure, each in a differently strained cell."""
    replicas = []
    for index in range(n_replicas):
        atoms = build()
        deformation = np.eye(3) + strain * np.random.default_rng(index).uniform(-1, 1, (3, 3))
        atoms.set_cell(atoms.cell.array @ deformation, scale_atoms=True)
        atoms.rattle(0.05, seed=10 + index)
        replicas.append(atoms)
    return replicas


def _mace(reference, atoms):
    atoms = atoms.copy()
    atoms.calc = reference
    return {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces(),
            "stress": voigt_6_to_full_3x3_stress(atoms.get_stress())}


def _batched(engine, replicas):
    return engine.compute_replicas(np.stack([atoms.positions for atoms in replicas]),
                                   replicas[0].numbers,
                                   np.stack([atoms.cell.array for atoms in replicas]),
                                   replicas[0].pbc, compute_stress=True)


def _assert_same(ours, theirs, tolerance=1e-10):
    assert abs(ours["energy"] - theirs["energy"]) < tolerance
    np.testing.assert_allclose(ours["forces"], theirs["forces"], rtol=0, atol=tolerance)
    np.testing.assert_allclose(ours["stress"], theirs["stress"], rtol=0, atol=tolerance)


@pytest.mark.parametrize("build", [lambda: water_box(8), lambda: diamond(1)],
                         ids=["water", "diamond_small_cell"])
def test_batched_replicas_equal_each_replica_alone(model, reference, build):
    replicas = _replicas(build, 3)
    engine = MACEEngine(model, z_table_atomic_numbers=ELEMENTS, r_max=R_MAX, skin_A=0.5)
    alone = MACEEngine(model, z_table_atomic_numbers=ELEMENTS, r_max=R_MAX, skin_A=0.5)
    batched = _batched(engine, replicas)
    assert len(batched) == 3
    energies = [result["energy"] for result in batched]
    assert len(set(energies)) == 3  # the replicas really differ
    for atoms, ours in zip(replicas, batched):
        _assert_same(ours, _mace(reference, atoms))
        single = alone.compute(atoms.positions, atoms.numbers, atoms.cell.array, atoms.pbc,
                               compute_stress=True)
        _assert_same(ours, single)
        assert ours["node_energy"].shape == (len(atoms),)
        np.testing.assert_allclose(ours["node_energy"].sum(), ours["energy"], atol=1e-10)


def test_one_replica_rebuilding_leaves_the_others_lists(model, reference):
    replicas = _replicas(lambda: water_box(8), 3)
    engine = MACEEngine(model, z_table_atomic_numbers=ELEMENTS, r_max=R_MAX, skin_A=0.5)
    _batched(engine, replicas)
    assert engine.neighbors.n_builds == 3
    # Replica 1 moves past half the skin (rebuild); the others move a little (no rebuild).
    replicas[1].positions[0] += (0.4, 0.0, 0.0)
    for atoms in (replicas[0], replicas[2]):
        atoms.positions += 0.01
    batched = _batched(engine, replicas)
    assert engine.neighbors.n_builds == 4
    for atoms, ours in zip(replicas, batched):
        _assert_same(ours, _mace(reference, atoms))


def test_replica_count_change_and_bad_shapes(model, reference):
    engine = MACEEngine(model, z_table_atomic_numbers=ELEMENTS, r_max=R_MAX)
    replicas = _replicas(lambda: water_box(8), 4)
    for count in (4, 2):
        for atoms, ours in zip(replicas, _batched(engine, replicas[:count])):
            _assert_same(ours, _mace(reference, atoms))
    atoms = replicas[0]
    with pytest.raises(ValueError, match=r"cells must have shape \(2, 3, 3\)"):
        engine.compute_replicas(np.stack([atoms.positions] * 2), atoms.numbers,
                                atoms.cell.array[None], True)
    with pytest.raises(ValueError, match="n_replicas >= 1"):
        engine.compute_replicas(atoms.positions, atoms.numbers, atoms.cell.array[None], True)


# ------------------------------------------------------------------ the calculator

def _calculator(model_factory, **kwargs):
    from mace_lpcalc import LowPrecisionMACECalculator
    return LowPrecisionMACECalculator(models=model_factory(), policy="fp64", **kwargs)


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast_path", "mace_path"])
def test_calculator_replicas_equal_single_calls(tiny_model_factory, fast_path):
    calculator = _calculator(tiny_model_factory, fast_path=fast_path)
    replicas = _replicas(lambda: water_box(8, seed=1), 3)
    batched = calculator.calculate_replicas(replicas, ["energy", "forces", "stress"])
    for atoms, ours in zip(replicas, batched):
        atoms.calc = calculator
        assert ours["energy"] == pytest.approx(atoms.get_potential_energy(), abs=1e-10)
        np.testing.assert_allclose(ours["forces"], atoms.get_forces(), rtol=0, atol=1e-10)
        np.testing.assert_allclose(ours["stress"], atoms.get_stress(), rtol=0, atol=1e-10)


def test_calculator_replicas_refuse_mixed_atoms_and_report_the_failing_replica(
        tiny_model_factory):
    from ase.calculators.calculator import CalculationFailed
    calculator = _calculator(tiny_model_factory)
    replicas = _replicas(lambda: water_box(8, seed=1), 2)
    with pytest.raises(ValueError, match="same atoms"):
        calculator.calculate_replicas([replicas[0], replicas[1][:-3]])
    replicas[1].positions[1] = replicas[1].positions[0] + 0.05  # two atoms on top of each other
    good, bad = (np.linalg.norm(result["forces"], axis=1).max()
                 for result in calculator.calculate_replicas(replicas))
    assert bad > 1.2 * good  # (the tiny model is smooth: overlapping atoms are not extreme)
    calculator.max_force_eV_A = (good + bad) / 2
    with pytest.raises(CalculationFailed, match="replica 1: exploding forces"):
        calculator.calculate_replicas(replicas)


# ------------------------------------------------------------------ MD

def _md_settings(tmp_path, settings_class, seed, **overrides):
    return settings_class(structure=str(tmp_path / "water.xyz"), policy="fp64",
                          steps=overrides.pop("steps", 12), log_every=3, checkpoint_every=6,
                          sentinel_every=0, seed=seed,
                          out=str(tmp_path / f"run_seed{seed}.h5"), **overrides)


def _final_state(path):
    from mace_lpcalc.md.checkpoint import Checkpoint, checkpoint_path
    checkpoint = Checkpoint.load(checkpoint_path(path))
    return checkpoint.step, checkpoint.atoms.positions, checkpoint.atoms.cell.array


@pytest.mark.parametrize("ensemble", ["nvt", "npt"])
def test_batched_replica_runs_equal_separate_runs(tiny_model_factory, tmp_path, ensemble):
    import ase.io

    from mace_lpcalc.md.npt import NPT, NPTSettings
    from mace_lpcalc.md.nvt import NVT, NVTSettings
    from mace_lpcalc.md.replicas import run_replicas
    from mace_lpcalc.md.trajectory import read_trajectory

    protocol, settings_class = {"nvt": (NVT, NVTSettings), "npt": (NPT, NPTSettings)}[ensemble]
    ase.io.write(tmp_path / "water.xyz", water_box(8, seed=1))
    summaries = run_replicas(protocol, [_md_settings(tmp_path, settings_class, seed)
                                        for seed in (0, 1, 2)],
                             calculator=_calculator(tiny_model_factory))
    # One model call per force evaluation for all three (NPT: forces and stress together).
    assert [summary["replica_batch"]["mean_replicas_per_call"] for summary in summaries] \
        == [3.0] * 3
    assert summaries[0]["replica_batch"]["model_calls"] == 12 + 1
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "water.xyz").write_bytes((tmp_path / "water.xyz").read_bytes())
    finals = []
    for seed in (0, 1, 2):
        protocol(_md_settings(alone, settings_class, seed),
                 calculator=_calculator(tiny_model_factory)).run()
        batched, single = (_final_state(folder / f"run_seed{seed}.h5")
                           for folder in (tmp_path, alone))
        assert batched[0] == single[0] == 12
        np.testing.assert_allclose(batched[1], single[1], rtol=0, atol=1e-8)
        np.testing.assert_allclose(batched[2], single[2], rtol=0, atol=1e-8)
        np.testing.assert_allclose(
            read_trajectory(tmp_path / f"run_seed{seed}.h5")["potential_energy"],
            read_trajectory(alone / f"run_seed{seed}.h5")["potential_energy"], atol=1e-8)
        finals.append(batched[1])
    assert not np.allclose(finals[0], finals[1])  # the seeds really differ
    if ensemble == "npt":
        assert not np.allclose(_final_state(tmp_path / "run_seed0.h5")[2],
                               water_box(8, seed=1).cell.array)  # the cells moved


def test_replicas_resume_from_their_checkpoints(tiny_model_factory, tmp_path):
    import ase.io

    from mace_lpcalc.md.nvt import NVT, NVTSettings
    from mace_lpcalc.md.replicas import run_replicas

    ase.io.write(tmp_path / "water.xyz", water_box(8, seed=1))
    first = [_md_settings(tmp_path, NVTSettings, seed, steps=6) for seed in (0, 1)]
    run_replicas(NVT, first, calculator=_calculator(tiny_model_factory))
    resumed = [_md_settings(tmp_path, NVTSettings, seed, steps=12, resume=True)
               for seed in (0, 1)]
    run_replicas(NVT, resumed, calculator=_calculator(tiny_model_factory))
    straight = tmp_path / "straight"
    straight.mkdir()
    (straight / "water.xyz").write_bytes((tmp_path / "water.xyz").read_bytes())
    run_replicas(NVT, [_md_settings(straight, NVTSettings, seed) for seed in (0, 1)],
                 calculator=_calculator(tiny_model_factory))
    for seed in (0, 1):
        resumed_state, straight_state = (_final_state(folder / f"run_seed{seed}.h5")
                                         for folder in (tmp_path, straight))
        assert resumed_state[0] == straight_state[0] == 12
        np.testing.assert_allclose(resumed_state[1], straight_state[1], rtol=0, atol=1e-8)


def test_a_failing_replica_stops_alone_and_is_named(tiny_model_factory, tmp_path):
    import ase.io
    from ase.calculators.calculator import CalculationFailed

    from mace_lpcalc.md.nvt import NVT, NVTSettings
    from mace_lpcalc.md.replicas import run_replicas
    from mace_lpcalc.md.trajectory import read_trajectory

    good = water_box(8, seed=1)
    bad = good.copy()
    bad.positions[1] = bad.positions[0] + 0.05
    ase.io.write(tmp_path / "water.xyz", good)
    ase.io.write(tmp_path / "bad.xyz", bad)
    settings = [_md_settings(tmp_path, NVTSettings, 0, max_force_eV_A=0.06),
                dataclasses.replace(_md_settings(tmp_path, NVTSettings, 1, max_force_eV_A=0.06),
                                    structure=str(tmp_path / "bad.xyz"))]
    with pytest.raises(CalculationFailed, match="exploding") as failure:
        run_replicas(NVT, settings, calculator=_calculator(tiny_model_factory))
    assert "1 of 2 replicas failed" in str(failure.value.__notes__)
    assert "run_seed1.h5" in str(failure.value.__notes__)
    assert read_trajectory(tmp_path / "run_seed0.h5")["step"][-1] == 12  # the good one finished


def test_replica_settings_must_share_the_calculator(tmp_path):
    from mace_lpcalc.md.nvt import NVTSettings
    from mace_lpcalc.md.replicas import check_replica_settings

    base = _md_settings(tmp_path, NVTSettings, 0)
    with pytest.raises(ValueError, match=r"differs in: policy = 'fp32'"):
        check_replica_settings([base, dataclasses.replace(_md_settings(tmp_path, NVTSettings, 1),
                                                          policy="fp32")])
    with pytest.raises(ValueError, match="different files"):
        check_replica_settings([base, dataclasses.replace(base, seed=3)])
    with pytest.raises(ValueError, match="sentinel_every = 0"):
        check_replica_settings([dataclasses.replace(base, sentinel_every=100)])
    with pytest.raises(ValueError, match="policy 'auto'"):
        check_replica_settings([dataclasses.replace(base, policy="auto")])


def test_command_line_runs_seeds_side_by_side(tmp_path, capsys):
    import ase.io

    from mace_lpcalc.md.cli import main
    from mace_lpcalc.md.nvt import NVT
    from mace_lpcalc.md.trajectory import read_trajectory

    ase.io.write(tmp_path / "water.xyz", water_box(8, seed=1))
    common = [str(tmp_path / "water.xyz"), "--steps", "4", "--log-every", "2", "--seed", "5",
              "--out", str(tmp_path / "nvt.h5")]
    summaries = main(NVT, [*common, "--replicas", "2"])
    assert [summary["path"] for summary in summaries] == [
        str(tmp_path / "nvt_seed5.h5"), str(tmp_path / "nvt_seed6.h5")]
    first, second = (read_trajectory(tmp_path / f"nvt_seed{seed}.h5") for seed in (5, 6))
    assert first.attrs["seed"] == 5 and second.attrs["seed"] == 6
    assert list(first["step"]) == [0, 2, 4]
    assert not np.allclose(first["kinetic_energy"], second["kinetic_energy"])
    with pytest.raises(SystemExit, match="sentinel_every = 0"):
        main(NVT, [*common, "--replicas", "2", "--sentinel-every", "100", "--overwrite"])


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("policy, tolerance", [("fp64", 1e-9), ("fp32", 1e-4)])
def test_cuda_batched_replicas_equal_single_calls(tiny_model_factory, policy, tolerance):
    from mace_lpcalc import LowPrecisionMACECalculator
    batched_calculator, single_calculator = (
        LowPrecisionMACECalculator(models=tiny_model_factory(), policy=policy, device="cuda")
        for _ in range(2))
    replicas = _replicas(lambda: water_box(64, seed=1), 4)
    for step in range(3):  # the second and third calls replay the captured graph
        for atoms in replicas:
            atoms.positions += 0.01 * np.random.default_rng(step).normal(size=atoms.positions.shape)
        batched = batched_calculator.calculate_replicas(replicas, ["energy", "forces", "stress"])
        for atoms, ours in zip(replicas, batched):
            atoms.calc = single_calculator
            forces = atoms.get_forces()
            assert ours["energy"] == pytest.approx(atoms.get_potential_energy(),
                                                   rel=tolerance)
            assert np.abs(ours["forces"] - forces).max() <= tolerance * np.abs(forces).max()
            assert np.abs(ours["stress"] - atoms.get_stress()).max() \
                <= tolerance * np.abs(atoms.get_stress()).max()
    engine = batched_calculator.engine
    assert engine.last_call_replayed_graph and engine.n_graph_captures >= 1


def test_the_python_benchmark_s_stand_in_drives_batched_runs_to_their_end(tmp_path):
    """perf.replica_python times batched runs whose calculator answers instantly."""
    from mace_lpcalc.md.nvt import NVT, NVTSettings
    from mace_lpcalc.md.replicas import run_replicas
    from mace_lpcalc.md.trajectory import read_trajectory
    from mace_lpcalc.perf.replica_python import InstantAnswers, seconds_for

    structure = tmp_path / "water.xyz"
    water_box(8, seed=0).write(structure)
    settings = [NVTSettings(structure=str(structure), out=str(tmp_path / f"r{seed}.h5"),
                            steps=4, log_every=2, seed=seed, checkpoint_every=100,
                            sentinel_every=0)
                for seed in range(3)]
    run_replicas(NVT, settings, calculator=InstantAnswers())
    for one in settings:
        trajectory = read_trajectory(one.out)
        assert list(trajectory["step"]) == [0, 2, 4]
        assert not trajectory["potential_energy"].any()
    assert seconds_for("npt", 2, 3, str(structure)) > 0
