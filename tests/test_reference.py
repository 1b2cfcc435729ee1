"""SPC/Fw reference data: parameters, determinism, forces and stress vs finite differences."""

import gzip
import json

import ase.io
import numpy as np
import pytest
from ase.calculators.calculator import CalculatorSetupError
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress
from scipy.spatial.transform import Rotation

openmm = pytest.importorskip("openmm")

from mace_lpcalc.training.reference import SPCFwCalculator, spcfw_forcefield  # noqa: E402
from mace_lpcalc.training.reference.generate import generate, initial_water  # noqa: E402
from mace_lpcalc.training.reference.spcfw import water_topology  # noqa: E402

TINY = dict(n_molecules=8, n_frames=20, temperatures_K=(300.0, 400.0), densities_g_cm3=(1.0,),
            stride_fs=10.0, equilibration_ps=0.05, cutoff_A=3.0)


@pytest.fixture(scope="module")
def tiny_sets(tmp_path_factory):
    """The tiny data set generated twice with seed 0 and once with seed 1."""
    root = tmp_path_factory.mktemp("reference")
    quiet = dict(TINY, log=lambda message: None)
    return {name: (root / name, generate(root / name, seed=seed, **quiet))
            for name, seed in (("a", 0), ("b", 0), ("c", 1))}


def read(directory, split):
    return ase.io.read(str(directory / f"{split}.xyz.gz"), index=":")


def test_forcefield_holds_published_spcfw_parameters():
    topology = water_topology(1)
    topology.setPeriodicBoxVectors(np.eye(3) * 2.0)
    system = spcfw_forcefield().createSystem(topology, rigidWater=False, constraints=None)
    forces = {type(f).__name__: f for f in system.getForces()}
    kcal = 4.184
    _, _, length, k = forces["HarmonicBondForce"].getBondParameters(0)
    assert length._value * 10 == pytest.approx(1.012)
    assert k._value / kcal / 100 == pytest.approx(1059.162)  # kJ/mol/nm² -> kcal/mol/Å²
    *_, angle, k_angle = forces["HarmonicAngleForce"].getAngleParameters(0)
    assert np.degrees(angle._value) == pytest.approx(113.24)
    assert k_angle._value / kcal == pytest.approx(75.90)
    charge_o, sigma_o, epsilon_o = forces["NonbondedForce"].getParticleParameters(0)
    charge_h, _, epsilon_h = forces["NonbondedForce"].getParticleParameters(1)
    assert (charge_o._value, charge_h._value, epsilon_h._value) == (-0.82, 0.41, 0.0)
    assert sigma_o._value * 10 == pytest.approx(3.165492)
    assert epsilon_o._value / kcal == pytest.approx(0.1554253)


def test_same_seed_gives_identical_files_other_seed_differs(tiny_sets):
    (dir_a, manifest_a), (dir_b, manifest_b) = tiny_sets["a"], tiny_sets["b"]
    manifest_c = tiny_sets["c"][1]
    for name in ("train.xyz.gz", "valid.xyz.gz", "test.xyz.gz"):
        assert (dir_a / name).read_bytes() == (dir_b / name).read_bytes()
        assert manifest_a["files"][name] == manifest_b["files"][name]
        assert manifest_a["files"][name]["sha256"] != manifest_c["files"][name]["sha256"]
    assert json.loads((dir_a / "manifest.json").read_text())["files"] == manifest_a["files"]
    assert gzip.decompress((dir_a / "test.xyz.gz").read_bytes()).startswith(b"24\n")


def test_split_is_by_block_with_a_gap(tiny_sets):
    directory, manifest = tiny_sets["a"]
    frames = {split: read(directory, split) for split in ("train", "valid", "test")}
    assert [len(frames[s]) for s in ("train", "valid", "test")] == [16, 2, 2]
    assert sum(f["frames"] for f in manifest["files"].values()) == TINY["n_frames"]
    for trajectory in (0, 1):
        times = {split: np.array([a.info["time_ps"] for a in frames[split]
                                  if a.info["trajectory"] == trajectory]) for split in frames}
        assert [len(times[s]) for s in ("train", "valid", "test")] == [8, 1, 1]
        held_out = np.concatenate([times["valid"], times["test"]])
        gap = np.abs(held_out[:, None] - times["train"][None, :]).min()
        assert gap >= 2 * TINY["stride_fs"] / 1000 - 1e-9  # never adjacent to a training frame


def test_labels_are_consistent_with_the_energy(tiny_sets):
    directory, _ = tiny_sets["a"]
    atoms = read(directory, "test")[0]
    assert atoms.get_chemical_formula() == "H16O8"
    calc = SPCFwCalculator(cutoff_A=TINY["cutoff_A"])
    atoms.calc = calc
    assert atoms.get_potential_energy() == pytest.approx(atoms.info["REF_energy"], abs=1e-9)
    np.testing.assert_allclose(atoms.get_forces(), atoms.arrays["REF_forces"], atol=1e-7)
    numerical_forces = calculate_numerical_forces(atoms, eps=1e-4)
    np.testing.assert_allclose(numerical_forces, atoms.arrays["REF_forces"], atol=2e-4)
    # ASE's finite differences strain the cell symmetrically (so the cell rotates out of
    # OpenMM's box form); our stress uses upper-triangular strains: the two must agree.
    numerical_stress = calculate_numerical_stress(atoms, eps=1e-5)
    np.testing.assert_allclose(numerical_stress, atoms.info["REF_stress"], atol=1e-7)
    assert np.abs(atoms.info["REF_stress"]).max() > 1e-4  # a non-trivial stress was tested


def test_rotated_triclinic_cell_gives_rotated_results():
    atoms = initial_water(8, 1.0)
    atoms.set_cell(atoms.cell @ np.array([[1.0, 0.05, 0.0], [0.0, 1.0, -0.03], [0.02, 0.0, 1.0]]),
                   scale_atoms=True)
    atoms.calc = SPCFwCalculator(cutoff_A=2.9)
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    stress = atoms.get_stress(voigt=False)
    rotation = Rotation.from_euler("xyz", [30, -50, 70], degrees=True).as_matrix()
    rotated = atoms.copy()
    rotated.set_cell(atoms.cell @ rotation.T)
    rotated.positions = atoms.positions @ rotation.T
    rotated.calc = SPCFwCalculator(cutoff_A=2.9)
    assert rotated.get_potential_energy() == pytest.approx(energy, abs=1e-9)
    np.testing.assert_allclose(rotated.get_forces(), forces @ rotation.T, atol=1e-7)
    np.testing.assert_allclose(rotated.get_stress(voigt=False), rotation @ stress @ rotation.T,
                               atol=1e-9)


def test_bad_inputs_are_refused():
    water = initial_water(8, 1.0)
    with pytest.raises(CalculatorSetupError, match="twice the 4.5 Å cut-off"):
        water.calc = SPCFwCalculator()
        water.get_potential_energy()
    methanol_like = water.copy()
    methanol_like.symbols[0] = "C"
    with pytest.raises(CalculatorSetupError, match="O, H, H per water"):
        methanol_like.calc = SPCFwCalculator(cutoff_A=3.0)
        methanol_like.get_potential_energy()
    with pytest.raises(ValueError, match="multiple of 20"):
        generate("unused", n_frames=25, temperatures_K=(300, 350), densities_g_cm3=(1.0,))
