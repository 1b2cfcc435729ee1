"""``policy="auto"``: the fastest policy within a force-error budget, on the user's system.

At the calculator's first call, on the structure it is given plus a few thermally
rattled copies, every candidate policy this device runs is compared with fp64 on mace's
path (largest per-atom force deviation over the frames) and timed (median of a few
energy+forces calls, the device synchronised). The fastest candidate within the budget
wins; fp64 where none is. The evidence — per candidate, its deviation, ms per call or
why it cannot run — goes into ``calc.parameters["policy_decision"]``.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import CalculatorSetupError, all_changes

from mace_lpcalc.timing import median_ms

#: Tried fastest-first on a GPU; "fp32" is the safe end.
AUTO_CANDIDATES = ("bf16", "fp32-linear-fp16", "fp32-linear-bf16", "tf32", "fp32")
#: Largest acceptable max |ΔF| against fp64 over the test frames (eV/Å).
DEFAULT_AUTO_FORCE_BUDGET_EV_A = 0.05
#: Thermal-like displacements of the rattled copies (Å, Gaussian per coordinate).
RATTLE_A = 0.03


def trial_frames(atoms: Atoms, n_rattled: int = 2, seed: int = 0) -> list[Atoms]:
    """``atoms`` and ``n_rattled`` copies displaced by :data:`RATTLE_A`."""
    rng = np.random.default_rng(seed)
    frames = [atoms.copy()]
    for _ in range(n_rattled):
        copy = atoms.copy()
        copy.positions += rng.normal(scale=RATTLE_A, size=copy.positions.shape)
        frames.append(copy)
    return frames


def _forces(calc, atoms: Atoms) -> np.ndarray:
    calc.calculate(atoms, ["energy", "forces"], all_changes)
    return np.asarray(calc.results["forces"], dtype=np.float64)


def choose_policy(build: Callable[[str], object], atoms: Atoms, *, device: str,
                  force_budget_eV_A: float, candidates=AUTO_CANDIDATES,
                  repeats: int = 3) -> tuple[str, dict]:
    """Measure the candidates; return the chosen policy's name and the evidence.

    ``build(policy)`` makes a calculator of the model under ``policy`` ("fp64" must
    build the reference on mace's path).
    """
    started = time.perf_counter()
    frames = trial_frames(atoms)
    reference = build("fp64")
    expected = None
    try:
        expected = [_forces(reference, frame) for frame in frames]
    except torch.OutOfMemoryError:
        pass  # raised below, so that the error does not hold the failed call's tensors
    if expected is None:
        raise CalculatorSetupError(
            f"policy 'auto' compares each candidate with fp64 on mace's unchunked path, "
            f"which ran out of device memory on these {len(atoms)} atoms: choose a policy "
            f"(the sentinel's fp64 checks run in edge chunks where the box needs them)")
    rows = []
    for name in candidates:
        try:
            calc = build(name)
            deviation = max(float(np.linalg.norm(_forces(calc, frame) - forces, axis=1).max())
                            for frame, forces in zip(frames, expected))
            ms_per_call = median_ms(lambda: calc.calculate(frames[0], ["energy", "forces"],
                                                           all_changes),
                                    device, warmup=1, repeats=repeats)
            rows.append({"policy": name, "force_max_deviation_eV_A": deviation,
                         "ms_per_call": ms_per_call,
                         "within_budget": deviation <= force_budget_eV_A})
        except (CalculatorSetupError, RuntimeError) as err:
            rows.append({"policy": name, "error": f"{type(err).__name__}: {err}"})
    eligible = [row for row in rows if row.get("within_budget")]
    chosen = min(eligible, key=lambda row: row["ms_per_call"])["policy"] if eligible else "fp64"
    return chosen, {"chosen": chosen, "force_budget_eV_A": force_budget_eV_A,
                    "frames": len(frames), "rattle_A": RATTLE_A, "candidates": rows,
                    "setup_s": time.perf_counter() - started}
