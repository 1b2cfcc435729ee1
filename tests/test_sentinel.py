"""The live fp64 sentinel: deviations, budget actions, and its record in the trajectory."""

import warnings

import ase.io
import h5py
import numpy as np
import pytest
import torch
from ase.calculators.calculator import CalculationFailed
from ase.md.verlet import VelocityVerlet
from ase import units

from mace_lpcalc import LowPrecisionMACECalculator
from mace_lpcalc.analysis import compare
from tiny_models import build_tiny_model
from mace_lpcalc.md.nvt import NVT, NVTSettings
from mace_lpcalc.precision.sentinel import SENTINEL_UNITS, deviations
from mace_lpcalc.systems import water_box
from mace_lpcalc.md.trajectory import read_trajectory

pytestmark = pytest.mark.usefixtures("single_thread")
#: Whole-model bf16 deviates from fp64 by ~3e-4 eV/Å on the tiny model, fp32 by ~1e-8.
BUDGET_EV_A = 1e-4


def test_deviations_of_known_arrays():
    reference = {"energy": -10.0, "forces": np.array([[1.0, 0, 0], [0, 2.0, 0]]),
                 "stress": np.zeros(6)}
    results = {"energy": -10.5, "forces": np.array([[1.0, 0, 0], [0, 2.0, 0.3]]),
               "stress": np.array([0, 0, 0.01, 0, 0, 0])}
    measured = deviations(results, reference, n_atoms=2)
    assert measured["energy_per_atom"] == pytest.approx(0.25)
    assert measured["force_max"] == pytest.approx(0.3)
    assert measured["force_rms"] == pytest.approx(np.sqrt(0.09 / 2))
    assert measured["force_relative_rms"] == pytest.approx(0.3 / np.sqrt(5))
    assert measured["stress_max"] == pytest.approx(0.01)
    without_stress = {key: value for key, value in results.items() if key != "stress"}
    assert np.isnan(deviations(without_stress, reference, 2)["stress_max"])


def _run_verlet(water8, policy, action, steps=4):
    calc = LowPrecisionMACECalculator(models=build_tiny_model(), policy=policy, sentinel_every=2,
                                      sentinel_force_budget_eV_A=BUDGET_EV_A,
                                      sentinel_action=action)
    atoms = water8.copy()
    atoms.calc = calc
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        VelocityVerlet(atoms, 0.5 * units.fs).run(steps)
    sentinel_warnings = [w for w in caught if "fp64 sentinel" in str(w.message)]
    return calc, atoms, sentinel_warnings


def test_a_sound_policy_stays_within_budget(water8):
    calc, _, caught = _run_verlet(water8, "fp32", "stop")
    assert [record.evaluation for record in calc.sentinel.records] == [0, 2, 4]
    assert all(record.force_max < 1e-6 and not record.over_budget
               for record in calc.sentinel.records)
    assert not caught


def test_a_box_run_in_chunks_is_checked_against_fp64_in_chunks(water8):
    """mace's unchunked path would not fit a box whose convolutions need chunks: there the
    reference is fp64 on the fast path, chunked alike."""
    calc = LowPrecisionMACECalculator(models=build_tiny_model(), policy="fp32", fast_path=True,
                                      edge_chunk_size=64, sentinel_every=1,
                                      sentinel_force_budget_eV_A=BUDGET_EV_A)
    calc.get_forces(water8.copy())
    (reference,) = calc._references.values()
    assert list(calc._references) == [True] and reference.policy.name == "fp64"
    assert reference.engine.edge_chunking.last_chunk_edges == 64
    assert calc.parameters["sentinel_reference"] == "fp64 on the fast path, edge-chunked"
    (record,) = calc.sentinel.records
    assert 0 < record.force_max < 1e-6 and not record.over_budget


def test_a_bad_policy_is_caught_and_warned_about(water8):
    calc, _, caught = _run_verlet(water8, "bf16", "warn")
    assert all(record.over_budget and record.action == "warn" for record in calc.sentinel.records)
    assert len(caught) == len(calc.sentinel.records) == 3
    assert calc.policy.name == "bf16" and "sentinel_fallback" not in calc.parameters


def test_stop_raises_calculation_failed(water8):
    with pytest.raises(CalculationFailed, match=r"fp64 sentinel at evaluation 0: policy bf16 "
                                                r"deviates by max \|ΔF\|.*stopping"):
        _run_verlet(water8, "bf16", "stop")


def test_fallback_switches_to_the_safer_policy_and_records_it(water8):
    calc, atoms, caught = _run_verlet(water8, "bf16", "fallback")
    assert calc.parameters["sentinel_fallback"] == {"evaluation": 0, "from": "bf16", "to": "fp32"}
    assert [record.policy for record in calc.sentinel.records] == ["bf16", "fp32", "fp32"]
    assert [record.over_budget for record in calc.sentinel.records] == [True, False, False]
    fp32 = LowPrecisionMACECalculator(models=build_tiny_model(), policy="fp32")
    np.testing.assert_allclose(atoms.get_forces(), fp32.get_forces(atoms.copy()), atol=1e-12)
    assert any("switching to policy fp32" in str(w.message) for w in caught)


@pytest.mark.parametrize("action", ["fallback", "stop"])
def test_the_protocol_logs_every_check_and_the_switch(tmp_path, capsys, action):
    ase.io.write(tmp_path / "water.xyz", water_box(8))
    torch.save(build_tiny_model(atomic_numbers=(1, 8)), tmp_path / "tiny.model")
    settings = NVTSettings(structure=str(tmp_path / "water.xyz"), model=str(tmp_path / "tiny.model"),
                           policy="bf16", steps=24, log_every=1, sentinel_every=8,
                           sentinel_force_budget_eV_A=BUDGET_EV_A, sentinel_action=action,
                           out=str(tmp_path / "run.h5"))
    if action == "stop":
        with pytest.raises(CalculationFailed, match="at step 0: fp64 sentinel"):
            NVT(settings).run()
        assert not (tmp_path / "run.h5").exists()  # caught at the first forces, before any file
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        NVT(settings).run()
    data = read_trajectory(settings.out)
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("nvt run.h5: step 24/24") and (
        f"fp64 sentinel max |ΔF| {data.sentinel['force_max'][-1]:.3g} eV/Å" in last_line)
    assert data.sentinel["step"].tolist() == [0, 8, 16, 24]
    assert data.sentinel["force_max"][0] > BUDGET_EV_A > data.sentinel["force_max"][1:].max()
    assert data.attrs["sentinel_fallback"] == {"step": 0, "evaluation": 0, "from": "bf16",
                                               "to": "fp32"}
    with h5py.File(settings.out, "r") as handle:
        for name, unit in SENTINEL_UNITS.items():
            assert handle["sentinel"][name].attrs["units"] == unit
    compare.main([settings.out, "--out-dir", str(tmp_path / "comparison")])
    report = (tmp_path / "comparison" / "summary.md").read_text()
    sentinel_table = report.split("## Live fp64 sentinel")[1].split("## Notes")[0]
    row = next(line for line in sentinel_table.splitlines() if line.startswith("| run.h5 |"))
    assert row.split(" | ")[2] == "4" and row.endswith("step 0: bf16 → fp32 |")
    assert float(row.split(" | ")[3]) == pytest.approx(data.sentinel["force_max"].max(), rel=1e-2)
