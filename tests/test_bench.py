"""The benchmark runs end to end on CPU and writes JSON whose numbers hang together."""

import json

import pytest

from mace_lpcalc import bench


def test_benchmark_json(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--device", "cpu", "--model", "tiny", "--sizes", "4", "--policies", "fp64",
                "fp32-linear-bf16", "--backends", "e3nn", "--warmup", "0", "--repeats", "2",
                "--out", str(out)])
    result = json.loads(out.read_text())
    rows = {row["name"]: row for row in result["rows"]}
    assert set(rows) == {"mace-e3nn-fp64", "ours-e3nn-fp64", "ours-e3nn-fp32-linear-bf16"}
    assert result["statistic"] == "median" and result["versions"]["mace-torch"]
    for row in rows.values():
        assert row["n_atoms"] == 12
        assert row["energy_forces_ms"] > 0 and row["langevin_step_ms"] > 0
        ratio = rows["mace-e3nn-fp64"]["langevin_step_ms"] / row["langevin_step_ms"]
        assert row["speedup_langevin_step_vs_mace-e3nn-fp64"] == pytest.approx(ratio)
        assert row["ns_per_day_at_1fs"] == pytest.approx(86400e3 / row["langevin_step_ms"] * 1e-6)
    assert rows["ours-e3nn-fp64"]["energy_error_eV_per_atom"] < 1e-12
    assert rows["mace-e3nn-fp64"]["force_relative_error"] < 1e-12
    assert 1e-4 < rows["ours-e3nn-fp32-linear-bf16"]["force_relative_error"] < 3e-2
    assert "model_only_ms" in rows["mace-e3nn-fp64"]


def test_a_failing_configuration_is_recorded_not_fatal(monkeypatch, tmp_path):
    def broken(**kwargs):
        raise RuntimeError("kernel missing")
    monkeypatch.setattr(bench, "BASELINES", {"mace-e3nn-fp64": dict(default_dtype="float64")})
    monkeypatch.setattr(bench, "MACECalculator", broken)
    result = bench.run_benchmark(model_spec="tiny", device="cpu", sizes=[4], policies=["fp32"],
                                 backends=["e3nn"], warmup=0, repeats=1, langevin=False)
    rows = {row["name"]: row for row in result["rows"]}
    assert rows["mace-e3nn-fp64"]["error"] == "RuntimeError: kernel missing"
    assert rows["ours-e3nn-fp32"]["energy_forces_ms"] > 0


def test_largest_box_json(tmp_path):
    out = tmp_path / "largest.json"
    bench.main(["--device", "cpu", "--model", "tiny", "--sizes", "2", "4", "--policies", "fp32",
                "--backends", "e3nn", "--largest-box", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [row["n_atoms"] for row in rows] == [6, 12]
    assert all(row["fits"] and row["energy_forces_ms"] > 0 for row in rows)
