"""Training pipeline (policies, loss scaling, determinism, metrics) and the shipped water model."""

import copy
import gzip
import json
import shutil
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase.calculators.calculator import CalculatorSetupError
from ase.calculators.fd import calculate_numerical_forces
from mace.calculators import MACECalculator
from mace.tools import AtomicNumberTable
from mace.tools.torch_geometric.dataloader import DataLoader

from mace_lpcalc import LowPrecisionMACECalculator
from mace_lpcalc.models import load_model, model_elements, model_hash
from tiny_models import build_tiny_model
from mace_lpcalc.systems import molecule_ids, water_box
from mace_lpcalc.training.data import make_split
from mace_lpcalc.training.metrics import intra_inter_forces
from mace_lpcalc.training import table as training_table
from mace_lpcalc.training.train import Trainer, prepare_model, train
from mace_lpcalc.precision.training import TRAINING_POLICIES, get_training_policy

SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "systems" / "water_mace.model"
SHIPPED_TEST_SET = SHIPPED_MODEL.parent / "water_reference" / "test.xyz.gz"
TINY_SETTINGS = dict(hidden_irreps="8x0e + 8x1o", max_ell=2, correlation=2, r_max=4.0,
                     num_bessel=6, radial_mlp=(16, 16), mlp_irreps="4x0e")


def labelled_waters(n_frames, seed):
    """8-water boxes labelled by a fixed tiny MACE 'teacher' (REF_ keys, float64)."""
    teacher = MACECalculator(models=build_tiny_model((1, 8), seed=123), device="cpu",
                             default_dtype="float64")
    frames = []
    for index in range(n_frames):
        atoms = water_box(8, seed=seed + index)
        atoms.positions += np.random.default_rng(seed + index).normal(scale=0.05,
                                                                       size=atoms.positions.shape)
        atoms.calc = teacher
        atoms.info["REF_energy"] = atoms.get_potential_energy()
        atoms.info["REF_stress"] = atoms.get_stress()
        atoms.arrays["REF_forces"] = atoms.get_forces()
        atoms.calc = None
        frames.append(atoms)
    return frames


@pytest.fixture(scope="module")
def water_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("water_data")
    paths = {}
    for split, (n_frames, seed) in {"train": (8, 0), "valid": (2, 100), "test": (2, 200)}.items():
        paths[split] = root / f"{split}.xyz"
        ase.io.write(paths[split], labelled_waters(n_frames, seed), format="extxyz")
    return paths


