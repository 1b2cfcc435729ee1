"""Campaigns: the grid and its tasks, errors that name the problem, the same results on a
two-worker Dask cluster as in one process, a killed worker's task resumed from its
checkpoint, and the SLURM job script a [cluster] table gives."""

import dataclasses
import importlib.util
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mace_lpcalc.campaign import CampaignError, expand_grid, group_tasks, load_campaign
from mace_lpcalc.campaign import cli
from mace_lpcalc.campaign.clusters import connect, jobqueue_cluster, start_cluster
from mace_lpcalc.campaign.task import run_task
from mace_lpcalc.md.checkpoint import Checkpoint, checkpoint_path
from mace_lpcalc.md.trajectory import read_trajectory
from mace_lpcalc.perf.dask_campaign import prepare, throughput

REPOSITORY = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("single_thread")


def campaign_file(path: Path, campaign: dict, ensembles: list[dict], cluster=None) -> Path:
    """Write a campaign TOML (JSON's strings, numbers, booleans and lists are TOML's)."""
    def table(values):
        return "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())
    text = "[campaign]\n" + table(campaign)
    text += "".join("\n[[ensemble]]\n" + table(ensemble) for ensemble in ensembles)
    if cluster is not None:
        text += "\n[cluster]\n" + table(cluster)
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def inputs(water_files, tmp_path_factory):
    """The 24-atom water box, the tiny model, and a small NPT settings file."""
    structure, model = water_files
    settings = tmp_path_factory.mktemp("settings") / "npt_small.toml"
    settings.write_text("thermostat_time_fs = 50.0\nsteps = 1000\nseed = 7\nlog_every = 2\n")
    return {"structure": str(structure), "model": str(model), "npt_settings": str(settings)}


def small_campaign(inputs, out_dir, **changes) -> tuple[dict, list[dict]]:
    campaign = {"name": "small", "out_dir": str(out_dir), "structure": inputs["structure"],
                "model": inputs["model"], "device": "cpu", "runs_per_task": 2,
                "policies": ["fp64", "fp32"], "seeds": [0, 1], **changes}
    ensembles = [{"name": "npt", "protocol": "npt", "settings": inputs["npt_settings"],
                  "steps": 8, "checkpoint_every": 4, "sentinel_every": 0},
                 {"name": "drift", "protocol": "nve", "steps": 8, "log_every": 2}]
    return campaign, ensembles


def test_the_grid_gives_every_ensemble_policy_and_seed_its_file_and_settings(inputs,
                                                                             tmp_path):
    campaign, ensembles = small_campaign(inputs, tmp_path / "out",
                                         policies=["fp64", "fp32", "fp32-linear-bf16"],
                                         seeds=[0, 1, 2])
    loaded = load_campaign(campaign_file(tmp_path / "c.toml", campaign, ensembles))
    specs = expand_grid(loaded)
    assert len(specs) == 2 * 3 * 3
    assert {Path(spec.out).relative_to(tmp_path / "out").as_posix() for spec in specs} == {
        f"{folder}/{protocol}_{policy}_seed{seed}.h5"
        for folder, protocol in (("npt", "npt"), ("drift", "nve"))
        for policy in ("fp64", "fp32", "fp32-linear-bf16") for seed in (0, 1, 2)}
    npt = next(spec for spec in specs if spec.ensemble == "npt" and spec.seed == 2)
    # The ensemble's steps beat the file's; the file's thermostat time stays; the grid's
    # seed beats the file's seed; the campaign's structure, model and device land.
    assert (npt.settings["steps"], npt.settings["thermostat_time_fs"], npt.settings["seed"],
            npt.settings["log_every"]) == (8, 50.0, 2, 2)
    assert (npt.settings["structure"], npt.settings["model"], npt.settings["device"]) == (
        inputs["structure"], inputs["model"], "cpu")
    drift = next(spec for spec in specs if spec.ensemble == "drift")
    assert "thermostat_time_fs" not in drift.settings and drift.settings["steps"] == 8

    tasks = group_tasks(specs, runs_per_task=2)
    assert len(tasks) == 2 * 3 * 2  # each ensemble and policy: seeds [0, 1] and [2]
    assert sorted(len(task.specs) for task in tasks) == [1] * 6 + [2] * 6
    for task in tasks:
        assert len({(spec.ensemble, spec.policy) for spec in task.specs}) == 1
    assert sorted(spec.out for task in tasks for spec in task.specs) == sorted(
        spec.out for spec in specs)
    assert len(group_tasks(specs, runs_per_task=1)) == 18
    assert len(group_tasks(specs, runs_per_task=5)) == 6


