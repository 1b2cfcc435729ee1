"""What makes a second run start at full speed: on-disk caches, capacities a later run
meets again, and code generated in a child process and loaded from the cache."""

import functools
import importlib
import logging

import mace  # noqa: F401  -- before e3nn
import cuequivariance as cue
import numpy as np
import pytest
import torch
from ase.calculators.calculator import CalculatorSetupError
from torch.fx.experimental.proxy_tensor import make_fx

from mace_lpcalc.calculator import LowPrecisionMACECalculator
from mace_lpcalc.compat import SYMMETRIC_CONTRACTION_DESCRIPTORS, inductor_cache_hits
from mace_lpcalc.fastpath import disk_caches
from mace_lpcalc.fastpath.compiled import compile_graph
from mace_lpcalc.fastpath.edge_buffers import EdgeBuffers, ladder_rung
from mace_lpcalc.installed import models_on_backend
from mace_lpcalc.fastpath.inductor_child import (cache_key_settings, compile_in_child_process,
                                                compile_marker, mark_compiled)
from mace_lpcalc.md.nve import NVESettings
from tiny_models import build_tiny_model


@pytest.fixture
def clean_cache_variables(monkeypatch, tmp_path):
    for variable in (disk_caches.CACHE_ROOT_VARIABLE, "XDG_CACHE_HOME",
                     *disk_caches.LIBRARY_CACHE_VARIABLES):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.fixture(autouse=True)
def descriptor_functions(monkeypatch):
    """The descriptor functions as (module, name); whatever a test installs in their place
    is undone after it."""
    functions = []
    for module_name, name in SYMMETRIC_CONTRACTION_DESCRIPTORS:
        module = importlib.import_module(module_name)
        monkeypatch.setattr(module, name, getattr(module, name))
        functions.append((module, name))
    return functions


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


def test_cache_root_follows_the_variables_in_order(clean_cache_variables, monkeypatch):
    home = clean_cache_variables / "home"
    assert disk_caches.cache_root() == home / ".cache" / "mace_lpcalc"
    monkeypatch.setenv("XDG_CACHE_HOME", str(clean_cache_variables / "xdg"))
    assert disk_caches.cache_root() == clean_cache_variables / "xdg" / "mace_lpcalc"
    monkeypatch.setenv(disk_caches.CACHE_ROOT_VARIABLE, str(clean_cache_variables / "mine"))
    assert disk_caches.cache_root() == clean_cache_variables / "mine"


def test_gpu_caches_go_under_one_versioned_directory_per_gpu(clean_cache_variables, fake_gpu):
    """Both compilers' variables are set, below the GPU model and the versions."""
    directories = disk_caches.use_disk_caches("cuda")
    expected = (disk_caches.cache_root() / "NVIDIA-H200-sm90"
                / f"torch-{torch.__version__}_cueq-{disk_caches._cuequivariance_ops_version()}")
    descriptors = disk_caches.cache_root() / "descriptors" / (
        f"cue-{cue.__version__}_mace-{mace.__version__}")
    assert directories == {"TORCHINDUCTOR_CACHE_DIR": str(expected / "inductor"),
                           "CUEQUIVARIANCE_OPS_NVRTC_CACHE_DIR":
                               str(expected / "cuequivariance_nvrtc"),
                           "descriptors": str(descriptors)}
    assert all(disk_caches.Path(directories[variable]).is_dir()
               for variable in disk_caches.LIBRARY_CACHE_VARIABLES)


def test_a_cache_directory_the_user_chose_is_kept(clean_cache_variables, fake_gpu, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(clean_cache_variables / "own"))
    directories = disk_caches.use_disk_caches("cuda:0")
    assert directories["TORCHINDUCTOR_CACHE_DIR"] == str(clean_cache_variables / "own")
    assert "mace_lpcalc" in directories["CUEQUIVARIANCE_OPS_NVRTC_CACHE_DIR"]


def test_nothing_is_set_for_the_cpu(clean_cache_variables):
    """Only the descriptors' directory is named, and made only when one is computed."""
    assert set(disk_caches.use_disk_caches("cpu")) == {"descriptors"}
    assert not (clean_cache_variables / "home").exists()


def _counted(function, calls: list):
    @functools.wraps(function)
    def counting(*args):
        calls.append(args)
        return function(*args)
    return counting


def _same_descriptor(first, second) -> bool:
    polynomial, projection = first
    return polynomial == second[0] and np.array_equal(projection, second[1])


