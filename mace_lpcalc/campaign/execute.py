"""Running a campaign's tasks on a Dask client, logging each one as it ends, and what is
left at the end: ``OUT/campaign.json`` and a comparison per ensemble.

Every task is submitted with ``retries``: one that raised runs again, on any worker, and
its runs resume from their checkpoints (:mod:`.task`); one whose worker died is run again
by the scheduler (see :mod:`.clusters`). A line per finished or failed task, with the
count of tasks done, goes to ``OUT/campaign.log`` and to stderr.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import sys
import time
import traceback
import uuid
from pathlib import Path

import distributed
import numpy as np

from mace_lpcalc.analysis.compare import main as compare_main
from mace_lpcalc.campaign.config import Campaign
from mace_lpcalc.campaign.grid import RunSpec, Task
from mace_lpcalc.campaign.task import run_task
from mace_lpcalc.installed import package_versions
from mace_lpcalc.md.trajectory import read_trajectory


class CampaignLog:
    """Timestamped lines appended to a log file and echoed to stderr."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._handle = open(path, "a", encoding="utf-8")

    def __call__(self, message: str) -> None:
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        line = f"{stamp} {message}"
        self._handle.write(line + "\n")
        self._handle.flush()
        print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        self._handle.close()


@dataclasses.dataclass
class TaskOutcome:
    """How a task ended: ``done`` with one summary per run, or ``failed`` with the error."""

    task: Task
    status: str
    summaries: list[dict]
    error: str | None
    #: Seconds from the campaign's start to the task's end.
    ended_after_s: float

    def as_dict(self) -> dict:
        return {"task_id": self.task.task_id, "status": self.status,
                "runs": [spec.out for spec in self.task.specs], "error": self.error,
                "ended_after_s": self.ended_after_s, "summaries": self.summaries}


def run_tasks(client: distributed.Client, tasks: list[Task], *, retries: int,
              log, deadline: float | None = None) -> list[TaskOutcome]:
    """Submit every task, wait for all; their outcomes in the order of ``tasks``. A
    task's status is ``done``, ``failed``, or ``stopped`` where ``deadline`` (seconds
    since the epoch) stopped any of its runs before its end."""
    started = time.perf_counter()
    # A fresh key per campaign run: a scheduler that still holds a finished task of an
    # earlier run under the same key would hand back its old result instead of running.
    token = uuid.uuid4().hex[:8]
    # Priorities in the campaign's order: Dask runs tasks submitted at once in any order,
    # and where workers are fewer than tasks, the order says which a deadline cuts short.
    futures = {client.submit(run_task, list(task.specs), deadline, priority=-index,
                             key=f"{task.task_id}-{token}", retries=retries): task
               for index, task in enumerate(tasks)}
    outcomes: dict[str, TaskOutcome] = {}
    for future in distributed.as_completed(futures):
        task = futures[future]
        elapsed = time.perf_counter() - started
        if future.status == "finished":
            summaries = future.result()
            stopped = any(summary.get("stopped") for summary in summaries)
            outcome = TaskOutcome(task, "stopped" if stopped else "done", summaries, None,
                                  elapsed)
        else:
            outcome = TaskOutcome(task, "failed", [], _error_text(future), elapsed)
        outcomes[task.task_id] = outcome
        failed = sum(item.status == "failed" for item in outcomes.values())
        count = f"{len(outcomes)}/{len(tasks)} tasks done" + (f", {failed} failed"
                                                              if failed else "")
        if outcome.status != "failed":
            log(f"{task.task_id} ({task.describe()}): {outcome.status} after {elapsed:.0f} s"
                + _how_runs_started(outcome.summaries) + f"; {count}")
        else:
            log(f"{task.task_id} ({task.describe()}): FAILED after {elapsed:.0f} s: "
                f"{outcome.error}; {count}")
        future.release()
    return [outcomes[task.task_id] for task in tasks]


