"""The README's main job: validate a policy against fp64 on the shipped model and box."""

import pytest

from mace_lpcalc.__main__ import main
from mace_lpcalc.analysis import load_run
from mace_lpcalc.models import default_model_path

pytestmark = pytest.mark.skipif(default_model_path() is None, reason="shipped model missing")


def test_main_job_writes_both_runs_and_the_comparison(tmp_path):
    # 40 steps logged every 2: the comparison still sees 21 frames per run.
    assert main(["--steps", "40", "--log-every", "2", "--policy", "fp32",
                 "--out-dir", str(tmp_path)]) == 0
    runs = [load_run(tmp_path / f"nvt_{policy}_seed0.h5") for policy in ("fp64", "fp32")]
    assert [run.policy for run in runs] == ["fp64", "fp32"]
    assert all(run.trajectory.n_frames == 21 for run in runs)
    # Same start, same seed, fp32 vs fp64: the first frames agree to float32 rounding.
    assert abs(runs[0].series["temperature"][1] - runs[1].series["temperature"][1]) < 1e-3
    summary = (tmp_path / "comparison" / "summary.md").read_text()
    assert "Static deviations vs fp64" in summary and "fp32 (n=1)" in summary
    for name in ("summary.csv", "static_deviations.csv", "rdf.png"):
        assert (tmp_path / "comparison" / name).stat().st_size > 0
