"""The campaign command line: ``python -m mace_lpcalc.campaign CAMPAIGN.toml [options]``.

Checks the campaign file, expands its grid into tasks, starts (or joins) a Dask cluster,
runs the tasks, writes ``OUT/campaign.json`` and compares each ensemble's runs. A bad
campaign file is reported in one line (``--debug`` shows the traceback). Exit status 0
when every task and comparison succeeded (tasks ``--max-wall-s`` stopped included: run
the campaign again to continue them), 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time

from mace_lpcalc.campaign.clusters import SCHEDULERS, connect, dashboard_note
from mace_lpcalc.campaign.config import CampaignError, load_campaign
from mace_lpcalc.campaign.execute import (CampaignLog, compare_ensembles, run_tasks,
                                          write_record)
from mace_lpcalc.campaign.grid import describe_plan, expand_grid, group_tasks

PROG = "python -m mace_lpcalc.campaign"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Run a validation campaign (ensembles × precision policies "
                               "× seeds of MD) on a Dask cluster, then compare each "
                               "ensemble's runs against fp64.")
    parser.add_argument("campaign", help="campaign file (TOML)")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default=None,
                        help="cluster to start: local processes (default), one worker per "
                             "GPU (cuda, needs dask-cuda), or batch jobs from the [cluster] "
                             "table (slurm, pbs; need dask-jobqueue)")
    parser.add_argument("--scheduler-address", metavar="tcp://HOST:PORT",
                        help="join this running Dask scheduler instead of starting one")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes of --scheduler local (default: one per CPU "
                             "core) or cuda (default: one per GPU)")
    parser.add_argument("--retries", type=int, default=2,
                        help="times a task that failed or whose worker died runs again, "
                             "resuming from its checkpoints (default 2)")
    parser.add_argument("--dashboard-address", default=":8787",
                        help="where a cluster started here serves its dashboard")
    parser.add_argument("--max-wall-s", type=float, default=0.0, metavar="S",
                        help="end within about S seconds, e.g. before a job slot ends: "
                             "running runs stop with a checkpoint, tasks not yet started "
                             "wait; run the campaign again to continue (default 0: no limit)")
    parser.add_argument("--no-compare", action="store_true",
                        help="skip the per-ensemble comparison at the end")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the grid and the tasks and stop")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of one line")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.scheduler and args.scheduler_address:
            raise CampaignError("give --scheduler or --scheduler-address, not both")
        if args.workers is not None and args.workers < 1:
            raise CampaignError(f"--workers must be positive, got {args.workers}")
        if args.retries < 0:
            raise CampaignError(f"--retries must be 0 or more, got {args.retries}")
        if args.max_wall_s < 0:
            raise CampaignError(f"--max-wall-s must be 0 (no limit) or positive, got "
                                f"{args.max_wall_s}")
        campaign = load_campaign(args.campaign)
        specs = expand_grid(campaign)
        tasks = group_tasks(specs, campaign.runs_per_task)
        if args.dry_run:
            print(describe_plan(campaign, specs, tasks))
            return 0
        return run_campaign(campaign, specs, tasks, args)
    except (CampaignError, OSError) as err:
        if args.debug:
            raise
        raise SystemExit(f"{PROG}: error: {' '.join(str(err).split())}") from None


def run_campaign(campaign, specs, tasks, args) -> int:
    """Run the tasks on the cluster ``args`` names; write the record and comparisons."""
    started = time.perf_counter()
    # Wall-clock seconds since the epoch: workers on other hosts compare it with theirs.
    deadline = time.time() + args.max_wall_s if args.max_wall_s else None
    campaign.out_dir.mkdir(parents=True, exist_ok=True)
    log = CampaignLog(campaign.out_dir / "campaign.log")
    # Where the wall time goes (the record's "timings"): starting or joining the cluster,
    # the tasks from submission to the last one's end, and the comparisons.
    timings = {"max_wall_s": args.max_wall_s or None}
    try:
        connection = connect(args.scheduler or "local", address=args.scheduler_address,
                             workers=args.workers, cluster_options=campaign.cluster,
                             allowed_failures=args.retries,
                             dashboard_address=args.dashboard_address)
        try:
            timings["connect_s"] = time.perf_counter() - started
            scheduler = connection.description
            log(f"campaign {campaign.name}: {len(specs)} run(s) in {len(tasks)} task(s) on "
                f"{scheduler['scheduler']} scheduler {scheduler['address']}; dashboard: "
                f"{scheduler['dashboard']}{dashboard_note()}")
            outcomes = run_tasks(connection.client, tasks, retries=args.retries, log=log,
                                 deadline=deadline)
            timings["tasks_s"] = time.perf_counter() - started - timings["connect_s"]
        finally:
            connection.close()
        record_path = campaign.out_dir / "campaign.json"
        # Written before comparing, so that a comparison that fails leaves the record.
        write_record(record_path, campaign, specs, outcomes, scheduler=scheduler,
                     wall_time_s=time.perf_counter() - started, comparisons=None,
                     timings=timings)
        compare_started = time.perf_counter()
        comparisons = None if args.no_compare else compare_ensembles(campaign, outcomes, log)
        timings["compare_s"] = time.perf_counter() - compare_started
        wall_time_s = time.perf_counter() - started
        write_record(record_path, campaign, specs, outcomes, scheduler=scheduler,
                     wall_time_s=wall_time_s, comparisons=comparisons, timings=timings)
        failed = [outcome.task.task_id for outcome in outcomes if outcome.status == "failed"]
        stopped = [outcome.task.task_id for outcome in outcomes if outcome.status == "stopped"]
        failed_comparisons = [name for name, result in (comparisons or {}).items()
                              if result["exit_code"] not in (0, None)]
        done = len(outcomes) - len(failed) - len(stopped)
        log(f"campaign {campaign.name}: {done}/{len(outcomes)} tasks "
            f"done in {wall_time_s:.0f} s" + (f"; failed: {', '.join(failed)}" if failed
                                              else "")
            + (f"; stopped by --max-wall-s, to continue: {', '.join(stopped)}" if stopped
               else "")
            + (f"; comparison failed: {', '.join(failed_comparisons)}"
               if failed_comparisons else "") + f"; record: {record_path}")
        return 1 if failed or failed_comparisons else 0
    finally:
        log.close()


if __name__ == "__main__":
    sys.exit(main())
