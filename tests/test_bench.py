"""The benchmark runs end to end on CPU and writes JSON whose numbers hang together."""

import json
import time

import pytest

from mace_lpcalc.fastpath import compiled
from mace_lpcalc.perf import auto_setup, bench, setup_time
from mace_lpcalc.precision.auto import AUTO_CANDIDATES


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


def test_compiled_rows_record_the_md_steps_run_while_compiling(monkeypatch, tmp_path):
    """Background compilation (trace only here, held up by 1 s): the benchmark keeps
    stepping until the compiled call is ready and records when that was."""
    def slow_compile(graph, inputs):
        time.sleep(1.0)
        return graph
    monkeypatch.setattr(compiled, "compile_graph", slow_compile)
    result = bench.run_benchmark(model_spec="tiny", device="cpu", sizes=[4], policies=["fp32"],
                                 backends=["e3nn"], warmup=0, repeats=2, langevin=True,
                                 baselines=False, compile_modes=(True,))
    (row,) = result["rows"]
    assert row["name"] == "ours-e3nn-fp32-compiled" and row["compiled"] is True
    assert row["steps_while_compiling"] >= 1 and row["langevin_step_ms_while_compiling"] > 0
    assert row["compilations"] == 1
    assert row["time_to_compiled_s"] > row["setup_s"] and row["compile_and_check_s"] >= 1.0
    assert row["compiled_vs_eager_relative_L2"]["forces"] < 1e-5


def test_a_failing_configuration_is_recorded_not_fatal(monkeypatch, tmp_path):
    def broken(**kwargs):
        raise RuntimeError("kernel missing")
    monkeypatch.setattr(bench, "MACECalculator", broken)
    result = bench.run_benchmark(model_spec="tiny", device="cpu", sizes=[4], policies=["fp32"],
                                 backends=["e3nn"], warmup=0, repeats=1, langevin=False,
                                 baselines=("mace-e3nn-fp64",))
    rows = {row["name"]: row for row in result["rows"]}
    assert rows["mace-e3nn-fp64"]["error"] == "RuntimeError: kernel missing"
    assert rows["ours-e3nn-fp32"]["energy_forces_ms"] > 0


def test_setup_time_splits_the_first_step_of_a_first_and_a_second_calculator(
        monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(compiled, "compile_graph", lambda graph, inputs: graph)
    setup_time.main(["--device", "cpu", "--model", "tiny", "--molecules", "4", "--policy",
                     "fp32", "--compile", "--profile", str(tmp_path / "profile.txt")])
    profile = (tmp_path / "profile.txt").read_text()
    assert "Ordered by: cumulative time" in profile and "calculator.py" in profile
    result = json.loads(capsys.readouterr().out)
    assert result["n_atoms"] == 12 and result["compile_model"] is True
    for attempt in ("first", "second"):
        times = result[attempt]
        assert times["construction_to_first_step_s"] == pytest.approx(
            times["calculator_init_s"] + times["first_call_s"])
        assert times["second_call_ms"] > 0 and times["compile_and_check_s"] > 0


def test_auto_setup_json_holds_the_decision_and_its_cost(water_files, tmp_path):
    _, model = water_files
    out = tmp_path / "auto.json"
    auto_setup.main(["--device", "cpu", "--molecules", "2", "--backend", "e3nn",
                     "--model", str(model), "--json", str(out)])
    result = json.loads(out.read_text())
    decision = result["policy_decision"]
    assert result["n_atoms"] == 6 and result["chosen_policy"] == decision["chosen"]
    assert result["auto_setup_s"] == pytest.approx(
        result["auto_first_call_s"] - result["fp32_first_call_s"])
    # The decision's own measurement is part of the auto calculator's first call.
    assert 0 < decision["setup_s"] <= result["auto_first_call_s"]
    rows = {row["policy"]: row for row in decision["candidates"]}
    assert set(rows) == set(AUTO_CANDIDATES)
    assert rows["fp32"]["force_max_deviation_eV_A"] < 1e-4 and rows["fp32"]["within_budget"]
    assert result["versions"]["torch"] and result["date"] == time.strftime("%Y-%m-%d")
