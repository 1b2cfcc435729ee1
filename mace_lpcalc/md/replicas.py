"""Replicas of one protocol run side by side, their force evaluations batched.

A certificate needs many seeds of the same system and policy. Run as separate
processes, each replica pays for its own model and its own small GPU kernels; here they
share one calculator and one model call per MD step: :func:`run_replicas` runs each
replica's :class:`~mace_lpcalc.md.base.MDProtocol` (writers, checkpoints, resume and
all, unchanged) in a greenlet of its own, with a :class:`ReplicaSlot` as its calculator.
A slot hands its structure to the shared :class:`ReplicaBatch` and switches back to it;
once every replica still running has asked, the batch evaluates them all in one call
(:meth:`LowPrecisionMACECalculator.replica_results
<mace_lpcalc.calculator.LowPrecisionMACECalculator.replica_results>`) and resumes each
with its answer. Greenlets, not threads: the replicas take turns in one thread, so they
never contend for the interpreter lock, and the order of everything is reproducible
(16 replicas of 648 atoms under ASE Langevin, model call left out: 55 ms of Python per
step in threads, 15 ms as greenlets, on a 2-core CPU).

The physics of each replica is exactly that of its own run: the same integrator, seed
and checkpoints, and forces equal to an evaluation on its own up to summation order.
Policy ``auto`` and the sentinel judge single structures, so replicas run without them.
"""

from __future__ import annotations

import numpy as np
import torch
from ase.calculators.calculator import CalculationFailed, Calculator, all_changes
from greenlet import greenlet

from mace_lpcalc.fastpath.mace_layout import check_results
from mace_lpcalc.md.base import MDProtocol, MDSettings
from mace_lpcalc.md.inputs import build_calculator
from mace_lpcalc.system_changes import ExactStateCheck

#: Settings that may differ between the replicas of one batch (each run's own).
PER_REPLICA_SETTINGS = frozenset({"seed", "out", "structure", "overwrite", "resume",
                                  "velocities_from_structure", "progress_every_s",
                                  "checkpoint_every_s"})


class ReplicaBatch:
    """Runs replicas as greenlets and evaluates their requests together.

    Args:
        calculator: a ``LowPrecisionMACECalculator`` (or anything with its
            ``replica_results(list_of_atoms, properties) -> list[dict]``).
    """

    def __init__(self, calculator):
        self.calculator = calculator
        self._hub: greenlet | None = None
        self._requests: dict[int, tuple] = {}
        #: Replicas evaluated by each model call, in call order.
        self.batch_sizes: list[int] = []

    def run(self, replicas) -> list:
        """Call each function of ``replicas`` (no arguments) in a greenlet of its own and
        answer their :meth:`evaluate` calls in rounds; return what each returned, or the
        exception it raised (one replica's failure does not stop the others)."""
        self._hub = greenlet.getcurrent()
        runs = [greenlet(_returning_errors(replica)) for replica in replicas]
        outcomes: list = [None] * len(runs)
        # The first switch starts a replica; later ones return from its evaluate().
        answers: dict[int, object] = {index: None for index in range(len(runs))}
        while answers:
            for index, answer in answers.items():
                value = runs[index].switch(answer) if answer is not None else runs[index].switch()
                if runs[index].dead:
                    outcomes[index] = value
            answers = self._answer_requests()
        return outcomes

    def evaluate(self, replica: int, atoms, properties) -> dict:
        """Results for ``atoms`` (replica number ``replica``), from the next full round."""
        if self._hub is None or greenlet.getcurrent() is self._hub:
            raise RuntimeError("ReplicaBatch.evaluate is called by replicas that "
                               "ReplicaBatch.run runs")
        # No copy: the caller is suspended until its answer comes back, so its atoms
        # cannot change meanwhile (a slot passes its own copy anyway).
        self._requests[replica] = (atoms, tuple(properties))
        answer = self._hub.switch()
        if isinstance(answer, Exception):
            raise CalculationFailed(f"the batched evaluation of the replicas failed: "
                                    f"{type(answer).__name__}: {answer}") from answer
        return answer

    def _answer_requests(self) -> dict[int, object]:
        if not self._requests:
            return {}
        replicas = sorted(self._requests)
        requests = [self._requests.pop(replica) for replica in replicas]
        properties = sorted(set().union(*(wanted for _, wanted in requests)))
        try:
            results = self.calculator.replica_results([atoms for atoms, _ in requests],
                                                      properties)
        except Exception as err:  # noqa: BLE001 -- every waiting replica must hear of it
            results = [err] * len(replicas)
        self.batch_sizes.append(len(replicas))
        return dict(zip(replicas, results))


