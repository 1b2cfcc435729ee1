"""The load test's arithmetic and its record of a short real run."""

import json

import numpy as np
import pytest

from mace_lpcalc.perf import load_test


def test_growth_is_the_slope_over_the_second_half():
    steps = np.arange(0, 2000, 100, dtype=float)
    values = np.where(steps < 1000, 50.0 + steps, 1000.0 + 0.004 * steps)  # start-up, then a leak
    assert load_test.growth_per_1000_steps(steps, values) == pytest.approx(4.0)
    assert np.isnan(load_test.growth_per_1000_steps(steps[:2], values[:2]))


def test_a_short_run_records_every_frame_and_its_size(tmp_path):
    out = tmp_path / "result.json"
    load_test.main(["--replicas", "1", "--seconds", "0", "--log-every", "2",
                    "--workdir", str(tmp_path / "run"), "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["n_atoms"] == 192 and result["steps"] == 12 and result["frames"] == 7
    assert result["series"]["step"] == [0, 2, 4, 6, 8, 10, 12]
    # float32 coordinates, cell lengths and angles; float64 stress, ten scalars; int64 step
    assert result["payload_bytes_per_frame"] == 192 * 3 * 4 + 2 * 3 * 4 + 6 * 8 + 10 * 8 + 8
    assert result["file_bytes_per_frame"] > result["payload_bytes_per_frame"]
    assert result["start_end"]["host_rss_mb"][0] > 0 and result["backend"] == "e3nn"
