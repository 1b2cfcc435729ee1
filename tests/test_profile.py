"""The per-block profiler: rows named after the model's blocks, host times that partition
the call, the GPU-bound verdict, wrapped (policy) and cuEquivariance models, JSON output.

On CPU only host times exist; the device-time attribution runs on CUDA
(``python -m mace_lpcalc.perf.profile --device cuda``).
"""

import json

import mace  # noqa: F401  -- before e3nn
import pytest
import torch

from mace_lpcalc.perf import profile as prof
from mace_lpcalc.perf import profile_attribution as attribution
from mace_lpcalc.calculator import LowPrecisionMACECalculator
from tiny_models import build_tiny_model
from mace_lpcalc.systems import water_box

STEPS = 2
INTERACTION_BLOCKS = {"linear_up", "conv_tp_weights", "conv_tp", "linear", "skip_tp"}
PRODUCT_BLOCKS = {"symmetric_contractions", "linear"}


@pytest.fixture(scope="module")
def atoms():
    return water_box(4, seed=0)


def _profile(atoms, policy="fp32", backend="e3nn"):
    calc = LowPrecisionMACECalculator(models=build_tiny_model(atomic_numbers=(1, 8)),
                                      device="cpu", policy=policy, backend=backend)
    return calc, prof.profile_blocks(calc, atoms, warmup=1, steps=STEPS)


def _expected_blocks(model, n_interactions=2):
    """The blocks the brief names, spelled as a plain model's module names."""
    names = {"node_embedding", "spherical_harmonics", "radial_embedding"}
    for i in range(n_interactions):
        names |= {f"interactions.{i}.{block}" for block in INTERACTION_BLOCKS}
        names |= {f"products.{i}.{block}" for block in PRODUCT_BLOCKS}
        names.add(f"readouts.{i}")
    return names


@pytest.fixture(scope="module")
def fp32_profile(atoms):
    return _profile(atoms)


def test_rows_are_the_models_blocks(fp32_profile):
    calc, result = fp32_profile
    model = calc.models[0]
    module_names = dict(model.named_modules())
    rows = {row["block"]: row for row in result["rows"]}
    assert _expected_blocks(model) <= set(rows)
    for row in result["rows"]:
        if row["module"] is not None:  # a real block: its row is its module name (no wrappers)
            assert row["module"] == row["block"] and row["module"] in module_names
    synthetic = {name for name, row in rows.items() if row["module"] is None}
    assert synthetic == {attribution.OUTSIDE_MODEL, "model (other)", attribution.BACKWARD,
                         "interactions.0 (other)", "interactions.1 (other)",
                         "products.0 (other)", "products.1 (other)"}
    # Every direct child of an interaction or product is timed, so nothing hides in a group.
    for group in ("interactions.0", "products.1"):
        children = {name for name in module_names
                    if name.startswith(group + ".") and name.count(".") == 2}
        assert children <= set(rows)


def test_calls_and_host_times_partition_the_call(fp32_profile):
    _, result = fp32_profile
    rows = {row["block"]: row for row in result["rows"]}
    for name, row in rows.items():
        assert row["host_ms_per_call"] >= 0, name
        assert row["device_ms_per_call"] is None and row["kernels_per_call"] is None
    # Each block runs once per call, except the E0 lookup, which mace calls twice.
    assert {row["calls"] for name, row in rows.items() if name != "atomic_energies_fn"} == {STEPS}
    assert rows["atomic_energies_fn"]["calls"] % STEPS == 0
    whole = result["whole_call"]
    per_call_sum = sum(row["host_ms_per_call"] * row["calls"] for row in rows.values()) / STEPS
    assert per_call_sum <= whole["profiled_wall_ms"] * 1.001 + 1e-3
    assert per_call_sum == pytest.approx(whole["profiled_wall_ms"], rel=1e-6)
    # The backward (force) pass and the convolution do real work on every call.
    assert rows[attribution.BACKWARD]["host_ms_per_call"] > 0
    assert rows["interactions.0.conv_tp"]["host_ms_per_call"] > 0
    assert whole["device_ms"] is None and whole["verdict"] == "no device (CPU run)"


def test_block_ranges_removes_its_hooks(fp32_profile, atoms):
    calc, _ = fp32_profile
    model = calc.models[0]
    ranges = prof.profiled_blocks(model)
    with pytest.raises(RuntimeError, match="boom"), prof.block_ranges(model, ranges):
        raise RuntimeError("boom")
    assert all(not module._forward_pre_hooks and not module._forward_hooks
               for module in model.modules())


@pytest.mark.parametrize("device_ms, wall_ms, verdict", [
    (80.0, 100.0, "GPU-bound"),
    (99.0, 100.0, "GPU-bound"),
    (79.9, 100.0, "CPU/dispatch-bound"),
    (0.0, 3.0, "CPU/dispatch-bound"),
    (None, 3.0, "no device (CPU run)"),
])
def test_verdict_threshold(device_ms, wall_ms, verdict):
    assert attribution.bound_verdict(device_ms, wall_ms) == verdict