def test_symmetric_contraction_descriptors_are_read_back_equal_in_a_later_process(
        clean_cache_variables, descriptor_functions):
    """Each function's result is written once, then served from the file, unchanged, to a
    process that has none in memory; a truncated file is recomputed and replaced."""
    irreps = (cue.Irreps("O3", "4x0e+4x1o+4x2e"), cue.Irreps("O3", "4x0e+4x1o"), (1, 2, 3))
    directory = disk_caches.use_descriptor_cache()
    computed = [getattr(module, name)(*irreps) for module, name in descriptor_functions]
    files = sorted(directory.glob("*.pkl"))
    assert [path.name.split("-")[0] for path in files] == sorted(
        f"{module.__name__}.{name}" for module, name in descriptor_functions)

    originals = [getattr(module, name).function for module, name in descriptor_functions]
    calls = []
    later = [disk_caches.DescriptorsOnDisk(_counted(function, calls), directory)
             for function in originals]
    assert all(_same_descriptor(fresh, served(*irreps))
               for fresh, served in zip(computed, later)) and calls == []

    files[0].write_bytes(files[0].read_bytes()[:100])
    again = [disk_caches.DescriptorsOnDisk(_counted(function, calls), directory)
             for function in originals]
    assert all(_same_descriptor(fresh, served(*irreps))
               for fresh, served in zip(computed, again)) and len(calls) == 1
    later_still = disk_caches.DescriptorsOnDisk(_counted(originals[0], calls), directory)
    assert _same_descriptor(later_still(*irreps), computed[0]) and len(calls) == 1


def test_inputs_that_print_alike_are_kept_apart(clean_cache_variables, descriptor_functions):
    """The key names the irreps' group, not only how they print; other inputs pass through."""
    module, name = descriptor_functions[0]
    directory = disk_caches.use_descriptor_cache()
    for group in ("O3", "SO3"):
        getattr(module, name)(cue.Irreps(group, "2x0e+2x1o" if group == "O3" else "2x0+2x1"),
                              cue.Irreps(group, "2x0e" if group == "O3" else "2x0"), (1, 2))
    assert len(list(directory.glob("*.pkl"))) == 2
    assert disk_caches._input_key((cue.Irreps("O3", "2x0e"), (1, 2))) != disk_caches._input_key(
        (cue.Irreps("O3", "2x0e"), (1, 2, 3)))
    assert disk_caches._input_key((cue.Irreps("O3", "2x0e"), [1, 2])) is None


def test_converting_a_model_to_cuequivariance_fills_the_descriptor_cache(
        clean_cache_variables, descriptor_functions):
    """Both functions are reached through the installed names: by the cuEquivariance
    model's constructor and by mace's converter."""
    directory = disk_caches.use_descriptor_cache()
    models_on_backend([build_tiny_model()], "cuequivariance", dtype=torch.float64,
                      device_type="cpu", auto=False)
    assert {path.name.split("-")[0] for path in directory.glob("*.pkl")} == {
        f"{module.__name__}.{name}" for module, name in descriptor_functions}


@pytest.mark.parametrize("count", [1, 63, 64, 65, 5000, 123_457, 4_700_000])
def test_a_ladder_capacity_holds_the_count_and_wastes_at_most_a_rung(count):
    capacity = ladder_rung(count, 1.05)
    assert capacity >= count and capacity % 64 == 0
    assert capacity <= max(1.05 * count + 64, 128)
    assert ladder_rung(capacity, 1.05) == capacity  # a rung maps to itself


def test_edge_counts_a_few_percent_apart_share_a_compiled_capacity():
    """Two runs of one system whose counts differ slightly meet the same capacity, where
    a capacity proportional to the count would differ (and compile again)."""
    def capacity(n_edges, ladder):
        buffers = EdgeBuffers(n_atoms=10, r_max=5.0, dtype=torch.float32,
                              device=torch.device("cpu"), headroom=1.05,
                              regrowth_headroom=1.12, min_capacity=0, capacity_ladder=ladder)
        buffers.grow(n_edges)
        return buffers.capacity
    counts = range(100_000, 101_000, 50)
    assert len({capacity(n, 1.05) for n in counts}) == 1
    assert len({capacity(n, None) for n in counts}) > 10


def _sine_graph(weights):
    return make_fx(lambda x: ((x * weights).sin().cumsum(0),))(torch.randn(9, dtype=torch.float64))


