"""What a worker does with one task: :func:`run_task`, a plain function of picklable
run specs, so that Dask can ship it anywhere and run it again after a failure.

Each run picks up where its files say it is:

* no checkpoint: a fresh run (replacing a trajectory that a run killed before its first
  checkpoint left half-written);
* a checkpoint short of the run's steps: the run resumes from it (``resume=True``), so a
  task re-run after its worker died loses only the steps since the last checkpoint, and
  the finished trajectory holds every frame once;
* a checkpoint at or past the run's steps: nothing runs; the summary is read back from
  the trajectory (after checking that the checkpoint was written with these settings).

The runs of a task that still have steps to go run side by side as batched replicas
(:func:`mace_lpcalc.md.replicas.run_replicas`: one model call per step for all of them),
with the sentinel off, since it checks one structure at a time; a lone run runs as the
protocol's command line would run it. Given the campaign's ``deadline`` (seconds since the
epoch), the runs stop in time with a checkpoint (``max_wall_s``), and a task that starts
with less than :data:`MIN_TASK_S` left runs nothing: its runs wait for the next campaign.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from pathlib import Path

from mace_lpcalc.campaign.config import PROTOCOLS
from mace_lpcalc.campaign.grid import RunSpec
from mace_lpcalc.md.base import MDSettings
from mace_lpcalc.md.checkpoint import Checkpoint, checkpoint_path, settings_changes
from mace_lpcalc.md.inputs import build_calculator
from mace_lpcalc.md.replicas import run_replicas
from mace_lpcalc.md.trajectory import read_trajectory

#: A task with less wall time than this left (s) before the deadline is not started:
#: building the calculator alone would take much of it.
MIN_TASK_S = 30.0
#: Wall time (s) kept back from the deadline for the last checkpoint and the answer.
STOP_MARGIN_S = 10.0


def run_task(specs: list[RunSpec], deadline: float | None = None) -> list[dict]:
    """Run (resume, or only summarise) the specs, unfinished ones batched; one summary per
    spec: the protocol's summary plus ``ensemble``, ``policy``, ``seed``,
    ``started_from_step`` (0 for a fresh run), ``already_finished`` (nothing ran),
    ``host`` and ``wall_time_s`` (of the whole task). A run that ``deadline`` stopped, or
    did not let start, says so in ``stopped``."""
    started = time.perf_counter()
    prepared = [prepare_spec(spec) for spec in specs]
    pending = [index for index, (_, _, summary) in enumerate(prepared) if summary is None]
    left_s = float("inf") if deadline is None else deadline - time.time()
    if pending and left_s < MIN_TASK_S:
        for index in pending:
            prepared[index] = (*prepared[index][:2], _not_started(specs[index], left_s))
    elif pending:
        protocol_class = PROTOCOLS[specs[pending[0]].protocol]
        settings = [prepared[index][0] for index in pending]
        if len(settings) > 1:  # the sentinel checks one structure at a time
            settings = [dataclasses.replace(each, sentinel_every=0) for each in settings]
        # Built before the wall limit is taken: the batched runs' clocks start after it.
        calculator = build_calculator(settings[0]) if len(settings) > 1 else None
        if deadline is not None:
            limit_s = max(deadline - time.time() - STOP_MARGIN_S, 1.0)
            settings = [dataclasses.replace(each, max_wall_s=limit_s) for each in settings]
        if len(settings) == 1:
            summaries = [protocol_class(settings[0]).run()]
        else:
            summaries = run_replicas(protocol_class, settings, calculator=calculator)
        for index, summary in zip(pending, summaries):
            prepared[index] = (*prepared[index][:2], summary)
    return [{**summary, "ensemble": spec.ensemble, "policy": spec.policy, "seed": spec.seed,
             "started_from_step": start, "already_finished": index not in pending,
             "host": socket.gethostname(), "wall_time_s": time.perf_counter() - started}
            for index, (spec, (_, start, summary)) in enumerate(zip(specs, prepared))]


def _not_started(spec: RunSpec, left_s: float) -> dict:
    return {"protocol": spec.protocol, "path": spec.out, "steps_run": 0,
            "final_step": None, "ns_per_day": float("nan"),
            "stopped": f"not started: {max(left_s, 0):.0f} s were left before the "
                       "campaign's deadline"}


def prepare_spec(spec: RunSpec) -> tuple[MDSettings, int, dict | None]:
    """The settings that continue ``spec`` from wherever its checkpoint left it, the step
    it starts from, and its summary if it is finished already (else None)."""
    protocol_class = PROTOCOLS[spec.protocol]
    out = Path(spec.out)
    checkpoint_file = checkpoint_path(out)
    if not checkpoint_file.exists():
        return protocol_class.settings_class(**spec.settings, out=str(out),
                                             overwrite=out.exists()), 0, None
    checkpoint = Checkpoint.load(checkpoint_file)
    settings = protocol_class.settings_class(**spec.settings, out=str(out), resume=True)
    if checkpoint.step < settings.steps:
        return settings, checkpoint.step, None
    return settings, checkpoint.step, finished_summary(protocol_class, settings, checkpoint)


def finished_summary(protocol_class, settings: MDSettings, checkpoint: Checkpoint) -> dict:
    """The summary of a run its checkpoint says is finished, read from its trajectory
    without building a calculator. Raises ValueError where the checkpoint was written by
    another protocol or with settings a resumed run could not change (a finished run of
    another campaign must not pass for this one's)."""
    out = Path(settings.out)
    differences = settings_changes({"protocol": protocol_class.name, **settings.as_dict()},
                                   {"protocol": checkpoint.protocol, **checkpoint.settings},
                                   settings.RESUMABLE_CHANGES)
    if differences:
        raise ValueError(f"{out} was finished with different settings: "
                         + ", ".join(differences) + "; remove it (and its checkpoint) to "
                         "run it again")
    trajectory = read_trajectory(out, names=("step", *protocol_class.summary_series))
    return {"protocol": protocol_class.name, "path": str(out), "steps_run": 0,
            "final_step": int(trajectory["step"][-1]), "stopped": None,
            "ns_per_day": float("nan"),  # as the protocols report a run of no steps
            **protocol_class(settings).summarize(trajectory)}
