"""A campaign's throughput on its cluster, from the ``campaign.json`` it wrote; and a
campaign file adapted for one slot (output folder, steps, device, grid).

    python -m mace_lpcalc.perf.dask_campaign prepare protocols/campaign_nve_drift.toml \\
        OUT/campaign.toml --out-dir OUT --steps 2400
    python -m mace_lpcalc.perf.dask_campaign report OUT/campaign.json \\
        --out OUT/dask_campaign_throughput.json --scheduler cuda

``bench/nve_dask_campaign.sh`` runs both around ``python -m mace_lpcalc.campaign``.

The report, per task (one policy's batched replicas on one worker) and overall:
replica-steps per second over the MD loops (each run's ``ns_per_day`` back to seconds),
over the tasks' whole wall time and over the campaign's; where the rest of the time went
(cluster start, each task's set-up: worker imports, calculator, first forces, files; the
comparison); the GPU, the versions and the date.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mace_lpcalc.toml_files import read_toml

_SECONDS_PER_DAY = 86400.0


# -- prepare ---------------------------------------------------------------------------
def prepare(source, destination, *, out_dir, steps=None, log_every=None, device=None,
            policies=None, seeds=None) -> Path:
    """Write ``source`` with these values replaced to ``destination``: ``out_dir``,
    ``device``, ``policies`` and ``seeds`` in ``[campaign]``, ``steps`` and ``log_every``
    in every ensemble. Relative paths in it stay relative to where the campaign starts."""
    document = read_toml(source, "campaign")
    table = document["campaign"]
    table["out_dir"] = str(out_dir)
    for key, value in (("device", device), ("policies", policies), ("seeds", seeds)):
        if value is not None:
            document.pop(key, None)  # a top-level grid list would clash with [campaign]'s
            table[key] = value
    grid = {"policies": policies, "seeds": seeds}
    for ensemble in document.get("ensemble", []):
        for key in [key for key in grid if grid[key] is not None]:
            ensemble.pop(key, None)  # the ensemble's own list would beat [campaign]'s
        ensemble.update({key: value for key, value in (("steps", steps),
                                                       ("log_every", log_every))
                         if value is not None})
    text = f"# {Path(source).name}, adapted by python -m mace_lpcalc.perf.dask_campaign\n"
    # Top-level keys (grid lists) before the first table, as TOML wants.
    text += _toml_table({key: value for key, value in document.items()
                         if key not in ("campaign", "ensemble", "cluster")})
    text += "\n[campaign]\n" + _toml_table(table)
    text += "".join("\n[[ensemble]]\n" + _toml_table(entry)
                    for entry in document.get("ensemble", []))
    if "cluster" in document:
        text += "\n[cluster]\n" + _toml_table(document["cluster"])
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_text(text, encoding="utf-8")
    return destination


def _toml_table(values: dict) -> str:
    return "".join(f"{key} = {_toml(value)}\n" for key, value in values.items())


def _toml(value) -> str:
    """A TOML value: JSON's strings, numbers, booleans and lists are TOML's; a dict is an
    inline table."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(key)} = {_toml(item)}"
                               for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return json.dumps(value)


# -- report ----------------------------------------------------------------------------
def throughput(record: dict) -> dict:
    """Replica-steps per second and set-up times from a ``campaign.json`` record."""
    from mace_lpcalc.campaign.config import PROTOCOLS  # torch and mace: only when reporting

    grid = {spec["out"]: spec for spec in record["grid"]}
    tasks, total_steps, total_md_s = [], 0, 0.0
    for task in record["tasks"]:
        runs = task["summaries"]
        row = {"task": task["task_id"], "status": task["status"],
               "policy": grid[task["runs"][0]]["policy"], "replicas": len(task["runs"]),
               "error": task["error"],
               "stopped": sorted({run["stopped"] for run in runs if run.get("stopped")})}
        ran = [run for run in runs if run["steps_run"]]
        if ran:
            md_s = []
            for run in ran:  # each replica's MD loop, back from its ns/day
                spec = grid[run["path"]]
                timestep_fs = PROTOCOLS[spec["protocol"]].settings_class(
                    **spec["settings"]).timestep_fs
                md_s.append(run["steps_run"] * timestep_fs * 1e-6 * _SECONDS_PER_DAY
                            / run["ns_per_day"])
            # The replicas of a task step together: its MD time is the longest loop.
            loop_s, steps = max(md_s), sum(run["steps_run"] for run in ran)
            wall_s = runs[0]["wall_time_s"]
            row.update({
                "steps_per_replica": sorted({run["steps_run"] for run in ran}),
                "final_step": sorted({run["final_step"] for run in ran}),
                "replica_steps": steps, "md_s": loop_s,
                "replica_steps_per_s": steps / loop_s,
                "ms_per_batched_step": 1000.0 * loop_s / max(run["steps_run"] for run in ran),
                "task_wall_s": wall_s, "task_setup_s": wall_s - loop_s,
                # From the task's submission: for the first, the worker's imports.
                "started_after_s": task["ended_after_s"] - wall_s})
            total_steps += steps
            total_md_s += loop_s
        tasks.append(row)
    timings = record.get("timings", {})
    overall = {"replica_steps": total_steps, "md_s": total_md_s,
               "replica_steps_per_s_md": total_steps / total_md_s if total_md_s else None,
               "campaign_wall_s": record["wall_time_s"]}
    if timings.get("tasks_s"):
        overall["replica_steps_per_s_tasks"] = total_steps / timings["tasks_s"]
    overall["replica_steps_per_s_campaign"] = total_steps / record["wall_time_s"]
    first = next((row for row in tasks if "started_after_s" in row), None)
    overall["setup_s"] = {
        "cluster_start": timings.get("connect_s"),
        "first_task_start": first["started_after_s"] if first else None,
        "tasks_total": sum(row.get("task_setup_s", 0.0) for row in tasks),
        "comparison": timings.get("compare_s")}
    return {"tasks": tasks, "overall": overall, "timings": timings}


