"""Stopping before the end with a checkpoint (a job slot's wall time, SIGTERM) loses no
simulated time: the resumed run equals one that was never stopped."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT

from mace_lpcalc.md.base import STOP_REQUESTED
from mace_lpcalc.md.checkpoint import Checkpoint, checkpoint_path
from mace_lpcalc.md.nve import NVE, NVESettings
from mace_lpcalc.md.nvt import NVT, NVTSettings
from mace_lpcalc.md.trajectory import read_trajectory

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Exact equality between processes needs the same torch thread count in each.
SINGLE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

pytestmark = pytest.mark.usefixtures("single_thread")


def _copper(tmp_path):
    path = tmp_path / "cu.xyz"
    bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2).write(path)
    return path


def _positions_and_momenta(path):
    final = Checkpoint.load(checkpoint_path(path))
    return final.step, final.atoms.positions, final.atoms.get_momenta()


def test_a_run_past_max_wall_s_stops_with_a_checkpoint_and_resumes_exactly(tmp_path):
    common = dict(structure=str(_copper(tmp_path)), steps=12, log_every=3, seed=5,
                  checkpoint_every=100, temperature_K=500.0)
    reference = tmp_path / "reference.h5"
    NVT(NVTSettings(**common, out=str(reference)), calculator=EMT()).run()

    stopped = tmp_path / "stopped.h5"
    summary = NVT(NVTSettings(**common, out=str(stopped), max_wall_s=1e-9),
                  calculator=EMT()).run()
    assert summary["stopped"].startswith("max_wall_s")
    assert summary["steps_run"] == 1
    assert Checkpoint.load(checkpoint_path(stopped)).step == 1  # not the step-0 one

    resumed = NVT(NVTSettings(**common, out=str(stopped), resume=True),
                  calculator=EMT()).run()
    assert resumed["stopped"] is None and resumed["steps_run"] == 11
    # EMT rebuilds its neighbour list on resume, so sums differ in the last bits.
    for expected, got in zip(_positions_and_momenta(reference), _positions_and_momenta(stopped)):
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(read_trajectory(stopped)["potential_energy"],
                               read_trajectory(reference)["potential_energy"], rtol=1e-12)


def test_a_stop_request_ends_the_run_after_the_current_step(tmp_path):
    settings = NVESettings(structure=str(_copper(tmp_path)), steps=50, log_every=5,
                           out=str(tmp_path / "run.h5"))

    class StopAtThirdCall(EMT):
        calls = 0

        def calculate(self, *args, **kwargs):
            super().calculate(*args, **kwargs)
            self.calls += 1
            if self.calls == 3:  # the first call is the set-up's, then one per step
                STOP_REQUESTED.set()

    try:
        summary = NVE(settings, calculator=StopAtThirdCall()).run()
    finally:
        STOP_REQUESTED.clear()
    assert summary["stopped"] == "stop requested"
    assert Checkpoint.load(checkpoint_path(settings.out)).step == summary["steps_run"] == 2


def test_a_negative_wall_limit_is_refused():
    with pytest.raises(ValueError, match="max_wall_s"):
        NVESettings(structure="x.xyz", max_wall_s=-1.0)


def test_sigterm_checkpoints_the_command_line_run_which_then_resumes_exactly(
        water_files, tmp_path):
    structure, model = water_files
    options = ["--model", str(model), "--policy", "fp64", "--seed", "2", "--dt", "0.5",
               "--log-every", "2", "--checkpoint-every", "100000"]
    stopped = tmp_path / "stopped.h5"
    with open(tmp_path / "stopped.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "mace_lpcalc.protocols.nve", str(structure), *options,
             "--steps", "100000", "--out", str(stopped)],
            cwd=REPOSITORY, env=SINGLE_THREAD, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        deadline = time.monotonic() + 240
        while not checkpoint_path(stopped).exists():  # the step-0 checkpoint: MD has begun
            assert process.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "stopped.log").read_text()
            time.sleep(0.05)
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM, (tmp_path / "stopped.log").read_text()
    assert json.loads(output)["stopped"] == "stop requested"
    step = Checkpoint.load(checkpoint_path(stopped)).step
    assert 0 < step < 100000
    assert "stopped at step" in (tmp_path / "stopped.log").read_text()

    total = step + 3
    common = dict(structure=str(structure), model=str(model), policy="fp64", seed=2,
                  timestep_fs=0.5, log_every=2, steps=total)
    NVE(NVESettings(**common, out=str(stopped), resume=True)).run()
    reference = tmp_path / "reference.h5"
    NVE(NVESettings(**common, out=str(reference))).run()
    for expected, got in zip(_positions_and_momenta(reference), _positions_and_momenta(stopped)):
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(read_trajectory(stopped)["step"],
                                  read_trajectory(reference)["step"])
