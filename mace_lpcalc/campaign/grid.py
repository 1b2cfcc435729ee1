"""A campaign's grid: ensemble × policy × seed expanded into run specs, and the specs
grouped into tasks.

Every run of an ensemble writes ``OUT/<ensemble>/<protocol>_<policy>_seed<k>.h5`` (its
checkpoint beside it), so one folder per ensemble holds what
``python -m mace_lpcalc.analysis.compare`` groups by policy. A task is what one worker
runs at a time: runs that differ only in their seed (same protocol, policy and every
other setting), at most ``runs_per_task`` of them, so that a batched-replica runner can
later run one task's seeds in one pass on a GPU.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from mace_lpcalc.campaign.config import PROTOCOLS, Campaign


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One MD run of the grid; plain data, so that Dask can ship it to a worker."""

    ensemble: str
    protocol: str
    policy: str
    seed: int
    #: Every explicit setting of the run (policy and seed included) but its output file.
    settings: dict
    out: str

    def describe(self) -> str:
        return f"{self.ensemble}/{Path(self.out).name}"


@dataclasses.dataclass(frozen=True)
class Task:
    """Runs one worker runs in a row (by :func:`mace_lpcalc.campaign.task.run_task`)."""

    task_id: str
    specs: tuple[RunSpec, ...]

    def describe(self) -> str:
        first = self.specs[0]
        seeds = ",".join(str(spec.seed) for spec in self.specs)
        return f"{first.ensemble}/{first.policy} seed {seeds}"


def run_file_name(protocol: str, policy: str, seed: int) -> str:
    return f"{protocol}_{policy}_seed{seed}.h5"


def expand_grid(campaign: Campaign) -> list[RunSpec]:
    """Every run of the campaign, ensemble by ensemble, policy by policy, seed by seed."""
    return [RunSpec(ensemble=ensemble.name, protocol=ensemble.protocol, policy=policy,
                    seed=seed, settings={**ensemble.settings, "policy": policy, "seed": seed},
                    out=str(campaign.out_dir / ensemble.name
                            / run_file_name(ensemble.protocol, policy, seed)))
            for ensemble in campaign.ensembles
            for policy in ensemble.policies
            for seed in ensemble.seeds]


def group_tasks(specs: list[RunSpec], runs_per_task: int) -> list[Task]:
    """Specs that differ only in seed and output file, in grid order, cut into tasks of
    at most ``runs_per_task``."""
    if runs_per_task < 1:
        raise ValueError(f"runs_per_task must be positive, got {runs_per_task}")
    groups: dict[tuple, list[RunSpec]] = {}
    for spec in specs:
        shared = {key: value for key, value in spec.settings.items() if key != "seed"}
        groups.setdefault((spec.protocol, json.dumps(shared, sort_keys=True)), []).append(spec)
    chunks = [group[start:start + runs_per_task] for group in groups.values()
              for start in range(0, len(group), runs_per_task)]
    return [Task(task_id=f"task{index:03d}-{chunk[0].protocol}-{chunk[0].policy}",
                 specs=tuple(chunk))
            for index, chunk in enumerate(chunks)]


def describe_plan(campaign: Campaign, specs: list[RunSpec], tasks: list[Task]) -> str:
    """What ``--dry-run`` prints: the grid and the tasks, nothing run."""
    lines = [f"campaign {campaign.name}: {len(campaign.ensembles)} ensemble(s), "
             f"{len(specs)} run(s) in {len(tasks)} task(s), output in {campaign.out_dir}",
             "", "grid:"]
    for spec in specs:
        steps = PROTOCOLS[spec.protocol].settings_class(**spec.settings).steps
        lines.append(f"  {spec.describe():<48} {spec.protocol} {spec.policy:<17} "
                     f"seed {spec.seed:<4} steps {steps}")
    lines += ["", "tasks:"]
    for task in tasks:
        lines.append(f"  {task.task_id}: " + ", ".join(spec.describe() for spec in task.specs))
    return "\n".join(lines)