def test_intra_inter_decomposition_analytic():
    masses = np.array([16.0, 1.0, 1.0, 16.0, 1.0, 1.0])
    molecules = np.array([0, 0, 0, 1, 1, 1])
    acceleration = np.array([0.3, -1.0, 2.0])
    rigid_push = masses[:, None] * acceleration  # uniform acceleration: purely inter
    internal = np.array([[0.0, 0, 0], [1.0, 2, 0], [-1.0, -2, 0],  # sums to zero: purely intra
                         [0.5, 0, 0], [-0.25, 0, 1], [-0.25, 0, -1]])
    intra, inter = intra_inter_forces(rigid_push + internal, masses, molecules)
    np.testing.assert_allclose(inter, rigid_push, atol=1e-12)
    np.testing.assert_allclose(intra, internal, atol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        intra_inter_forces(np.zeros((6, 2)), masses, molecules)


def test_molecule_ids_find_each_water():
    atoms = water_box(8, seed=3)
    atoms.positions += 7.0  # molecules now straddle the periodic boundary
    atoms.wrap()
    oxygen = np.arange(0, 24, 3)
    for o in oxygen:  # one O-H bond per molecule thermally stretched to 1.15 Å
        bond = atoms.get_distance(o, o + 1, mic=True, vector=True)
        atoms.positions[o + 1] = atoms.positions[o] + bond * 1.15 / np.linalg.norm(bond)
    ids = molecule_ids(atoms)
    assert len(set(ids)) == 8
    np.testing.assert_array_equal(ids.reshape(8, 3), np.repeat(ids[::3, None], 3, axis=1))


def _trainer(frames, policy_name, seed=0):
    policy = get_training_policy(policy_name)
    saved = torch.get_default_dtype()
    torch.set_default_dtype(policy.master_dtype)
    try:
        split = make_split("train", frames, AtomicNumberTable([1, 8]), TINY_SETTINGS["r_max"])
        model, _ = prepare_model(policy, split, AtomicNumberTable([1, 8]), TINY_SETTINGS,
                                 seed=seed, batch_size=len(frames))
    finally:
        torch.set_default_dtype(saved)
    trainer = Trainer(model, policy, lr=0.01, energy_weight=1.0, forces_weight=10.0,
                      stress_weight=1.0)
    return trainer, split


@pytest.mark.parametrize("policy_name", list(TRAINING_POLICIES))
def test_training_steps_lower_the_loss_under_every_policy(policy_name):
    frames = labelled_waters(2, seed=7)
    trainer, split = _trainer(frames, policy_name)
    batch = next(iter(DataLoader(split.graphs, batch_size=2)))
    before = trainer.loss(split.graphs, batch_size=2)
    results = [trainer.step(batch) for _ in range(12)]
    after = trainer.loss(split.graphs, batch_size=2)
    assert sum(not skipped for _, skipped in results) >= 4
    assert after < 0.85 * before, f"{policy_name}: loss {before:.4g} -> {after:.4g}"
    expected_dtype = torch.float64 if policy_name == "fp64" else torch.float32
    assert all(p.dtype == expected_dtype for p in trainer.model.parameters())


def test_fp16_loss_scaling_skips_a_step_with_inf_gradients():
    frames = labelled_waters(2, seed=7)
    trainer, split = _trainer(frames, "amp-fp16")
    batch = next(iter(DataLoader(split.graphs, batch_size=2)))
    while trainer.step(batch)[1]:  # let the scaler settle below fp16 overflow first
        pass
    parameter = next(trainer.model.parameters())
    before = [p.detach().clone() for p in trainer.model.parameters()]
    scale = trainer.scaler.get_scale()
    hook = parameter.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    _, skipped = trainer.step(batch)
    hook.remove()
    assert skipped
    assert trainer.scaler.get_scale() == scale / 2
    assert all(torch.equal(p, b) for p, b in zip(trainer.model.parameters(), before))
    _, skipped = trainer.step(batch)
    assert not skipped
    assert not torch.equal(next(trainer.model.parameters()), before[0])


def test_training_is_deterministic_and_reports_true_rmse(water_files, tmp_path):
    runs = [train(water_files["train"], water_files["valid"], water_files["test"], tmp_path / name,
                  epochs=2, batch_size=2, ema_decay=0.9, model_settings=TINY_SETTINGS,
                  log=lambda message: None) for name in ("a", "b")]
    assert [h["valid_loss"] for h in runs[0]["history"]] == \
        [h["valid_loss"] for h in runs[1]["history"]]
    models = [load_model(tmp_path / name / "best.model") for name in ("a", "b")]
    assert model_hash(models[0]) == model_hash(models[1])
    assert model_elements(models[0]) == [1, 8]
    assert all(p.dtype == torch.float32 for p in models[0].parameters())
    # Recompute the test-set RMSEs with mace's own calculator on the saved file.
    calc = MACECalculator(model_paths=str(tmp_path / "a" / "best.model"), device="cpu",
                          default_dtype="float32")
    energy_errors, force_errors = [], []
    for atoms in ase.io.read(water_files["test"], index=":"):
        atoms.calc = calc
        energy_errors.append((atoms.get_potential_energy() - atoms.info["REF_energy"]) / len(atoms))
        force_errors.append(atoms.get_forces() - atoms.arrays["REF_forces"])
    reported = runs[0]["rmse"]["test"]
    assert reported["energy_rmse_meV_per_atom"] == pytest.approx(
        1e3 * np.sqrt(np.mean(np.square(energy_errors))), rel=1e-3)
    assert reported["forces_rmse_meV_A"] == pytest.approx(
        1e3 * np.sqrt(np.mean(np.square(force_errors))), rel=1e-3)
    assert reported["forces_intra_rmse_meV_A"] ** 2 + reported["forces_inter_rmse_meV_A"] ** 2 \
        == pytest.approx(reported["forces_rmse_meV_A"] ** 2, rel=0.3)
    # The training table re-evaluates a saved model in its folder's policy and collects it.
    data, run = tmp_path / "data", tmp_path / "table" / "fp32"
    data.mkdir()
    run.mkdir(parents=True)
    for split in ("valid", "test"):
        with open(water_files[split], "rb") as source, gzip.open(data / f"{split}.xyz.gz", "wb") as gz:
            shutil.copyfileobj(source, gz)
    shutil.copy(tmp_path / "a" / "best.model", run / "best.model")
    training_table.main(["--evaluate", str(run), "--data", str(data),
                         "--out", str(tmp_path / "table.json")])
    row, = json.loads((tmp_path / "table.json").read_text())["rows"]
    assert row["policy"] == "fp32" and row["nvt"] == "did not run"
    assert row["test_energy_rmse_meV_per_atom"] == pytest.approx(
        reported["energy_rmse_meV_per_atom"], rel=1e-4)
    assert row["test_forces_rmse_meV_A"] == pytest.approx(reported["forces_rmse_meV_A"], rel=1e-4)


@pytest.fixture(scope="module")
def shipped_model():
    return load_model(SHIPPED_MODEL)


def test_shipped_model_knows_exactly_water(shipped_model):
    assert model_elements(shipped_model) == [1, 8]
    assert SHIPPED_MODEL.stat().st_size < 5_000_000
    assert all(p.dtype == torch.float32 for p in shipped_model.parameters())


def test_shipped_model_forces_match_finite_differences(shipped_model):
    atoms = water_box(8, seed=5)
    atoms.positions += np.random.default_rng(5).normal(scale=0.02, size=atoms.positions.shape)
    atoms.calc = MACECalculator(models=copy.deepcopy(shipped_model).double(), device="cpu",
                                default_dtype="float64")
    forces = atoms.get_forces()
    numerical = calculate_numerical_forces(atoms, eps=1e-4, iatoms=range(0, 24, 5))
    np.testing.assert_allclose(numerical, forces[0:24:5], atol=1e-5 * np.abs(forces).max())


def test_shipped_model_fits_the_held_out_reference(shipped_model):
    calc = LowPrecisionMACECalculator(model_paths=str(SHIPPED_MODEL), policy="fp32")
    errors, references = [], []
    for atoms in ase.io.read(SHIPPED_TEST_SET, index="::15"):
        atoms.calc = calc
        errors.append(atoms.get_forces() - atoms.arrays["REF_forces"])
        references.append(atoms.arrays["REF_forces"])
    relative = np.sqrt(np.mean(np.square(errors)) / np.mean(np.square(references)))
    assert len(errors) >= 8
    assert relative < 0.06  # 3.6 % on the whole test split (systems/water_mace.md)


def test_calculator_refuses_elements_the_water_model_lacks():
    calc = LowPrecisionMACECalculator(model_paths=str(SHIPPED_MODEL), policy="fp32")
    atoms = water_box(8, seed=0)
    atoms.symbols[0] = "C"
    atoms.calc = calc
    with pytest.raises(CalculatorSetupError, match="does not know element.*C"):
        atoms.get_potential_energy()