def _how_runs_started(summaries: list[dict]) -> str:
    """Which runs resumed from a checkpoint and which were finished before the task."""
    resumed = [f"{Path(s['path']).name} from step {s['started_from_step']}"
               for s in summaries if s["started_from_step"] and s["steps_run"]]
    finished = sum(s["already_finished"] for s in summaries)
    return ((f", resumed {', '.join(resumed)}" if resumed else "")
            + (f", {finished} run(s) already finished" if finished else ""))


def _error_text(future: distributed.Future) -> str:
    if future.status == "cancelled":
        return "cancelled (the scheduler lost the task)"
    error = future.exception()
    return " ".join(f"{type(error).__name__}: {error}".split())


def compare_ensembles(campaign: Campaign, outcomes: list[TaskOutcome], log) -> dict:
    """Run ``python -m mace_lpcalc.analysis.compare`` (in this process) over each
    ensemble's finished runs, into ``OUT/<ensemble>/comparison``; what each gave."""
    # Stopped runs are compared too (compare cuts all runs to the shortest); runs never
    # started have no file.
    finished = [summary["path"] for outcome in outcomes for summary in outcome.summaries
                if _has_two_frames(summary["path"])]
    comparisons = {}
    for ensemble in campaign.ensembles:
        folder = campaign.out_dir / ensemble.name
        paths = [path for path in finished if Path(path).parent == folder]
        out_dir = folder / "comparison"
        if not paths:
            log(f"compare {ensemble.name}: skipped, no finished runs")
            comparisons[ensemble.name] = {"exit_code": None, "runs": 0}
            continue
        log(f"compare {ensemble.name}: {len(paths)} run(s) into {out_dir}")
        try:
            exit_code = compare_main([*paths, "--out-dir", str(out_dir)])
            error = None if exit_code == 0 else "compare reported an error (see above)"
        except Exception as err:  # noqa: BLE001 -- the record must be written regardless
            traceback.print_exc()
            exit_code, error = 1, f"{type(err).__name__}: {err}"
        certificate = out_dir / "certificate.json"
        comparisons[ensemble.name] = {
            "exit_code": exit_code, "error": error, "runs": len(paths),
            "out_dir": str(out_dir),
            "certificate": str(certificate) if certificate.is_file() else None}
        log(f"compare {ensemble.name}: " + ("done" if exit_code == 0 else f"FAILED: {error}"))
    return comparisons


def _has_two_frames(path) -> bool:
    """Whether ``path`` is a trajectory with something to compare (a run stopped before
    its second logged frame, or never started, is left out)."""
    return Path(path).is_file() and len(read_trajectory(path, names=("step",))["step"]) >= 2


def write_record(path: Path, campaign: Campaign, specs: list[RunSpec],
                 outcomes: list[TaskOutcome], *, scheduler: dict, wall_time_s: float,
                 comparisons: dict | None, timings: dict | None = None) -> None:
    """``campaign.json``: the grid, every task's status and summaries, the wall time (and
    ``timings``: where it went) and the versions of dask and of what the runs depend on."""
    record = {
        "campaign": campaign.name, "campaign_file": str(campaign.path),
        "out_dir": str(campaign.out_dir), "runs_per_task": campaign.runs_per_task,
        "written": datetime.datetime.now().isoformat(timespec="seconds"),
        "wall_time_s": wall_time_s, "timings": timings or {},
        "tasks_done": sum(outcome.status == "done" for outcome in outcomes),
        "tasks_failed": sum(outcome.status == "failed" for outcome in outcomes),
        "tasks_stopped": sum(outcome.status == "stopped" for outcome in outcomes),
        "scheduler": scheduler, "versions": package_versions(),
        "grid": [dataclasses.asdict(spec) for spec in specs],
        "tasks": [outcome.as_dict() for outcome in outcomes],
        "comparisons": comparisons,
    }
    path.write_text(json.dumps(_finite(record), indent=2, allow_nan=False) + "\n",
                    encoding="utf-8")


def _finite(value):
    """``value`` with NaN and infinities as None (JSON null) and numpy scalars as numbers."""
    if isinstance(value, dict):
        return {str(key): _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
