"""A live FP64 sentinel: every N steps, the current frame again at fp64 on mace's path.

A reduced-precision policy certified on one system may behave differently on another.
The sentinel measures, while the simulation runs, how far the running policy is from
the same model in float64 on the reference path, on the very frames the MD visits:

=========================  ==============  ============================================
deviation                  units           definition (policy minus fp64)
=========================  ==============  ============================================
``energy_per_atom``        eV              ``|E - E64| / N``
``force_max``              eV/Å            ``max_i |F_i - F64_i|``
``force_rms``              eV/Å            ``sqrt(mean_i |F_i - F64_i|^2)``
``force_relative_rms``     dimensionless   ``||F - F64|| / ||F64||``
``stress_max``             eV/Å³           ``max |σ - σ64|`` (NaN where no stress)
=========================  ==============  ============================================

Over the budget (``force_max`` above ``force_budget_eV_A``), the action is ``warn``
(a RuntimeWarning), ``fallback`` (the calculator switches to a safer policy and
carries on; the switch is recorded) or ``stop`` (``CalculationFailed``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

SENTINEL_ACTIONS = ("warn", "fallback", "stop")

#: Units of each field of a :class:`SentinelRecord`, as the trajectory file stores them.
SENTINEL_UNITS = {"energy_per_atom": "eV", "force_max": "eV/Angstrom",
                  "force_rms": "eV/Angstrom", "force_relative_rms": "dimensionless",
                  "stress_max": "eV/Angstrom^3"}


@dataclasses.dataclass(frozen=True)
class SentinelRecord:
    """One sentinel check: the running ``policy``'s deviations from fp64 at the
    calculator's ``evaluation`` (0 for its first), and what was done about them."""

    evaluation: int
    policy: str
    energy_per_atom: float
    force_max: float
    force_rms: float
    force_relative_rms: float
    stress_max: float
    over_budget: bool
    action: str  # "" within budget, else the action taken


def deviations(results: dict, reference: dict, n_atoms: int) -> dict[str, float]:
    """The deviations of ``results`` from ``reference`` (ASE results dicts, eV and Å)."""
    difference = np.asarray(results["forces"], dtype=np.float64) - reference["forces"]
    per_atom = np.linalg.norm(difference, axis=1)
    reference_norm = float(np.linalg.norm(reference["forces"]))
    stress_max = float("nan")
    if "stress" in results and "stress" in reference:
        stress_max = float(np.abs(np.asarray(results["stress"], dtype=np.float64)
                                  - reference["stress"]).max())
    return {"energy_per_atom": abs(float(results["energy"]) - float(reference["energy"]))
            / n_atoms,
            "force_max": float(per_atom.max(initial=0.0)),
            "force_rms": float(math.sqrt(np.mean(per_atom ** 2))) if n_atoms else 0.0,
            "force_relative_rms": float(np.linalg.norm(difference)) / reference_norm
            if reference_norm > 0 else 0.0,
            "stress_max": stress_max}


class Sentinel:
    """Decides when to check and what a check means; the calculator does the evaluating.

    ``every``: check at evaluations 0, every, 2·every, ... (evaluations count the
    calculator's calls on changed atoms). ``force_budget_eV_A``: the largest acceptable
    ``force_max`` (None: no budget, only record). ``action``: one of
    :data:`SENTINEL_ACTIONS`.
    """

    def __init__(self, every: int, force_budget_eV_A: float | None, action: str):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"sentinel_every must be a positive number of steps, got {every!r}")
        if action not in SENTINEL_ACTIONS:
            raise ValueError(f"sentinel_action must be one of {SENTINEL_ACTIONS}, got {action!r}")
        if force_budget_eV_A is not None and not force_budget_eV_A > 0:
            raise ValueError(f"sentinel_force_budget_eV_A must be positive, got "
                             f"{force_budget_eV_A}")
        self.every, self.force_budget_eV_A, self.action = every, force_budget_eV_A, action
        self.evaluations = 0
        self.records: list[SentinelRecord] = []

    def due(self) -> bool:
        """Whether the evaluation now being made is one to check."""
        return self.evaluations % self.every == 0

    def record(self, policy: str, measured: dict[str, float], *, fallen_back: bool) -> SentinelRecord:
        """Store the check of the current evaluation and return it. Once the calculator
        has fallen back, a further excess is only warned about."""
        over = (self.force_budget_eV_A is not None
                and not measured["force_max"] <= self.force_budget_eV_A)
        action = ("warn" if fallen_back and self.action == "fallback" else self.action) \
            if over else ""
        record = SentinelRecord(evaluation=self.evaluations, policy=policy, **measured,
                                over_budget=over, action=action)
        self.records.append(record)
        return record

    def describe(self, record: SentinelRecord) -> str:
        return (f"fp64 sentinel at evaluation {record.evaluation}: policy {record.policy} "
                f"deviates by max |ΔF| = {record.force_max:.3g} eV/Å (budget "
                f"{self.force_budget_eV_A:g}), RMS {record.force_rms:.3g} eV/Å, "
                f"|ΔE|/N = {record.energy_per_atom:.3g} eV")
