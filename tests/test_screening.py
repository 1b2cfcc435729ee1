"""The static screen: κ_T from volume fluctuations, the predicted density shift on an ideal
gas, the static pressure deviation against direct stresses, and the compare tables."""

import json

import numpy as np
import pytest
import torch
from ase import units
from ase.calculators.calculator import Calculator, all_changes

import mace_lpcalc.calculator
from mace_lpcalc.analysis import evaluate_static_deviations, load_run
from mace_lpcalc.analysis.compare import main
from mace_lpcalc.analysis.screening import (Compressibility, ScreenResult,
                                            force_work_drift_bound, isothermal_compressibility,
                                            predicted_density_shift)
from mace_lpcalc.calculator import LowPrecisionMACECalculator
from tiny_models import build_tiny_model
from mace_lpcalc.systems import water_box
from test_compare import production_start, write_run


class PressureShifted(Calculator):
    """``base`` plus E = −ΔP·V: forces unchanged, stress −ΔP·I, so the pressure rises by ΔP."""

    implemented_properties = ["energy", "forces", "stress"]

    def __init__(self, base, delta_pressure_bar):
        super().__init__()
        self.base, self.shift = base, delta_pressure_bar * units.bar

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        copy = self.atoms.copy()
        copy.calc = self.base
        volume = copy.get_volume()
        stress = copy.get_stress().copy()
        stress[:3] -= self.shift
        self.results = {"energy": copy.get_potential_energy() - self.shift * volume,
                        "forces": copy.get_forces(), "stress": stress}


def test_compressibility_of_gaussian_volumes_matches_their_variance():
    rng = np.random.default_rng(1)
    n, mean_A3, sigma_A3, temperature_K = 4000, 20000.0, 60.0, 300.0
    result = isothermal_compressibility(rng.normal(mean_A3, sigma_A3, n), temperature_K)
    expected = sigma_A3**2 / (units.kB * temperature_K * mean_A3) * units.bar
    assert abs(result.kappa_per_bar - expected) < 4 * result.stderr_per_bar
    # Independent Gaussian samples: the variance's relative error is √(2/n).
    assert result.stderr_per_bar == pytest.approx(expected * np.sqrt(2 / n), rel=0.15)
    with pytest.raises(ValueError, match="does not fluctuate"):
        isothermal_compressibility(np.full(10, mean_A3), temperature_K)
    with pytest.raises(ValueError, match="temperature"):
        isothermal_compressibility(rng.normal(mean_A3, sigma_A3, 10), -1.0)


def test_ideal_gas_compressibility_and_density_shift_are_the_closed_forms():
    # NPT ideal gas: V ~ Gamma(N + 1, k_B T / P), so ⟨δV²⟩/(k_B T ⟨V⟩) = 1/P exactly.
    rng = np.random.default_rng(2)
    n_atoms, temperature_K, pressure_bar = 500, 300.0, 100.0
    kT_over_P_A3 = units.kB * temperature_K / (pressure_bar * units.bar)
    volumes = rng.gamma(n_atoms + 1, kT_over_P_A3, 20000)
    kappa = isothermal_compressibility(volumes, temperature_K)
    assert abs(kappa.kappa_per_bar - 1 / pressure_bar) < 4 * kappa.stderr_per_bar
    assert kappa.stderr_per_bar < 0.03 / pressure_bar

    # A policy whose pressure is higher by ΔP at every volume, NkT/V + ΔP = P₀, settles at
    # V = NkT/(P₀ − ΔP): its density is lower by exactly ΔP/P₀.
    delta_pressure_bar = 0.5
    exact_percent = -100 * delta_pressure_bar / pressure_bar
    shift, stderr = predicted_density_shift(Compressibility(1 / pressure_bar, 0.0, "run", 1),
                                            delta_pressure_bar, 0.0)
    assert shift == pytest.approx(exact_percent, rel=1e-12) and shift < 0 and stderr == 0
    shift, stderr = predicted_density_shift(kappa, delta_pressure_bar, 0.1)
    assert abs(shift - exact_percent) < 4 * stderr
    assert stderr == pytest.approx(100 * np.hypot(kappa.kappa_per_bar * 0.1,
                                                  delta_pressure_bar * kappa.stderr_per_bar))


def test_screen_verdicts_against_the_margin():
    kappa = Compressibility(4.5e-5, 0.0, "run", 1)
    def verdict(delta_pressure_bar, stderr_bar):
        shift, stderr = predicted_density_shift(kappa, delta_pressure_bar, stderr_bar)
        return ScreenResult(shift, stderr, delta_pressure_bar, stderr_bar, kappa, 0.5,
                            np.nan).verdict
    # 0.5 % of density is ΔP = 0.005 / 4.5e-5 ≈ 111 bar.
    assert verdict(10.0, 5.0) == "passes the screen"
    assert verdict(-300.0, 20.0) == "rejected by the static screen"
    assert verdict(111.0, 5.0) == "screen inconclusive"