def test_verdict_rejects_bad_numbers():
    with pytest.raises(ValueError, match="wall time"):
        attribution.bound_verdict(1.0, 0.0)
    with pytest.raises(ValueError, match="device time"):
        attribution.bound_verdict(-1.0, 2.0)
    with pytest.raises(ValueError, match="threshold"):
        attribution.bound_verdict(1.0, 2.0, threshold=1.5)


def test_interval_union_and_coverage():
    merged = attribution.merge_intervals([(5, 7), (0, 2), (1, 3), (3, 4), (10, 11)])
    assert merged == [(0, 4), (5, 7), (10, 11)]
    coverage = attribution._Coverage(merged)
    assert coverage.within(-5, 20) == 7
    assert coverage.within(1, 6) == 3 + 1
    assert coverage.within(7, 10) == 0
    with pytest.raises(ValueError, match="ends before"):
        attribution.merge_intervals([(2, 1)])


def test_wrapped_modules_keep_plain_names(atoms):
    """fp32-linear-bf16 wraps the Linears: rows keep plain names, hooks sit on the wrappers."""
    calc, result = _profile(atoms, policy="fp32-linear-bf16")
    model = calc.models[0]
    rows = {row["block"]: row for row in result["rows"]}
    assert _expected_blocks(model) <= set(rows)
    wrapped = model.get_submodule(rows["interactions.0.linear_up"]["module"])
    assert type(wrapped).__name__ == "IrrepBlockLinear"
    # The wrapper's inner original layer is not a row of its own.
    assert "interactions.0.linear_up.linear" not in rows
    assert all(row["calls"] >= STEPS for row in rows.values())


def test_autocast_regions_are_seen_through(atoms):
    """bf16 wraps whole blocks in autocast regions: names drop the wrapper's ``.module``."""
    calc = LowPrecisionMACECalculator(models=build_tiny_model(atomic_numbers=(1, 8)),
                                      device="cpu", policy="bf16", backend="e3nn")
    ranges = prof.profiled_blocks(calc.models[0])
    assert _expected_blocks(calc.models[0]) <= set(ranges)
    assert ranges["interactions.1.conv_tp"] == ("interactions.1.module.conv_tp", "block")
    assert ranges["products.0.symmetric_contractions"][0] == \
        "products.0.module.symmetric_contractions"
    assert ranges["interactions.0"] == ("interactions.0", "group")


def test_cuequivariance_backend_on_cpu(atoms):
    calc, result = _profile(atoms, backend="cuequivariance")
    assert calc.backend == "cuequivariance"
    rows = {row["block"]: row for row in result["rows"]}
    assert _expected_blocks(calc.models[0]) <= set(rows)
    assert type(calc.models[0].get_submodule("interactions.0.conv_tp")).__module__.startswith(
        "cuequivariance_torch")
    assert rows["interactions.0.conv_tp"]["calls"] == STEPS


def test_cli_writes_json_and_trace(tmp_path, capsys):
    out, trace = tmp_path / "profile.json", tmp_path / "trace.json"
    threads = torch.get_num_threads()
    prof.main(["--model", "tiny", "--device", "cpu", "--molecules", "4", "--warmup", "1",
               "--steps", str(STEPS), "--out", str(out), "--trace", str(trace)])
    torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["gpu"] is None and result["fast_path"] == []
    assert result["settings"]["steps"] == STEPS and result["settings"]["n_atoms"] == 12
    assert {"torch", "mace-torch", "e3nn"} <= set(result["versions"])
    blocks = [row["block"] for row in result["rows"]]
    assert len(blocks) == len(set(blocks)) and "interactions.1.conv_tp" in blocks
    assert "CPU run" in printed and "interactions.1.conv_tp" in printed
    assert any(event.get("name") == attribution.RANGE_PREFIX + "interactions.0.conv_tp"
               for event in json.loads(trace.read_text())["traceEvents"])


def test_fast_path_eager_profiles_and_graph_replay_is_refused(atoms):
    """The engine's eager path runs the same hooked blocks; a CUDA graph would hide them."""
    calc = LowPrecisionMACECalculator(models=build_tiny_model(atomic_numbers=(1, 8)),
                                      device="cpu", policy="fp32", backend="e3nn",
                                      fast_path=True)
    result = prof.profile_blocks(calc, atoms, warmup=1, steps=STEPS)
    rows = {row["block"]: row for row in result["rows"]}
    assert _expected_blocks(calc.models[0]) <= set(rows)
    assert rows["interactions.1.conv_tp"]["calls"] == STEPS
    calc.engine.use_cuda_graph = True
    with pytest.raises(ValueError, match="eager"):
        prof.profile_blocks(calc, atoms, warmup=0, steps=1)
