"""The scaling benchmark: rows measured, resumed, tabulated and plotted; the README's table
is the command's output for the committed result."""

import json
from pathlib import Path

import pytest

from mace_lpcalc.perf import scaling

ROOT = Path(__file__).resolve().parent.parent


def _row(policy, n_atoms, setting, ms, gb, chunk=None):
    return {"policy": policy, "edge_chunk_size": setting, "n_atoms": n_atoms,
            "n_edges": 30 * n_atoms, "chunk_edges": chunk, "md_step_ms": ms,
            "us_per_atom_step": ms * 1e3 / n_atoms, "peak_memory_GB": gb,
            "peak_kB_per_atom": gb * 2**20 / n_atoms, "fits": True}


def test_table_gives_ratios_of_the_unchunked_twin_and_the_box_that_did_not_fit():
    result = {"rows": [_row("fp32", 1000, "auto", 10.0, 2.0),
                       _row("fp32", 1000, None, 9.0, 6.0),
                       _row("fp32", 9000, "auto", 90.0, 4.0, chunk=65536),
                       _row("fp32", 9000, 4096, 150.0, 3.0, chunk=4096),
                       {**_row("fp32", 9000, "auto", 120.0, 3.5, chunk=65536),
                        "weights_only": True},
                       {"policy": "fp32", "edge_chunk_size": "auto", "n_atoms": 99000,
                        "fits": False, "error": "CUDA out of memory"},
                       {"policy": "fp32", "edge_chunk_size": "auto", "n_atoms": 99000,
                        "weights_only": True, "fits": False, "error": "CUDA out of memory"}]}
    lines = scaling.markdown_table(result).splitlines()
    assert len(lines) == 8
    assert lines[2].endswith("| 0.90 / 3.00 |")  # the unchunked twin: 0.9x time, 3x memory
    assert "| 65,536 |" in lines[3] and lines[3].endswith("|  |")
    assert lines[4].startswith("| fp32, chunks set to 4,096 | 9,000 |")
    assert "| 150.0 |" in lines[4]
    assert lines[5].startswith("| fp32, weights only recomputed | 9,000 |")
    assert "| 120.0 |" in lines[5] and "| 90.0 |" in lines[3]  # not the newest of one key
    assert lines[6].startswith("| fp32 | 99,000 | out of memory |")
    assert lines[7].startswith("| fp32, weights only recomputed | 99,000 | out of memory |")


def test_a_run_resumes_where_the_last_one_stopped(tmp_path):
    out = tmp_path / "scaling.json"
    arguments = ["run", "--device", "cpu", "--model", "tiny", "--policies", "fp32",
                 "--sizes", "4", "8", "--unchunked-up-to", "4", "--also-chunks", "50",
                 "--also-weights-only", "--out", str(out)]
    scaling.main(arguments + ["--max-wall-s", "0"])  # one row, then out of time
    first = json.loads(out.read_text())["rows"]
    assert [(r["n_atoms"], r["edge_chunk_size"]) for r in first] == [(12, "auto")]
    scaling.main(arguments)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["n_atoms"], r["edge_chunk_size"], r["weights_only"]) for r in rows] == [
        (12, "auto", False), (12, None, False), (24, "auto", False), (24, 50, False),
        (24, "auto", True)]
    assert rows[3]["chunk_edges"] == 50 and rows[2]["chunk_edges"] is None
    # What ran is read off the model: no fused kernel on a CPU, so whole chunks.
    assert rows[3]["recomputes"] == "whole chunks" and rows[2]["recomputes"] is None
    assert rows[0] == first[0]  # kept, not measured again
    assert all(r["fits"] and r["md_step_ms"] > 0 and r["n_edges"] > 0 for r in rows)


def test_rows_of_another_auto_rule_are_measured_again_and_the_newest_counts(tmp_path):
    out = tmp_path / "scaling.json"
    arguments = ["run", "--device", "cpu", "--model", "tiny", "--policies", "fp32",
                 "--sizes", "4", "--out", str(out)]
    scaling.main(arguments)
    result = json.loads(out.read_text())
    result["rows"][0].update(auto_rule={"above": 0.2}, md_step_ms=1e6)
    out.write_text(json.dumps(result))
    scaling.main(arguments)
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and rows[1]["auto_rule"] == scaling.AUTO_RULE
    assert "1000000.0" not in scaling.markdown_table({"rows": rows})


def test_plot_is_written(tmp_path):
    result = {"model": "off24m", "gpu": "test", "device": "cuda",
              "rows": [_row("fp32", 1000, "auto", 10.0, 2.0), _row("fp32", 9000, "auto", 80.0, 9.0),
                       _row("fp32", 1000, None, 9.0, 6.0)]}
    path = tmp_path / "scaling.png"
    scaling.plot(result, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _committed_results():
    return sorted((ROOT / "bench" / "results").glob("*_scaling_water*.json"))


@pytest.mark.parametrize("path", _committed_results(), ids=lambda path: path.name)
def test_readme_table_is_the_command_output_for_the_committed_result(path):
    table = scaling.markdown_table(json.loads(path.read_text()))
    assert table in (ROOT / "README.md").read_text(), (
        f"regenerate the README's table: python -m mace_lpcalc.perf.scaling table {path.relative_to(ROOT)}")