def _returning_errors(function):
    def call():
        try:
            return function()
        except BaseException as err:  # noqa: BLE001 -- reported after the others finish
            return err
    return call


class ReplicaSlot(ExactStateCheck, Calculator):
    """One replica's ASE calculator: asks the shared :class:`ReplicaBatch`.

    Its ``parameters`` are the shared calculator's (model hash, policy, backend,
    versions), so each replica's trajectory records the same provenance as a run of its
    own. Results are checked for non-finite or exploding values as the shared
    calculator checks its own.
    """

    implemented_properties = ("energy", "free_energy", "forces", "stress", "energies",
                              "node_energy")

    def __init__(self, batch: ReplicaBatch, replica: int):
        super().__init__()
        self.batch, self.replica = batch, replica
        self.parameters = batch.calculator.parameters
        self._stress_asked_last_call = False

    def check_atoms(self, atoms) -> None:
        self.batch.calculator.check_atoms(atoms)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        # A barostat asks for the stress right after the forces of every step: one call
        # with both, not two (as the calculator itself does).
        wanted = {"energy", "forces", *properties}
        if self._stress_asked_last_call:
            wanted.add("stress")
        self._stress_asked_last_call = "stress" in properties
        results = self.batch.evaluate(self.replica, self.atoms, wanted)
        shared = self.batch.calculator
        check_results(results, shared.policy.name, shared.max_force_eV_A)
        self.results = results


def check_replica_settings(settings_list: list[MDSettings]) -> None:
    """Refuse replicas that cannot share one calculator, naming the setting."""
    if not settings_list:
        raise ValueError("no replicas given")
    first = settings_list[0].as_dict()
    for settings in settings_list[1:]:
        if type(settings) is not type(settings_list[0]):
            raise ValueError("replicas must all have the same settings class, got "
                             f"{type(settings_list[0]).__name__} and {type(settings).__name__}")
        differing = sorted(name for name, value in settings.as_dict().items()
                           if name not in PER_REPLICA_SETTINGS and value != first[name])
        if differing:
            raise ValueError(f"replicas share one calculator and one protocol, so they must "
                             f"agree on every setting but {sorted(PER_REPLICA_SETTINGS)}; "
                             f"{settings.out} differs in: " + ", ".join(
                                 f"{name} = {getattr(settings, name)!r} (first replica: "
                                 f"{first[name]!r})" for name in differing))
    outs = [str(settings.out) for settings in settings_list]
    if len(set(outs)) != len(outs):
        raise ValueError(f"replicas must write different files, got {outs}")
    if first["policy"] == "auto":
        raise ValueError("policy 'auto' chooses for one structure; give replicas a policy")
    if first["sentinel_every"]:
        raise ValueError("the sentinel checks one structure at a time; batched replicas "
                         "need sentinel_every = 0")


def run_replicas(protocol_class: type[MDProtocol], settings_list, calculator=None) -> list[dict]:
    """Run one protocol for several settings (seeds) with batched force evaluations.

    Args:
        protocol_class: e.g. :class:`~mace_lpcalc.md.npt.NPT`.
        settings_list: one settings object per replica; they may differ only in
            :data:`PER_REPLICA_SETTINGS`, and their structures must hold the same atoms.
        calculator: the shared calculator (default: built from the first settings).

    Returns:
        Each replica's summary, as :meth:`MDProtocol.run` returns it, with
        ``replica_batch``: replicas, model calls and the mean replicas per call.
        If any replica fails, the others still finish; then the first failure is
        raised, with a note naming every failed run.
    """
    settings_list = list(settings_list)
    check_replica_settings(settings_list)
    if calculator is None:
        calculator = build_calculator(settings_list[0])
    batch = ReplicaBatch(calculator)
    protocols = [protocol_class(settings, calculator=ReplicaSlot(batch, index))
                 for index, settings in enumerate(settings_list)]
    first = settings_list[0]
    deterministic = first.deterministic and str(first.device).startswith("cpu")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(previous or deterministic)
    try:
        outcomes = batch.run([protocol.run for protocol in protocols])
    finally:
        torch.use_deterministic_algorithms(previous)
    failures = [(settings.out, outcome) for settings, outcome in zip(settings_list, outcomes)
                if isinstance(outcome, BaseException)]
    if failures:
        error = failures[0][1]
        error.add_note(f"{len(failures)} of {len(outcomes)} replicas failed: " + "; ".join(
            f"{out}: {type(err).__name__}: {err}" for out, err in failures))
        raise error
    statistics = {"replicas": len(outcomes), "model_calls": len(batch.batch_sizes),
                  "mean_replicas_per_call": float(np.mean(batch.batch_sizes))
                  if batch.batch_sizes else float("nan")}
    return [dict(summary, replica_batch=statistics) for summary in outcomes]
