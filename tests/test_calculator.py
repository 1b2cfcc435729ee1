"""LowPrecisionMACECalculator against mace's own calculator, finite differences and symmetry."""

import numpy as np
import pytest
import torch
from ase.calculators.calculator import CalculationFailed, CalculatorSetupError
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS
from ase import units
from mace.calculators import MACECalculator
from scipy.spatial.transform import Rotation

from mace_lpcalc import LowPrecisionMACECalculator
from mace_lpcalc.md.inputs import build_calculator
from mace_lpcalc.md.nvt import NVTSettings
from mace_lpcalc.precision.policies import POLICIES


def evaluate(calc, atoms):
    atoms = atoms.copy()
    atoms.calc = calc
    return atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()


def relative(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("fast_path", [False, True])
def test_fp64_equals_mace_calculator(fast_path, tiny_model_factory, water8):
    reference = MACECalculator(models=tiny_model_factory(), device="cpu", default_dtype="float64")
    ours = LowPrecisionMACECalculator(models=tiny_model_factory(), policy="fp64", backend="e3nn",
                                      fast_path=fast_path)
    assert ours.parameters["fast_path"] is fast_path
    e_ref, f_ref, s_ref = evaluate(reference, water8)
    e, f, s = evaluate(ours, water8)
    assert abs(e - e_ref) <= 1e-10 * abs(e_ref)
    assert relative(f, f_ref) <= 1e-10
    assert relative(s, s_ref) <= 1e-10


def test_fp32_within_float32_rounding(tiny_model_factory, water8):
    e64, f64, _ = evaluate(LowPrecisionMACECalculator(models=tiny_model_factory(), policy="fp64"),
                           water8)
    e32, f32, _ = evaluate(LowPrecisionMACECalculator(models=tiny_model_factory(), policy="fp32"),
                           water8)
    eps32 = np.finfo(np.float32).eps
    assert abs(e32 - e64) <= 100 * eps32 * abs(e64)
    assert relative(f32, f64) <= 1000 * eps32


def test_forces_are_minus_energy_gradient(tiny_model_factory, water8):
    calc = LowPrecisionMACECalculator(models=tiny_model_factory(), policy="fp64")
    atoms = water8.copy()
    atoms.calc = calc
    forces = atoms.get_forces()
    step = 1e-5
    for index, axis in [(0, 0), (1, 2), (5, 1), (17, 0)]:
        energies = []
        for sign in (+1, -1):
            displaced = atoms.copy()
            displaced.positions[index, axis] += sign * step
            displaced.calc = calc
            energies.append(displaced.get_potential_energy())
        numeric = -(energies[0] - energies[1]) / (2 * step)
        assert numeric == pytest.approx(forces[index, axis], abs=1e-8, rel=1e-6)


def test_stress_is_strain_derivative(tiny_model_factory, water8):
    calc = LowPrecisionMACECalculator(models=tiny_model_factory(), policy="fp64")
    atoms = water8.copy()
    atoms.calc = calc
    stress = atoms.get_stress(voigt=False)
    volume = atoms.get_volume()
    step = 1e-5
    for i, j in [(0, 0), (1, 1), (0, 1), (1, 2)]:
        energies = []
        for sign in (+1, -1):
            strain = np.eye(3)
            strain[i, j] += sign * step / 2
            strain[j, i] += sign * step / 2
            strained = atoms.copy()
            strained.set_cell(atoms.cell @ strain, scale_atoms=True)
            strained.calc = calc
            energies.append(strained.get_potential_energy())
        numeric = (energies[0] - energies[1]) / (2 * step) / volume
        assert numeric == pytest.approx(stress[i, j], abs=1e-9, rel=1e-5)


# Tolerances per policy for (energy per atom in eV, relative force error, relative stress error)
# against fp64, on the tiny random model. 16-bit operands carry 8 (bf16) or 11 (fp16) mantissa
# bits, a relative rounding of 2**-9 or 2**-12 per product; a few layers deep that gives the
# per-mille to percent force errors below.
TOLERANCES = {
    "fp64": (1e-12, 1e-10, 1e-10),
    "fp32": (1e-6, 1e-5, 1e-4),
    "tf32": (1e-6, 1e-5, 1e-4),  # TF32 only changes CUDA matmuls; on CPU this is fp32
    "fp32-linear-bf16": (2e-4, 1.5e-2, 5e-2),
    "fp32-linear-fp16": (2e-5, 4e-3, 1e-2),
    "bf16": (4e-4, 3e-2, 1e-1),
}


@pytest.mark.parametrize("backend", ["e3nn", "cuequivariance"])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_policy_matches_fp64_reference(policy, backend, tiny_model_factory, water8):
    e64, f64, s64 = evaluate(
        LowPrecisionMACECalculator(models=tiny_model_factory(), policy="fp64", backend="e3nn"),
        water8)
    # The fast path (persistent state, own neighbour list) on CPU: same numbers as mace's path.
    e, f, s = evaluate(
        LowPrecisionMACECalculator(models=tiny_model_factory(), policy=policy, backend=backend,
                                   fast_path=True, skin_A=0.5),
        water8)
    energy_tol, force_tol, stress_tol = TOLERANCES[policy]
    assert abs(e - e64) / len(water8) <= energy_tol
    assert relative(f, f64) <= force_tol
    assert relative(s, s64) <= stress_tol


@pytest.mark.parametrize("policy", ["fp32-linear-bf16", "fp32-linear-fp16"])
def test_precision_report_shows_16bit_linears_and_fp32_reductions(policy, tiny_model_factory,
                                                                  water8):
    calc = LowPrecisionMACECalculator(models=tiny_model_factory(), policy=policy)
    report = {row["module"]: row for row in calc.precision_report(water8)}
    half = "bfloat16" if policy.endswith("bf16") else "float16"
    matmuls = [row for row in report.values() if row["type"] == "BlockMatmul"]
    linear_names = {"linear_up", "linear", "linear_1", "linear_2", "layer0", "layer1", "layer2"}
    assert {row["module"].split(".")[-2] for row in matmuls} == linear_names
    assert all(row["input_dtypes"] == [half] for row in matmuls)
    fp32_parts = [row for name, row in report.items()
                  if row["type"] in ("SphericalHarmonics", "TensorProduct", "SymmetricContraction",
                                     "FullyConnectedTensorProduct")]
    assert len(fp32_parts) >= 7
    assert all(row["input_dtypes"] == ["float32"] for row in fp32_parts)
    assert report["output:energy"]["output_dtypes"] == ["float32"]
    assert report["output:forces"]["output_dtypes"] == ["float32"]


def test_precision_report_fp32_has_no_16bit(tiny_model_factory, water8):
    calc = LowPrecisionMACECalculator(models=tiny_model_factory(), policy="fp32")
    dtypes = {dtype for row in calc.precision_report(water8)
              for dtype in row["input_dtypes"] + row["output_dtypes"]}
    assert dtypes == {"float32"}


@pytest.mark.parametrize("policy", ["fp64", "fp32", "fp32-linear-bf16", "fp32-linear-fp16"])
def test_rotation_and_translation(policy, tiny_model_factory, water8):
    calc = LowPrecisionMACECalculator(models=tiny_model_factory(), policy=policy)
    cluster = water8.copy()
    cluster.pbc = False
    cluster.cell = None
    energy, forces = evaluate_open(calc, cluster)
    rotation = Rotation.from_euler("xyz", [0.3, -1.1, 2.0])
    moved = cluster.copy()
    moved.positions = rotation.apply(cluster.positions) + np.array([3.0, -2.0, 7.5])
    energy_moved, forces_moved = evaluate_open(calc, moved)
    tol = 1e-10 if policy == "fp64" else (1e-5 if policy == "fp32" else 5e-3)
    assert abs(energy_moved - energy) <= tol * abs(energy)
    assert relative(forces_moved, rotation.apply(forces)) <= (1e-9 if policy == "fp64" else 3e-2)


def evaluate_open(calc, atoms):
    atoms = atoms.copy()
    atoms.calc = calc
    return atoms.get_potential_energy(), atoms.get_forces()


def test_backends_agree_at_fp64(tiny_model_factory, water8):
    e_e3nn, f_e3nn, s_e3nn = evaluate(
        LowPrecisionMACECalculator(models=tiny_model_factory(), policy="fp64", backend="e3nn"),
        water8)
    calc = LowPrecisionMACECalculator(models=tiny_model_factory(), policy="fp64",
                                      backend="cuequivariance")
    assert calc.parameters["backend"] == "cuequivariance"
    e_cueq, f_cueq, s_cueq = evaluate(calc, water8)
    assert abs(e_cueq - e_e3nn) <= 1e-10 * abs(e_e3nn)
    assert relative(f_cueq, f_e3nn) <= 1e-10
    assert relative(s_cueq, s_e3nn) <= 1e-10


def test_model_hash_is_the_same_under_every_policy_and_backend(tiny_model_factory):
    hashes = {LowPrecisionMACECalculator(models=tiny_model_factory(), policy=policy,
                                         backend=backend).parameters["model_hash"]
              for policy in ("fp64", "fp32-linear-bf16") for backend in ("e3nn", "cuequivariance")}
    assert len(hashes) == 1


def test_provenance_in_parameters(tiny_model_factory):
    calc = LowPrecisionMACECalculator(models=tiny_model_factory(), policy="fp32-linear-bf16")
    params = calc.parameters
    assert params["policy"] == "fp32-linear-bf16"
    assert params["policy_details"]["linear_dtype"] == "bfloat16"
    assert params["backend"] == "e3nn"  # auto on CPU
    assert len(params["model_hash"]) == 64
    assert params["versions"]["mace-torch"] != "not installed"


def test_ase_dynamics_and_optimizer_run_unchanged(tiny_model_factory, water8):
    atoms = water8.copy()
    atoms.calc = LowPrecisionMACECalculator(models=tiny_model_factory(), policy="fp32-linear-bf16")
    start = atoms.get_potential_energy()
    BFGS(atoms, logfile=None).run(fmax=1e-3, steps=10)  # random-model forces are ~0.02 eV/Å
    assert atoms.get_potential_energy() < start
    dynamics = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    dynamics.run(5)
    assert dynamics.nsteps == 5 and np.isfinite(atoms.get_forces()).all()


# --- bad input ------------------------------------------------------------------------------

def test_missing_model_file(tmp_path):
    with pytest.raises(CalculatorSetupError, match="not found"):
        LowPrecisionMACECalculator(model_paths=tmp_path / "absent.model")


def test_file_that_is_not_a_model(tmp_path):
    text = tmp_path / "notes.model"
    text.write_text("this is not a pickle")
    with pytest.raises(CalculatorSetupError, match="not a loadable MACE model"):
        LowPrecisionMACECalculator(model_paths=text)
    weights = tmp_path / "dict.model"
    torch.save({"weight": torch.zeros(3)}, weights)
    with pytest.raises(CalculatorSetupError, match="does not hold a MACE model"):
        LowPrecisionMACECalculator(model_paths=weights)


def test_unknown_element_names_element_and_model_elements(tiny_model_factory, water8):
    atoms = water8.copy()
    atoms.symbols[0] = "Cl"
    atoms.calc = LowPrecisionMACECalculator(models=tiny_model_factory())
    with pytest.raises(CalculatorSetupError, match=r"element\(s\) Cl; it knows H, C, O"):
        atoms.get_potential_energy()


def test_unknown_policy_lists_valid_ones(tiny_model_factory):
    with pytest.raises(CalculatorSetupError, match="fp32-linear-bf16"):
        LowPrecisionMACECalculator(models=tiny_model_factory(), policy="int8")


def test_16bit_policy_on_a_device_that_cannot_run_it(tiny_model_factory, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    with pytest.raises(CalculatorSetupError, match="bfloat16.*Tesla V100"):
        LowPrecisionMACECalculator(models=tiny_model_factory(), device="cuda",
                                   policy="fp32-linear-bf16")


def test_nan_positions_fail_clearly(tiny_model_factory, water8):
    atoms = water8.copy()
    atoms.positions[3, 1] = np.nan
    atoms.calc = LowPrecisionMACECalculator(models=tiny_model_factory())
    with pytest.raises(CalculationFailed, match=r"non-finite positions for atom\(s\) \[3\]"):
        atoms.get_forces()


def test_one_force_limit_honoured_by_the_calculator_and_the_protocols(tiny_model_factory,
                                                                     water8):
    atoms = water8.copy()
    atoms.positions[1] = atoms.positions[0] + 1e-4
    atoms.calc = LowPrecisionMACECalculator(models=tiny_model_factory(), policy="fp64",
                                            max_force_eV_A=None)
    largest = float(np.linalg.norm(atoms.get_forces(), axis=1).max())
    for limit, fails in ((0.5 * largest, True), (2.0 * largest, False)):
        atoms.calc = LowPrecisionMACECalculator(models=tiny_model_factory(), policy="fp64",
                                                max_force_eV_A=limit)
        if fails:
            with pytest.raises(CalculationFailed, match="exploding forces.*max_force_eV_A"):
                atoms.get_forces()
        else:
            atoms.get_forces()
    with pytest.raises(CalculatorSetupError, match="max_force_eV_A must be positive"):
        LowPrecisionMACECalculator(models=tiny_model_factory(), max_force_eV_A=0)
    # A protocol's limit above the calculator's default reaches the calculator.
    assert build_calculator(NVTSettings(structure="x.xyz", max_force_eV_A=5e3)
                            ).max_force_eV_A == 5e3
