"""When a calculator hands its calls to a sibling of another policy, and the sentinel's checks.

Two things make the calculator hand every further call to a sibling (the same model
under another policy): ``policy="auto"``'s choice at the first call (:mod:`.auto`), and
the sentinel's ``"fallback"`` action (:mod:`.sentinel`) once the running policy leaves
its force budget against fp64. :class:`PolicyHandover` holds that state, makes the
sentinel's fp64 evaluations and acts on them; the calculator it is mixed into builds the
siblings and evaluates.
"""

from __future__ import annotations

import warnings

from ase.calculators.calculator import (CalculationFailed, Calculator, CalculatorSetupError,
                                        all_changes)

from mace_lpcalc.precision.auto import choose_policy
from mace_lpcalc.precision.policies import get_policy
from mace_lpcalc.precision.sentinel import Sentinel, deviations


class PolicyHandover:
    """Mixin of ``LowPrecisionMACECalculator``: ``policy="auto"``, the sentinel, the fallback.

    The calculator provides ``policy``, ``atoms``, ``results``, ``parameters``,
    ``check_atoms(atoms)``, ``engine`` and ``_sibling(policy, chunked=...)`` (a calculator
    of the same model under ``policy``; "fp64" is the reference, on mace's path unless
    ``chunked``). While ``_delegate`` is set, it serves every call.
    """

    def _set_up_auto(self, policy, force_budget_eV_A: float):
        """The policy to build with: ``"auto"`` builds as fp32 and decides at the first
        call, which brings the structure."""
        self._delegate = None
        self._auto_budget = float(force_budget_eV_A) if policy == "auto" else None
        if self._auto_budget is None:
            return policy
        if not self._auto_budget > 0:
            raise CalculatorSetupError(f"auto_force_budget_eV_A must be positive, got "
                                       f"{force_budget_eV_A}")
        return "fp32"

    def _set_up_sentinel(self, every: int, force_budget_eV_A: float | None, action: str,
                         fallback_policy: str) -> None:
        try:
            self.sentinel = Sentinel(every, force_budget_eV_A, action) if every else None
            self._fallback_policy = get_policy(fallback_policy)
        except ValueError as err:
            raise CalculatorSetupError(str(err)) from None
        self._fallen_back = False

    @property
    def _builds_siblings(self) -> bool:
        """Whether a sibling may be needed: the sentinel's or ``"auto"``'s."""
        return self.sentinel is not None or self._auto_budget is not None

    def _sentinel_settings(self) -> dict | None:
        """The sentinel's settings, for ``parameters["sentinel"]``."""
        return None if self.sentinel is None else {
            "every": self.sentinel.every,
            "force_budget_eV_A": self.sentinel.force_budget_eV_A,
            "action": self.sentinel.action,
            "fallback_policy": self._fallback_policy.name}

    def _choose_policy(self, atoms, device: str) -> None:
        Calculator.calculate(self, atoms)
        self.check_atoms(self.atoms)
        self._auto_budget, budget = None, self._auto_budget
        built = {}  # fresh calculators, so that the trial calls touch none of this one's state

        def build(name):  # trials of a few calls each: not worth compiling
            if name not in built:
                built[name] = self._sibling(name, compile_model=False)
            return built[name]

        chosen, evidence = choose_policy(build, self.atoms, device=device,
                                         force_budget_eV_A=budget)
        if chosen != self.policy.name:
            self._delegate = (self._sibling(chosen) if self.parameters.get("compile_model")
                              else built[chosen])
        self.parameters.update(policy=chosen, policy_decision=evidence)

    def _watch(self, properties) -> None:
        """The sentinel's check of this evaluation, if due, and its action."""
        sentinel = self.sentinel
        if sentinel.due():
            running = self._delegate if self._delegate is not None else self
            # mace's unchunked path would not fit a box whose convolutions run in chunks.
            chunked = (running.engine is not None
                       and running.engine.edge_chunking.last_chunk_edges is not None)
            reference = self._sibling("fp64", chunked=chunked)
            reference.calculate(self.atoms, properties, all_changes)
            if chunked:
                self.parameters["sentinel_reference"] = "fp64 on the fast path, edge-chunked"
            record = sentinel.record(running.policy.name,
                                     deviations(self.results, reference.results, len(self.atoms)),
                                     fallen_back=self._fallen_back)
            if record.action == "stop":
                raise CalculationFailed(sentinel.describe(record) + "; stopping (sentinel_action="
                                        "'stop')")
            if record.action == "warn":
                warnings.warn(sentinel.describe(record), RuntimeWarning, stacklevel=3)
            if record.action == "fallback":
                self._fall_back(record, properties)
        sentinel.evaluations += 1

    def _fall_back(self, record, properties) -> None:
        policy = self._fallback_policy.name
        self._delegate, self._fallen_back = self._sibling(policy), True
        self._delegate.calculate(self.atoms, properties, all_changes)
        self.results = dict(self._delegate.results)
        self.parameters["sentinel_fallback"] = {"evaluation": record.evaluation,
                                                "from": record.policy, "to": policy}
        warnings.warn(f"{self.sentinel.describe(record)}; switching to policy {policy} for "
                      "the rest of the run", RuntimeWarning, stacklevel=4)
