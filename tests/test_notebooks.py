"""Every notebook in notebooks/ runs top to bottom on small inputs, so none can rot.

Each is executed with nbclient in this Python (a kernel spec naming ``sys.executable`` is
written to a temporary folder, so a machine with only ``pip install -e ".[test]"`` runs
them), from notebooks/, with a cell inserted after the one tagged ``parameters`` that
sends ``OUT_DIR`` to a temporary folder and shrinks the re-runs. The tests read back the
tables each notebook writes there.
"""

import json
import math
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from mace_lpcalc.models import default_model_path

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
KERNEL = "mace-lpcalc-tests"
#: Longest one cell may run (the MD re-runs take a minute on a busy 2-core machine).
CELL_TIMEOUT_S = 600
VERDICTS = {"equivalent", "different", "inconclusive", "undefined"}
TESTED = {"block_profile.ipynb", "precision_microbenchmarks.ipynb", "npt_fidelity.ipynb",
          "training_table.ipynb", "certificate.ipynb", "validate_a_policy.ipynb"}
needs_model = pytest.mark.skipif(default_model_path() is None, reason="shipped model missing")


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory) -> KernelSpecManager:
    kernels = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(kernels / KERNEL)
    return KernelSpecManager(kernel_dirs=[str(kernels)])