@pytest.mark.parametrize("change, message", [
    (lambda c, e: e[0].update(protocol="npx"), "ensemble 'npt': unknown protocol 'npx'"),
    (lambda c, e: c.update(policies=["fp32", "fp8"]), "unknown policy 'fp8'"),
    (lambda c, e: c.update(structure="missing.xyz"), "structure file not found: missing.xyz"),
    (lambda c, e: e[0].update(settings="missing.toml"), "settings file not found: missing"),
    (lambda c, e: e[1].update(temprature_K=300.0), "'drift': unknown setting.s. temprature_K"),
    (lambda c, e: e[1].update(seeds=[]), "'drift': empty grid: seeds"),
    (lambda c, e: c.update(policies=[]), "empty grid: policies"),
    (lambda c, e: e[1].update(seed=3), "'drift': seed cannot be set in an ensemble"),
    (lambda c, e: e[1].update(steps="10"), "'drift': steps must be int, got '10'"),
    (lambda c, e: e[1].update(steps=-1), "'drift': steps must be non-negative"),
    (lambda c, e: e[1].update(name="npt"), "ensemble name.s. npt used more than once"),
    (lambda c, e: c.update(workers=4), r"\[campaign\]: unknown key.s. workers"),
    (lambda c, e: c.update(runs_per_task=0), "runs_per_task must be a positive integer"),
])
def test_bad_campaigns_are_refused_naming_the_problem(inputs, tmp_path, change, message):
    campaign, ensembles = small_campaign(inputs, tmp_path / "out")
    change(campaign, ensembles)
    with pytest.raises(CampaignError, match=message):
        load_campaign(campaign_file(tmp_path / "bad.toml", campaign, ensembles))
    with pytest.raises(SystemExit, match="campaign: error: .*" + message):
        cli.main([str(tmp_path / "bad.toml"), "--dry-run"])