def test_code_generated_in_a_child_process_is_loaded_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    weights = torch.randn(9, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    graph, inputs = _sine_graph(weights), [torch.randn(9, dtype=torch.float64)]
    assert compile_in_child_process(graph, inputs)
    hits = inductor_cache_hits()
    (value,) = compile_graph(graph, inputs)(*inputs)
    assert inductor_cache_hits() == hits + 1
    torch.testing.assert_close(value, (inputs[0] * weights).sin().cumsum(0), rtol=0, atol=1e-14)


def test_a_failing_child_process_is_reported_not_raised(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    weights = torch.ones(9, dtype=torch.float64)
    broken = dict(cache_key_settings(), num_threads=0)  # torch refuses 0 threads
    with caplog.at_level(logging.INFO, logger="mace_lpcalc.fastpath.inductor_child"):
        assert not compile_in_child_process(_sine_graph(weights), [weights], broken)
    assert "compiling in a child process failed (exit 1)" in caplog.text


def test_compilation_is_automatic_on_cuda_only_and_named_values_only():
    calc = LowPrecisionMACECalculator(models=build_tiny_model((1, 8)), device="cpu")
    assert calc.parameters["compile_model"] is False
    assert set(calc.parameters["compile_caches"]) == {"descriptors"}
    with pytest.raises(CalculatorSetupError, match="compile_model must be 'auto', True or False"):
        LowPrecisionMACECalculator(models=build_tiny_model((1, 8)), compile_model="yes")


def test_protocol_settings_name_the_compilation_mode():
    assert NVESettings().compile_model == "auto"
    assert NVESettings(compile_model=True).compile_model == "on"  # runs recorded before "auto"
    with pytest.raises(ValueError, match="compile_model must be auto, on or off"):
        NVESettings(compile_model="sometimes")


def test_cold_start_analysis_finds_the_switch_and_the_stalls():
    """Steps of 10 ms uncompiled (one of 50 ms), then 5 ms compiled (one of 11 ms)."""
    from mace_lpcalc.perf.cold_start import analyse
    times = [30.0] + [10.0] * 9 + [50.0] + [10.0] * 5 + [5.0] * 10 + [11.0] + [5.0] * 5
    steps, clock = [], 100.0
    for index, ms in enumerate(times):
        clock += ms / 1e3
        steps.append({"end": clock, "ms": ms, "compiled": index >= 16})
    result = analyse(steps, spawned=90.0)
    assert result["first_step_s"] == pytest.approx(10.03)
    assert result["compiled_from_s"] == pytest.approx(steps[16]["end"] - 90.0)
    assert result["uncompiled"]["median_ms"] == 10.0 and result["uncompiled"]["stalls"] == 1
    assert result["compiled"]["median_ms"] == 5.0 and result["compiled"]["stall_ms"] == [11.0]
    # A process whose time ran out before its first step (a slow machine's imports).
    assert analyse([], spawned=90.0) == {"steps": 0, "first_step_s": None,
                                         "compiled_from_s": None}


def test_a_graph_compiled_before_is_recognised_by_graph_shapes_and_settings(monkeypatch,
                                                                              tmp_path):
    """The marker that lets a later process skip the child: same graph code, shapes and
    settings; another shape or setting is a new compilation."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    weights = torch.ones(9, dtype=torch.float64)
    graph, inputs, settings = _sine_graph(weights), [weights], cache_key_settings()
    assert not compile_marker(graph, inputs, settings).exists()
    mark_compiled(compile_marker(graph, inputs, settings))
    assert compile_marker(_sine_graph(2 * weights), inputs, settings).exists()  # values: not in the key
    assert not compile_marker(graph, [torch.ones(10, dtype=torch.float64)], settings).exists()
    assert not compile_marker(graph, inputs, dict(settings, default_dtype=torch.float16)).exists()


@pytest.mark.parametrize("compile_model", [True, False])
def test_siblings_compile_as_their_calculator_does_and_trials_never(compile_model):
    """The sentinel's fallback runs for the rest of the run: compiled if its calculator
    is. policy="auto"'s trial calculators run a few calls: never compiled. The fp64
    reference runs on mace's path, which does not compile."""
    calc = LowPrecisionMACECalculator(models=build_tiny_model((1, 8)), device="cpu",
                                      compile_model=compile_model, sentinel_every=100)
    assert calc._sibling("fp32-linear-bf16").parameters["compile_model"] is compile_model
    assert calc._sibling("fp32", compile_model=False).parameters["compile_model"] is False
    reference = calc._sibling("fp64")
    assert reference.parameters["compile_model"] is False and not reference.engines


def test_an_unwritable_cache_root_warns_and_leaves_the_defaults(clean_cache_variables,
                                                                 fake_gpu, monkeypatch):
    blocker = clean_cache_variables / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(disk_caches.CACHE_ROOT_VARIABLE, str(blocker))
    with pytest.warns(RuntimeWarning, match="no compile cache in"):
        directories = disk_caches.use_disk_caches("cuda")
    assert "CUEQUIVARIANCE_OPS_NVRTC_CACHE_DIR" not in directories
    module, name = SYMMETRIC_CONTRACTION_DESCRIPTORS[0]
    descriptor = getattr(importlib.import_module(module), name)
    irreps = (cue.Irreps("O3", "2x0e+2x1o"), cue.Irreps("O3", "2x0e"), (1, 2))
    with pytest.warns(RuntimeWarning, match="no descriptor cache in"):
        computed = descriptor(*irreps)
    assert _same_descriptor(descriptor(*irreps), computed)  # from memory, and no second warning