def execute(name: str, kernel_specs: KernelSpecManager, **parameters) -> nbformat.NotebookNode:
    """Run notebook ``name`` with ``parameters`` overriding its parameters cell."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    index = next(i for i, cell in enumerate(notebook.cells)
                 if "parameters" in cell.metadata.get("tags", []))
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(
        "\n".join(f"{key} = {value!r}" for key, value in parameters.items())))
    manager = KernelManager(kernel_name=KERNEL, kernel_spec_manager=kernel_specs)
    NotebookClient(notebook, km=manager, timeout=CELL_TIMEOUT_S,
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return notebook


def test_every_notebook_is_tested_and_committed_without_outputs():
    notebooks = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert {path.name for path in notebooks} == TESTED
    for path in notebooks:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        tagged = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: one cell tagged 'parameters'"
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, path.name


def test_block_profile(kernel_specs, tmp_path):
    execute("block_profile.ipynb", kernel_specs, OUT_DIR=str(tmp_path))
    result = json.loads((tmp_path / "block_profile.json").read_text())
    assert result["thesis_table_4_1"]["wall_ms"] == 31.9
    assert len(result["ours"]) == 3
    assert all(0 < o["device_ms"] < o["wall_ms"] for o in result["ours"].values())
    blocks = [row["block"] for row in result["blocks"]]
    assert "products.0.symmetric_contractions" in blocks and len(blocks) == 14
    for row in result["blocks"]:
        assert all(row[f"{label}_host_ms"] > 0 for label in result["ours"]), row["block"]
    assert set(blocks) < set(result["rerun_blocks"])
    assert (tmp_path / "block_profile.png").stat().st_size > 0


def test_precision_microbenchmarks(kernel_specs, tmp_path):
    execute("precision_microbenchmarks.ipynb", kernel_specs, OUT_DIR=str(tmp_path))
    result = json.loads((tmp_path / "precision.json").read_text())
    policies = ["fp64", "fp32", "fp32-linear-fp16", "fp32-linear-bf16"]
    assert [row["policy"] for row in result["whole_call"]] == policies
    rows = {row["policy"]: row for row in result["whole_call"]}
    assert rows["fp64"]["unoptimised_1536_speedup"] == pytest.approx(1.0)
    assert rows["fp32-linear-fp16"]["fast_compiled_5184_ms"] < rows["fp32"]["fast_5184_ms"]
    # 3 figures x 2 layers x 2 paths x 3 policies, each a measured device time.
    assert len(result["block_times"]) == 36
    assert all(row["device_ms"] > 0 for row in result["block_times"])
    errors = result["rerun_force_relative_error"]
    assert errors["fp64"] < errors["fp32"] < errors["fp32-linear-fp16"] < errors["fp32-linear-bf16"]


def test_npt_fidelity(kernel_specs, tmp_path):
    execute("npt_fidelity.ipynb", kernel_specs, OUT_DIR=str(tmp_path))
    fidelity = json.loads((tmp_path / "npt_fidelity.json").read_text())["fidelity"]
    assert len(fidelity) == 12
    assert {row["observable"] for row in fidelity} == {
        "Temperature", "Density", "Potential energy", "MSD(O) at 2 ps"}
    for row in fidelity:
        assert all(math.isfinite(row[key]) for key in (
            "thesis_relative_percent", "ours_relative_percent", "ours_relative_stderr_percent",
            "ours_p_value")), row
    density_bf16 = next(r for r in fidelity
                        if r["observable"] == "Density" and r["policy"] == "fp32-linear-bf16")
    assert density_bf16["thesis_relative_percent"] == pytest.approx(0.288, abs=1e-3)


@needs_model
def test_training_table(kernel_specs, tmp_path):
    execute("training_table.ipynb", kernel_specs, OUT_DIR=str(tmp_path), FRAMES=1)
    result = json.loads((tmp_path / "training_table.json").read_text())
    test_rows = [row for row in result["rows"] if row["split"] == "test"]
    assert len(test_rows) == 6 and all(row["ours"][1] > 0 for row in test_rows)
    assert result["thesis_table_4_6"]["test"]["linear-bf16"] == [6.7, 220.0, 9.61]
    rerun = {row["policy"]: row for row in result["rerun"]}
    assert list(rerun) == ["fp64", "fp32", "linear-fp16", "linear-bf16"]
    # The shipped model fits the held-out data to a few per cent in every precision.
    assert all(row["test_forces_rel_rmse_percent"] < 10 for row in rerun.values())


@needs_model
def test_certificate_from_a_fresh_rerun(kernel_specs, tmp_path):
    execute("certificate.ipynb", kernel_specs, OUT_DIR=str(tmp_path), RERUN=True, STEPS=6)
    result = json.loads((tmp_path / "certificate_rows.json").read_text())
    assert Path(result["certificate"]).is_relative_to(tmp_path)
    rows = {row["observable"]: row for row in result["rows"]
            if row["policy"] == "fp32-linear-bf16"}
    assert {"temperature", "potential_energy"} <= set(rows)
    for row in result["rows"]:
        assert row["verdict"] in VERDICTS and row["n_replicas"] == 1
        if row["ci90_low"] is None:
            assert row["verdict"] == "undefined"
            continue
        # Scaled by the margin, "equivalent" is exactly an interval inside (-1, 1).
        low, high = row["ci90_low_over_margin"], row["ci90_high_over_margin"]
        assert low <= row["difference_over_margin"] <= high
        assert (row["verdict"] == "equivalent") == (-1 < low and high < 1), row
    assert (tmp_path / "certificate.png").stat().st_size > 0


def test_certificate_plots_the_committed_campaign(kernel_specs, tmp_path):
    """Without a re-run the notebook reads validation/certificate.json, row for row."""
    committed = NOTEBOOKS.parent / "validation" / "certificate.json"
    execute("certificate.ipynb", kernel_specs, OUT_DIR=str(tmp_path))
    result = json.loads((tmp_path / "certificate_rows.json").read_text())
    assert Path(result["certificate"]) == committed
    certificate = json.loads(committed.read_text())
    expected = {(policy, observable): entry["verdict"]
                for policy, entries in certificate["policies"].items()
                for observable, entry in entries.items() if "margin" in entry}
    assert {(r["policy"], r["observable"]): r["verdict"] for r in result["rows"]} == expected


@needs_model
def test_validate_a_policy_on_a_short_run(kernel_specs, tmp_path):
    notebook = execute("validate_a_policy.ipynb", kernel_specs, OUT_DIR=str(tmp_path), STEPS=6)
    summary = (tmp_path / "comparison" / "summary.md").read_text()
    assert "fp32-linear-bf16 (n=1)" in summary
    assert "image/png" in notebook.cells[-1].outputs[0].data
