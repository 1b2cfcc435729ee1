"""policy="auto": the fastest policy within the force budget, with its evidence recorded."""

import numpy as np
import pytest
import torch
from ase.calculators.calculator import CalculatorSetupError

from mace_lpcalc import LowPrecisionMACECalculator
from mace_lpcalc.precision.auto import RATTLE_A, choose_policy, trial_frames
from tiny_models import build_tiny_model
from mace_lpcalc.md.nvt import NVT, NVTSettings
from mace_lpcalc.md.trajectory import read_trajectory

pytestmark = pytest.mark.usefixtures("single_thread")


def test_trial_frames_are_the_structure_and_rattled_copies(water8):
    frames = trial_frames(water8, n_rattled=2)
    np.testing.assert_array_equal(frames[0].positions, water8.positions)
    for frame in frames[1:]:
        displacement = frame.positions - water8.positions
        assert displacement.std() == pytest.approx(RATTLE_A, rel=0.3)


def test_a_box_too_large_for_the_fp64_trials_is_refused_by_name(water8):
    class OutOfMemory:  # mace's unchunked fp64 path on a box that needs edge chunks
        def calculate(self, atoms, properties, system_changes):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 400.00 GiB")

    with pytest.raises(CalculatorSetupError, match="ran out of device memory on these 24 "
                                                   "atoms: choose a policy"):
        choose_policy(lambda name: OutOfMemory(), water8, device="cpu", force_budget_eV_A=0.05)


# 1.0 takes the same path as 1e-5 (the fastest of the candidates within the budget, all of
# them here); 1e-12 takes the fallback to fp64.
@pytest.mark.parametrize("budget_eV_A", [pytest.param(1.0, marks=pytest.mark.slow), 1e-5, 1e-12])
def test_auto_picks_the_fastest_candidate_within_budget(water8, budget_eV_A):
    calc = LowPrecisionMACECalculator(models=build_tiny_model(), policy="auto",
                                      auto_force_budget_eV_A=budget_eV_A)
    forces = calc.get_forces(water8)
    decision = calc.parameters["policy_decision"]
    chosen = decision["chosen"]
    assert calc.parameters["policy"] == chosen and decision["force_budget_eV_A"] == budget_eV_A
    measured = [row for row in decision["candidates"] if "error" not in row]
    within = [row for row in measured if row["force_max_deviation_eV_A"] <= budget_eV_A]
    if within:
        assert chosen == min(within, key=lambda row: row["ms_per_call"])["policy"]
    else:
        assert chosen == "fp64"
    if budget_eV_A == 1e-5:  # 16-bit policies deviate by ~1e-4 eV/Å on this model, fp32 by ~1e-7
        assert chosen in ("tf32", "fp32")
    if budget_eV_A == 1e-12:
        assert chosen == "fp64"
    # The calculator then computes exactly what the chosen policy computes.
    alone = LowPrecisionMACECalculator(models=build_tiny_model(), policy=chosen)
    np.testing.assert_allclose(forces, alone.get_forces(water8.copy()), rtol=0, atol=1e-12)


def test_the_protocol_records_the_decision(water_files, tmp_path):
    structure, model = water_files
    settings = NVTSettings(structure=str(structure), model=str(model), policy="auto",
                           auto_force_budget_eV_A=1e-5, steps=2, log_every=1,
                           out=str(tmp_path / "run.h5"))
    NVT(settings).run()
    attrs = read_trajectory(settings.out).attrs
    assert attrs["policy"] == attrs["policy_decision"]["chosen"] and attrs["policy"] in (
        "tf32", "fp32")
    assert {row["policy"] for row in attrs["policy_decision"]["candidates"]} >= {"bf16", "fp32"}