def report(record_path, *, scheduler: str, scheduler_note: str = "", command: str = "",
           command_wall_s: float | None = None) -> dict:
    """The throughput report of the campaign whose record is ``record_path`` (or, where it
    is missing, what is known without it)."""
    import torch

    from mace_lpcalc.installed import measurement_provenance

    record_path = Path(record_path)
    result = {
        "benchmark": "single-GPU Dask campaign throughput (python -m mace_lpcalc.campaign): "
                     "one task per policy, its seeds as batched replicas",
        **measurement_provenance("cuda" if torch.cuda.is_available() else "cpu"),
        "scheduler": scheduler, "scheduler_note": scheduler_note or None,
        "command": command or None, "command_wall_s": command_wall_s,
        "record": str(record_path)}
    if not record_path.is_file():
        return {**result, "error": f"{record_path} is missing: the campaign did not get "
                                   "as far as writing its record"}
    record = json.loads(record_path.read_text(encoding="utf-8"))
    first = record["grid"][0] if record["grid"] else {}
    result.update({
        "campaign": record["campaign"], "dask": record["scheduler"],
        "device": first.get("settings", {}).get("device"),
        "protocol": first.get("protocol"),
        "structure": Path(first.get("settings", {}).get("structure", "")).name or None,
        "runs": len(record["grid"]), "runs_per_task": record["runs_per_task"],
        "tasks_done": record["tasks_done"], "tasks_stopped": record["tasks_stopped"],
        "tasks_failed": record["tasks_failed"],
        "comparisons": {name: {"exit_code": value.get("exit_code"), "runs": value.get("runs")}
                        for name, value in (record.get("comparisons") or {}).items()},
        **throughput(record)})
    if command_wall_s:
        # The command's own start-up (imports) and exit are outside the record's wall time.
        result["overall"]["replica_steps_per_s_command"] = (
            result["overall"]["replica_steps"] / command_wall_s)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mace_lpcalc.perf.dask_campaign",
                                     description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    adapt = commands.add_parser("prepare", help="write an adapted campaign file")
    adapt.add_argument("source")
    adapt.add_argument("destination")
    adapt.add_argument("--out-dir", required=True)
    adapt.add_argument("--steps", type=int)
    adapt.add_argument("--log-every", type=int)
    adapt.add_argument("--device")
    adapt.add_argument("--policies", nargs="+")
    adapt.add_argument("--seeds", nargs="+", type=int)
    measure = commands.add_parser("report", help="write the throughput JSON")
    measure.add_argument("record", help="the campaign's campaign.json")
    measure.add_argument("--out", required=True, help="JSON file to write")
    measure.add_argument("--scheduler", required=True, help="the --scheduler it ran on")
    measure.add_argument("--scheduler-note", default="", help="why that scheduler")
    measure.add_argument("--command", default="", help="the campaign command line")
    measure.add_argument("--command-wall-s", type=float,
                         help="wall time of the whole campaign command (s)")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        print(prepare(args.source, args.destination, out_dir=args.out_dir, steps=args.steps,
                      log_every=args.log_every, device=args.device, policies=args.policies,
                      seeds=args.seeds))
        return 0
    result = report(args.record, scheduler=args.scheduler, scheduler_note=args.scheduler_note,
                    command=args.command, command_wall_s=args.command_wall_s)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    overall = result.get("overall", {})
    print(f"{args.out}: {overall.get('replica_steps', 0)} replica-steps, "
          f"{overall.get('replica_steps_per_s_md') or 0:.3g}/s in the MD loops, "
          f"{overall.get('replica_steps_per_s_campaign') or 0:.3g}/s over the campaign"
          + (f"; {result['error']}" if "error" in result else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