def test_drift_bound_from_thermal_velocities():
    # One oxygen with ‖δf‖ = 0.01 eV/Å: √(k_B T ‖δf‖²/m) eV per ASE time unit.
    bound = force_work_drift_bound([1e-4 / 16.0], 300.0, 1)
    expected = np.sqrt(units.kB * 300.0 * 1e-4 / 16.0) * 1000 * units.fs * 1000
    assert bound == pytest.approx(expected, rel=1e-12)
    assert np.isnan(force_work_drift_bound([np.nan], 300.0, 1))


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.model"
    torch.save(build_tiny_model(), path)
    return path


def test_pressure_deviation_matches_direct_stress_evaluation(tiny_model_path):
    rng = np.random.default_rng(3)
    frames = []
    for _ in range(3):
        atoms = water_box(8, seed=0)
        atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
        frames.append(atoms)
    reference = LowPrecisionMACECalculator(model_paths=str(tiny_model_path), policy="fp64",
                                           backend="e3nn")
    test = LowPrecisionMACECalculator(model_paths=str(tiny_model_path), policy="fp32",
                                      backend="e3nn")

    def pressures_bar(calculator):
        values = []
        for atoms in frames:
            atoms = atoms.copy()
            atoms.calc = calculator
            values.append(-np.trace(atoms.get_stress(voigt=False)) / 3 / units.bar)
        return np.array(values)

    p64, p32 = pressures_bar(reference), pressures_bar(test)
    result = evaluate_static_deviations(frames, reference, test)
    assert result.pressure_error_bar == pytest.approx(p32 - p64, rel=1e-9, abs=1e-12)
    assert result.summary()["ΔP"] == pytest.approx(
        (np.mean(p32 - p64), np.percentile(np.abs(p32 - p64), 95)), rel=1e-9, abs=1e-12)
    assert result.stderrs()["ΔP"] == pytest.approx(np.std(p32 - p64, ddof=1) / np.sqrt(3))
    # A deliberate +250 bar shift (forces untouched) is found to rounding.
    shifted = evaluate_static_deviations(frames, reference, PressureShifted(reference, 250.0))
    assert shifted.pressure_error_bar == pytest.approx([250.0] * 3, rel=1e-9)
    assert np.all(shifted.force_abs_error_eV_A == 0)
    volumes = np.array([atoms.get_volume() for atoms in frames])
    assert shifted.energy_error_eV_atom == pytest.approx(
        -250.0 * units.bar * volumes / len(frames[0]), rel=1e-9)
    molecule = frames[0][:3].copy()
    molecule.pbc, molecule.cell = False, None
    assert not evaluate_static_deviations([molecule], reference, test).has_pressure


def test_compare_screens_a_pressure_shifted_policy(tmp_path, tiny_model_path, monkeypatch):
    """End to end: fp32 as itself passes; "fp32-linear-bf16", made fp32 with +ΔP, is caught."""
    shifts_bar = {"fp32": 0.0, "fp32-linear-bf16": 3e5}

    def calculator(*, model_paths, device, policy, backend, compile_model):
        base = LowPrecisionMACECalculator(model_paths=model_paths, device=device,
                                          policy="fp64" if policy == "fp64" else "fp32",
                                          backend=backend, compile_model=compile_model)
        return base if policy == "fp64" else PressureShifted(base, shifts_bar[policy])

    monkeypatch.setattr(mace_lpcalc.calculator, "LowPrecisionMACECalculator", calculator)
    paths = [write_run(tmp_path / f"{policy}.h5", policy=policy, seed=0, n_molecules=8)
             for policy in ("fp64", *shifts_bar)]
    out_dir = tmp_path / "out"
    assert main([*map(str, paths), "--out-dir", str(out_dir), "--static-deviations",
                 "--model", str(tiny_model_path), "--max-frames", "3"]) == 0

    reference = load_run(paths[0])
    start = production_start(reference)
    temperature = reference.series["temperature"][start:].mean()
    kappa = isothermal_compressibility(reference.series["volume"][start:], temperature)
    certificate = json.loads((out_dir / "certificate.json").read_text(encoding="utf-8"))
    screens = {policy: certificate["policies"][policy]["static_screen"] for policy in shifts_bar}
    for policy, screen in screens.items():
        assert screen["kappa_T_per_bar"] == pytest.approx(kappa.kappa_per_bar, rel=1e-12)
        assert screen["delta_pressure_bar"] == pytest.approx(shifts_bar[policy], abs=1.0)
        assert screen["predicted_density_shift_percent"] == pytest.approx(
            -100 * kappa.kappa_per_bar * screen["delta_pressure_bar"], rel=1e-12)
        assert certificate["policies"][policy]["density"]["verdict"]  # dynamic rows kept
    assert screens["fp32"]["verdict"] == "passes the screen"
    assert screens["fp32-linear-bf16"]["predicted_density_shift_percent"] < -0.5
    assert screens["fp32-linear-bf16"]["verdict"] == "rejected by the static screen"
    observed = certificate["policies"]["fp32"]["density"]
    inside = observed["ci90_low"] <= screens["fp32"]["predicted_density_shift_percent"] \
        <= observed["ci90_high"]
    assert screens["fp32"]["inside_observed_ci90"] is inside

    markdown = (out_dir / "summary.md").read_text(encoding="utf-8")
    assert "## Static screen vs fp64" in markdown
    assert "| fp32-linear-bf16 |" in markdown and "rejected by the static screen" in markdown
    assert "| ΔP | bar |" in markdown and "| ME_E | eV/atom |" in markdown