def test_the_shipped_campaign_and_a_dry_run(monkeypatch, capsys, inputs, tmp_path):
    monkeypatch.chdir(REPOSITORY)  # its paths are relative to the repository root
    shipped = load_campaign("protocols/campaign_npt_certificate.toml")
    specs = expand_grid(shipped)
    assert len(specs) == 2 * 5 * 16
    assert {spec.settings["steps"] for spec in specs if spec.protocol == "npt"} == {20000}
    assert {spec.settings["steps"] for spec in specs if spec.protocol == "nve"} == {10000}
    assert len(group_tasks(specs, shipped.runs_per_task)) == 10

    nve = load_campaign("protocols/campaign_nve_drift.toml")
    specs = expand_grid(nve)
    assert len(specs) == 5 * 16 and len(group_tasks(specs, nve.runs_per_task)) == 5
    assert {(spec.settings["steps"], spec.settings["compile_model"], spec.settings["device"])
            for spec in specs} == {(2400, "off", "cuda")}
    # The same campaign adapted for a small slot elsewhere (bench/nve_dask_campaign.sh).
    adapted = load_campaign(prepare("protocols/campaign_nve_drift.toml", tmp_path / "a.toml",
                                    out_dir=tmp_path / "small", steps=20, log_every=5,
                                    device="cpu", policies=["fp64", "fp32"], seeds=[3, 4]))
    assert adapted.out_dir == tmp_path / "small" and adapted.runs_per_task == 16
    assert [(spec.policy, spec.seed, spec.settings["steps"], spec.settings["log_every"],
             spec.settings["device"], spec.settings["compile_model"])
            for spec in expand_grid(adapted)] == [
        (policy, seed, 20, 5, "cpu", "off") for policy in ("fp64", "fp32") for seed in (3, 4)]

    campaign, ensembles = small_campaign(inputs, tmp_path / "out")
    assert cli.main([str(campaign_file(tmp_path / "c.toml", campaign, ensembles)),
                     "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "8 run(s) in 4 task(s)" in printed and "drift/nve_fp32_seed1.h5" in printed
    assert not (tmp_path / "out").exists()


def _series(path):
    return {name: values for name, values in read_trajectory(path).arrays.items()
            if name != "wall_time_per_step"}


def _assert_same_run(path, reference):
    run, expected = _series(path), _series(reference)
    assert run.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(run[name], expected[name], err_msg=f"{path}: {name}")
    final, final_expected = (Checkpoint.load(checkpoint_path(p)) for p in (path, reference))
    np.testing.assert_array_equal(final.atoms.positions, final_expected.atoms.positions)
    np.testing.assert_array_equal(final.atoms.get_momenta(), final_expected.atoms.get_momenta())


def test_run_task_replaces_a_half_written_file_and_skips_a_finished_run(inputs, tmp_path):
    campaign, ensembles = small_campaign(inputs, tmp_path / "out", policies=["fp64"],
                                         seeds=[3])
    spec = next(spec for spec in expand_grid(load_campaign(
        campaign_file(tmp_path / "c.toml", campaign, ensembles))) if spec.ensemble == "drift")
    Path(spec.out).parent.mkdir(parents=True)
    Path(spec.out).write_bytes(b"a run killed before its first checkpoint")
    [fresh] = run_task([spec])
    assert (fresh["steps_run"], fresh["started_from_step"], fresh["already_finished"]) == (
        8, 0, False)
    np.testing.assert_array_equal(read_trajectory(spec.out)["step"], [0, 2, 4, 6, 8])
    written = Path(spec.out).read_bytes()
    [again] = run_task([spec])
    assert (again["steps_run"], again["final_step"], again["already_finished"]) == (0, 8, True)
    assert again["energy_drift_meV_atom_ps"] == fresh["energy_drift_meV_atom_ps"]
    assert Path(spec.out).read_bytes() == written
    changed = dataclasses.replace(spec, settings={**spec.settings, "timestep_fs": 0.5})
    with pytest.raises(ValueError, match="finished with different settings: timestep_fs"):
        run_task([changed])


@pytest.fixture(scope="module")
def cluster():
    """Two single-threaded worker processes, as ``--scheduler local --workers 2`` starts."""
    connection = connect("local", workers=2, dashboard_address=":0")
    yield connection
    connection.close()


def test_a_campaign_on_two_workers_equals_the_serial_runs(cluster, inputs, tmp_path):
    campaign, ensembles = small_campaign(inputs, tmp_path / "out")
    path = campaign_file(tmp_path / "c.toml", campaign, ensembles)
    assert cli.main([str(path), "--scheduler-address", cluster.description["address"]]) == 0

    specs = expand_grid(load_campaign(path))
    for task in group_tasks(specs, runs_per_task=2):  # the same tasks, in this process
        run_task([dataclasses.replace(spec, out=str(tmp_path / "serial" / spec.describe()))
                  for spec in task.specs])
    for spec in specs:
        assert checkpoint_path(spec.out).is_file()
        _assert_same_run(spec.out, tmp_path / "serial" / spec.describe())
    record = json.loads((tmp_path / "out" / "campaign.json").read_text())
    assert [task["status"] for task in record["tasks"]] == ["done"] * 4
    assert len(record["grid"]) == 8 and record["versions"]["torch"]
    assert {summary["path"] for task in record["tasks"] for summary in task["summaries"]} == {
        spec.out for spec in specs}
    for ensemble in ("npt", "drift"):
        certificate = json.loads(
            (tmp_path / "out" / ensemble / "comparison" / "certificate.json").read_text())
        assert certificate, f"{ensemble}: empty certificate"
        assert record["comparisons"][ensemble]["exit_code"] == 0
    log = (tmp_path / "out" / "campaign.log").read_text()
    assert "4/4 tasks done" in log and "dashboard: http" in log

    timings = record["timings"]
    assert 0 < timings["connect_s"] and 0 < timings["compare_s"]
    assert timings["connect_s"] + timings["tasks_s"] + timings["compare_s"] <= \
        record["wall_time_s"]
    measured = throughput(record)
    assert [(row["policy"], row["replica_steps"]) for row in measured["tasks"]] == [
        ("fp64", 16), ("fp32", 16), ("fp64", 16), ("fp32", 16)]
    for row in measured["tasks"]:  # two replicas of 8 steps in each task
        assert 0 < row["md_s"] < row["task_wall_s"]
        assert row["replica_steps_per_s"] == pytest.approx(16 / row["md_s"])
        assert row["ms_per_batched_step"] == pytest.approx(1000 * row["md_s"] / 8)
    overall = measured["overall"]
    assert overall["replica_steps"] == 64
    assert overall["md_s"] == pytest.approx(sum(row["md_s"] for row in measured["tasks"]))
    assert overall["replica_steps_per_s_tasks"] > overall["replica_steps_per_s_campaign"]


def test_one_worker_runs_the_tasks_in_the_campaigns_order(inputs, tmp_path):
    # Dask runs tasks submitted within its fifo timeout in any order; a campaign on one
    # GPU relies on its order (which task a deadline cuts short).
    campaign, ensembles = small_campaign(inputs, tmp_path / "out", runs_per_task=1,
                                         policies=["fp64", "fp32", "fp32-linear-bf16"])
    ensembles = [{**ensembles[1], "steps": 2}]
    path = campaign_file(tmp_path / "c.toml", campaign, ensembles)
    connection = connect("local", workers=1, dashboard_address=":0")
    try:
        assert cli.main([str(path), "--scheduler-address", connection.description["address"],
                         "--no-compare"]) == 0
    finally:
        connection.close()
    tasks = json.loads((tmp_path / "out" / "campaign.json").read_text())["tasks"]
    ended = [task["ended_after_s"] for task in tasks]  # in the campaign's order
    assert ended == sorted(ended), [task["task_id"] for task in tasks]


def test_a_killed_workers_task_is_run_again_from_its_checkpoint(cluster, inputs, tmp_path):
    steps, checkpoint_every = 90, 20
    campaign, ensembles = small_campaign(inputs, tmp_path / "out", policies=["fp64"],
                                         seeds=[5], runs_per_task=1)
    ensembles = [{**ensembles[1], "steps": steps, "log_every": 5,
                  "checkpoint_every": checkpoint_every}]
    path = campaign_file(tmp_path / "c.toml", campaign, ensembles)
    [spec] = expand_grid(load_campaign(path))
    result = {}
    campaign_thread = threading.Thread(target=lambda: result.update(code=cli.main(
        [str(path), "--scheduler-address", cluster.description["address"], "--no-compare"])))
    campaign_thread.start()

    client, killed = cluster.client, None
    deadline = time.monotonic() + 120
    while killed is None and campaign_thread.is_alive():
        assert time.monotonic() < deadline, "no checkpoint past step 0 within 120 s"
        checkpoint = checkpoint_path(spec.out)
        if checkpoint.exists() and Checkpoint.load(checkpoint).step >= checkpoint_every:
            running = [worker for worker, keys in client.processing().items() if keys]
            [worker] = running
            os.kill(client.run(os.getpid)[worker], signal.SIGKILL)
            killed = worker
        time.sleep(0.02)
    campaign_thread.join(timeout=180)
    assert killed is not None and result.get("code") == 0

    [task] = json.loads((tmp_path / "out" / "campaign.json").read_text())["tasks"]
    [summary] = task["summaries"]
    assert checkpoint_every <= summary["started_from_step"] < steps
    assert summary["steps_run"] == steps - summary["started_from_step"]
    assert f"resumed nve_fp64_seed5.h5 from step {summary['started_from_step']}" in (
        tmp_path / "out" / "campaign.log").read_text()
    # Every frame once, and the same run as one never interrupted.
    np.testing.assert_array_equal(read_trajectory(spec.out)["step"], np.arange(0, steps + 1, 5))
    reference = dataclasses.replace(spec, out=str(tmp_path / "uninterrupted.h5"))
    run_task([reference])
    _assert_same_run(spec.out, reference.out)


def test_a_deadline_stops_a_task_with_a_checkpoint_and_the_rerun_finishes_it(
        inputs, tmp_path, monkeypatch):
    from mace_lpcalc.campaign import task as task_module
    campaign, ensembles = small_campaign(inputs, tmp_path / "out", policies=["fp64"],
                                         seeds=[4], runs_per_task=1)
    ensembles = [{**ensembles[1], "steps": 400, "log_every": 5}]
    [spec] = expand_grid(load_campaign(campaign_file(tmp_path / "c.toml", campaign, ensembles)))
    [not_started] = run_task([spec], deadline=time.time() + 1.0)
    assert not_started["stopped"].startswith("not started") and not Path(spec.out).exists()

    monkeypatch.setattr(task_module, "MIN_TASK_S", 0.1)  # let a short slot start
    [stopped] = run_task([spec], deadline=time.time() + 0.5)
    step = Checkpoint.load(checkpoint_path(spec.out)).step
    assert stopped["stopped"].startswith("max_wall_s") and 0 < step < 400
    [finished] = run_task([spec])
    assert finished["stopped"] is None and finished["started_from_step"] == step
    reference = dataclasses.replace(spec, out=str(tmp_path / "uninterrupted.h5"))
    run_task([reference])
    _assert_same_run(spec.out, reference.out)


def test_a_campaign_past_its_wall_time_starts_nothing_and_says_so(cluster, inputs, tmp_path):
    campaign, ensembles = small_campaign(inputs, tmp_path / "out")
    path = campaign_file(tmp_path / "c.toml", campaign, ensembles)
    assert cli.main([str(path), "--scheduler-address", cluster.description["address"],
                     "--max-wall-s", "1"]) == 0
    record = json.loads((tmp_path / "out" / "campaign.json").read_text())
    assert (record["tasks_done"], record["tasks_stopped"], record["tasks_failed"]) == (0, 4, 0)
    assert all(summary["stopped"].startswith("not started")
               for task in record["tasks"] for summary in task["summaries"])
    assert "stopped by --max-wall-s, to continue" in (
        tmp_path / "out" / "campaign.log").read_text()
    with pytest.raises(SystemExit, match="--max-wall-s must be 0"):
        cli.main([str(path), "--max-wall-s", "-5"])


def test_the_slurm_job_script_carries_the_cluster_table():
    pytest.importorskip("dask_jobqueue")
    cluster = jobqueue_cluster("slurm", {
        "queue": "gpu", "account": "my_account", "walltime": "02:00:00", "cores": 1,
        "processes": 1, "memory": "16GB", "job_extra_directives": ["--gres=gpu:1"]},
        dashboard_address=":0")
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    for line in ("#SBATCH -p gpu", "#SBATCH -A my_account", "#SBATCH -t 02:00:00",
                 "#SBATCH --gres=gpu:1", "#SBATCH --mem=15G"):
        assert line in script, script
    with pytest.raises(CampaignError, match="cluster. table for SLURMCluster.*qeue"):
        jobqueue_cluster("slurm", {"qeue": "gpu", "cores": 1, "memory": "1GB"})
    with pytest.raises(CampaignError, match="jobs must be a positive integer"):
        start_cluster("slurm", workers=None, cluster_options={"jobs": 0},
                      dashboard_address=":0")


@pytest.mark.skipif(importlib.util.find_spec("dask_cuda") is not None,
                    reason="dask-cuda is installed")
def test_the_cuda_scheduler_without_dask_cuda_says_what_to_install():
    with pytest.raises(CampaignError, match=r"needs dask-cuda.*mace_lpcalc\[cuda-cluster\]"):
        start_cluster("cuda", workers=None, cluster_options={}, dashboard_address=":0")
