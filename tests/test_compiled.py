"""The compiled energy+forces(+stress) call against the eager model, and its safety net."""

import logging
import subprocess
import sys
import threading
import time

import mace  # noqa: F401  -- before e3nn
import numpy as np
import pytest
import torch
from ase.calculators.calculator import CalculatorSetupError

from torch.fx.experimental.proxy_tensor import make_fx

from mace_lpcalc.fastpath import compiled, traceable
from mace_lpcalc.calculator import LowPrecisionMACECalculator
from mace_lpcalc.fastpath.engine import MACEEngine
from tiny_models import build_tiny_model
from mace_lpcalc.precision.policies import apply_policy, copy_without_policy
from mace_lpcalc.systems import water_box

ELEMENTS = (1, 8)
R_MAX = 4.0

pytestmark = pytest.mark.usefixtures("single_thread")


def _model(policy="fp32"):
    return apply_policy(build_tiny_model(ELEMENTS, r_max=R_MAX), policy)


def _engines(model, **options):
    """An eager engine and one compiling within its first call (or as ``options`` say)."""
    make = lambda **kw: MACEEngine(model, z_table_atomic_numbers=ELEMENTS, r_max=R_MAX, **kw)
    return make(), make(**({"compile_model": True, "compile_in_background": False} | options))


def _compute(engine, atoms, stress=True):
    return engine.compute(atoms.positions, atoms.numbers, atoms.cell.array, atoms.pbc,
                          compute_stress=stress)


def _relative(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture
def water():
    atoms = water_box(8, seed=2)
    atoms.positions += np.random.default_rng(1).normal(scale=0.05, size=atoms.positions.shape)
    return atoms


def test_inductor_compiled_call_matches_the_eager_model(water):
    """Generated kernels, forward and backward fused: energy, forces and stress to fp32 rounding."""
    eager, fast = _engines(_model("fp32"))
    expected, got = _compute(eager, water), _compute(fast, water)
    assert fast.compiled.active, fast.compiled.failure
    assert fast.compiled.check_deviation["forces"] < 1e-5
    assert got["energy"] == pytest.approx(expected["energy"], rel=1e-6)
    assert _relative(got["forces"], expected["forces"]) < 1e-5
    assert _relative(got["stress"], expected["stress"]) < 1e-5
    # A moved configuration reuses the compiled function (same counts) and still agrees.
    water.positions += 0.02
    expected, got = _compute(eager, water), _compute(fast, water)
    assert _relative(got["forces"], expected["forces"]) < 1e-5


@pytest.mark.slow
def test_a_second_compilation_of_the_same_call_is_served_by_inductors_cache(water):
    """What a later process pays: the graph is traced again, but inductor's code comes
    from its on-disk cache (it bypasses the cache without a shape environment)."""
    def cache_hits():  # torch replaces its counters now and then: look them up each time
        return torch._dynamo.utils.counters["inductor"]["fxgraph_cache_hit"]
    for attempt in ("cold or warm", "warm"):
        hits = cache_hits()
        eager, fast = _engines(_model("fp32"))
        got = _compute(fast, water)
        assert fast.compiled.active, fast.compiled.failure
    assert cache_hits() == hits + 1
    assert _relative(got["forces"], _compute(eager, water)["forces"]) < 1e-5


def test_cached_code_reads_the_weights_of_the_graph_it_serves(monkeypatch, tmp_path):
    """Inductor's cache key leaves out the values of a graph's constants: the code it
    serves must take them from the graph at hand, not from the one it was compiled for."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    inputs = torch.randn(7, dtype=torch.float64)

    def hits():
        return torch._dynamo.utils.counters["inductor"]["fxgraph_cache_hit"]
    for seed in (0, 1):
        weights = torch.randn(7, dtype=torch.float64,
                              generator=torch.Generator().manual_seed(seed))
        graph = make_fx(lambda x: ((x * weights).sin(),))(inputs)
        before = hits()
        (value,) = compiled.compile_graph(graph, [inputs])(inputs)
        torch.testing.assert_close(value, (inputs * weights).sin(), rtol=0, atol=1e-15)
    assert hits() == before + 1  # the second graph was served from the first one's code


@pytest.fixture
def trace_only(monkeypatch):
    """Trace with make_fx as usual but skip inductor's code generation (seconds, not a minute)."""
    monkeypatch.setattr(compiled, "compile_graph", lambda graph, inputs: graph)


@pytest.fixture
def gated_compile(monkeypatch):
    """Trace-only compilation that waits until the test opens the gate, recording the
    interpreter's thread switch interval meanwhile; the compiled functions count their
    calls."""
    gate, seen = threading.Event(), {"calls": 0}

    def compile_when_allowed(graph, inputs):
        seen["switch_interval_s"] = sys.getswitchinterval()
        assert gate.wait(timeout=60)

        def function(*values):
            seen["calls"] += 1
            return graph(*values)
        return function
    monkeypatch.setattr(compiled, "compile_graph", compile_when_allowed)
    return gate, seen


def test_background_compilation_runs_the_eager_model_until_the_compiled_call_is_ready(
        gated_compile, water):
    gate, seen = gated_compile
    switch_interval_s = sys.getswitchinterval()
    eager, fast = _engines(_model("fp32"), compile_in_background=True)
    expected = _compute(eager, water)
    got = _compute(fast, water)
    assert fast.compiled.pending and fast.compiled.version == 0
    np.testing.assert_array_equal(got["forces"], expected["forces"])  # the eager model
    assert seen["calls"] == 0 and not fast.compiled.last_call_compiled
    gate.set()
    assert fast.compiled.wait(timeout_s=60) and not fast.compiled.pending
    assert fast.compiled.active, fast.compiled.failure
    assert fast.compiled.version == 1 and seen["calls"] == 1  # the check's call
    assert seen["switch_interval_s"] == pytest.approx(switch_interval_s)  # left alone
    water.positions += 0.02
    got = _compute(fast, water)
    assert seen["calls"] == 2 and fast.compiled.last_call_compiled
    assert _relative(got["forces"], _compute(eager, water)["forces"]) < 1e-5


def test_a_background_compilation_overtaken_by_a_new_element_set_is_discarded(
        gated_compile, water):
    """The compiled call evaluates the skip connections for the elements present when it
    was traced; if they change meanwhile, its result must not be installed."""
    gate, seen = gated_compile
    _, fast = _engines(_model("fp32"), compile_in_background=True)
    _compute(fast, water)
    assert fast.compiled.pending
    hydrogen_only = water.copy()
    hydrogen_only.numbers[:] = 1
    _compute(fast, hydrogen_only)  # another element set: the compilation is stale
    gate.set()
    assert fast.compiled.wait(timeout_s=60)
    assert fast.compiled.version == 0 and not fast.compiled._functions
    _compute(fast, hydrogen_only)  # compiles for the present elements now
    assert fast.compiled.wait(timeout_s=60) and fast.compiled.version == 1
    assert fast.compiled.active, fast.compiled.failure
    calls = seen["calls"]
    got = _compute(fast, hydrogen_only)
    assert seen["calls"] == calls + 1
    eager = MACEEngine(_model("fp32"), z_table_atomic_numbers=ELEMENTS, r_max=R_MAX)
    expected = _compute(eager, hydrogen_only)
    assert _relative(got["forces"], expected["forces"]) < 1e-5


def test_a_script_ending_during_a_background_compilation_exits_cleanly():
    """The interpreter waits for the compiling thread (a daemon thread still inside torch
    at exit aborted the process: "terminate called without an active exception")."""
    script = """
import time
import mace_lpcalc.fastpath.compiled as compiled
from mace_lpcalc.fastpath.engine import MACEEngine
from mace_lpcalc.models import build_tiny_model
from mace_lpcalc.systems import water_box
compiled.compile_graph = lambda graph, inputs: time.sleep(2) or graph
engine = MACEEngine(build_tiny_model((1, 8), r_max=4.0), z_table_atomic_numbers=(1, 8),
                    r_max=4.0, compile_model=True)
atoms = water_box(8)
engine.compute(atoms.positions, atoms.numbers, atoms.cell.array, atoms.pbc)
assert engine.compiled.pending
print("script done", flush=True)
"""
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "script done" in finished.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_cuda_graph_of_the_eager_call_is_replaced_once_the_compiled_call_is_ready(
        gated_compile):
    """MD replays a CUDA graph of the eager call while the compilation runs beside it
    (its capture must tolerate the other thread), then a graph of the compiled call."""
    gate, seen = gated_compile
    atoms = water_box(27, seed=3)
    eager, fast = (MACEEngine(_model("fp32"), z_table_atomic_numbers=ELEMENTS, r_max=R_MAX,
                              device="cuda", compile_model=compile_model)
                   for compile_model in (False, True))
    expected = _compute(eager, atoms, stress=False)
    got = _compute(fast, atoms, stress=False)
    assert fast.last_call_replayed_graph and fast.n_graph_captures == 1
    assert fast.compiled.pending and not fast.compiled.last_call_compiled
    assert _relative(got["forces"], expected["forces"]) < 1e-6  # both eager (atomics differ)
    gate.set()
    assert fast.compiled.wait(timeout_s=120) and fast.compiled.active, fast.compiled.failure
    atoms.positions += 0.02
    calls = seen["calls"]
    got = _compute(fast, atoms, stress=False)
    assert fast.n_graph_captures == 2 and fast.last_call_replayed_graph
    assert seen["calls"] > calls and fast.compiled.last_call_compiled  # captured around it
    expected = _compute(eager, atoms, stress=False)
    assert _relative(got["forces"], expected["forces"]) < 1e-5


# The same re-trace either way; the 16-bit case also traces the policy's wrapped blocks,
# and an fp32 trace is checked by the inductor test above and the tests below.
@pytest.mark.parametrize("policy", [pytest.param("fp32", marks=pytest.mark.slow),
                                    "fp32-linear-bf16"])
def test_a_new_system_size_is_traced_again_and_checked(trace_only, policy):
    eager, fast = _engines(_model(policy))
    for n_molecules in (8, 12):
        atoms = water_box(n_molecules, seed=n_molecules)
        expected, got = _compute(eager, atoms, stress=False), _compute(fast, atoms, stress=False)
        assert fast.compiled.active, fast.compiled.failure
        assert _relative(got["forces"], expected["forces"]) < 1e-5
        assert (n_molecules * 3 + 8, fast.edge_capacity) in {
            counts for counts, _ in fast.compiled._functions.values()}


def _broken_compile(monkeypatch, break_outputs):
    """Make every compiled function wrong in a given way (the trace itself stays real)."""
    real_compile = compiled.CompiledModelCall._compile

    def compile_then_break(self, batch, compute_stress):
        return break_outputs(real_compile(self, batch, compute_stress), batch)
    monkeypatch.setattr(compiled.CompiledModelCall, "_compile", compile_then_break)


def test_a_wrong_compiled_function_is_refused_and_the_eager_model_takes_over(
        trace_only, monkeypatch, water, caplog):
    _broken_compile(monkeypatch, lambda function, batch: lambda *inputs: tuple(
        1.5 * value for value in function(*inputs)))
    eager, fast = _engines(_model())
    with caplog.at_level(logging.WARNING, logger="mace_lpcalc.fastpath.compiled"):
        got = _compute(fast, water)
    assert not fast.compiled.active
    assert "compiled energy differs from eager" in fast.compiled.failure
    assert "running eagerly" in caplog.text
    expected = _compute(eager, water)
    assert got["energy"] == pytest.approx(expected["energy"], rel=1e-12)
    np.testing.assert_allclose(got["forces"], expected["forces"], rtol=1e-10, atol=1e-12)


def test_a_function_blind_to_positions_is_caught_away_from_the_traced_inputs(
        trace_only, monkeypatch, water):
    """An operator the trace missed would freeze its output: right at the traced positions,
    wrong anywhere else. The check evaluates displaced positions, so it sees that."""
    def frozen(function, batch):
        outputs = function(*(batch[key] for key in compiled.BATCH_KEYS))
        return lambda *inputs: tuple(value.clone() for value in outputs)
    _broken_compile(monkeypatch, frozen)
    _, fast = _engines(_model())
    _compute(fast, water)
    assert not fast.compiled.active
    assert "differs from eager" in fast.compiled.failure


def _mixed_compile(monkeypatch, eager_weight):
    """Compiled functions returning reference + eager_weight * (eager - reference): as far
    from the model without 16-bit operands as ``eager_weight`` times the eager error."""
    def compile_mixture(self, batch, compute_stress):
        def mixture(*inputs):
            batch = dict(zip(compiled.BATCH_KEYS, inputs))
            eager = self._eager_call(batch, compute_stress)
            reference = self._reference_call(batch, compute_stress)
            return tuple((reference[name] + eager_weight * (eager[name] - reference[name]))
                         .detach() for name in compiled._output_names(compute_stress))
        return mixture
    monkeypatch.setattr(compiled.CompiledModelCall, "_compile", compile_mixture)


def _engines_16bit():
    model = _model("fp32-linear-bf16")
    reference = copy_without_policy(model)
    return MACEEngine(model, z_table_atomic_numbers=ELEMENTS, r_max=R_MAX, compile_model=True,
                      compile_in_background=False, reference_model=reference)


def test_a_16bit_call_rounding_differently_but_as_accurately_is_accepted(monkeypatch, water):
    """Compiled bf16 calls differ from eager ones by 3e-3 on an H200 (fp32 reordering moves
    values across bf16 rounding boundaries) while equally far from fp32: accepted."""
    _mixed_compile(monkeypatch, eager_weight=0.8)
    fast = _engines_16bit()
    _compute(fast, water)
    assert fast.compiled.active, fast.compiled.failure
    assert fast.compiled.check_deviation["forces"] > 5 * compiled.CHECK_TOLERANCE
    compiled_error, eager_error = fast.compiled.check_errors["forces"]
    assert compiled_error == pytest.approx(0.8 * eager_error, rel=1e-3)


def test_a_16bit_call_less_accurate_than_eager_is_refused(monkeypatch, water):
    _mixed_compile(monkeypatch, eager_weight=1.5)
    fast = _engines_16bit()
    got = _compute(fast, water)
    assert not fast.compiled.active
    assert "less accurate than eager" in fast.compiled.failure
    eager = MACEEngine(_model("fp32-linear-bf16"), z_table_atomic_numbers=ELEMENTS, r_max=R_MAX)
    np.testing.assert_allclose(got["forces"], _compute(eager, water)["forces"], rtol=1e-6,
                               atol=1e-9)


def test_a_compilation_error_falls_back_to_the_eager_model(monkeypatch, water):
    def refuse(self, batch, compute_stress):
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(compiled.CompiledModelCall, "_compile", refuse)
    eager, fast = _engines(_model())
    got = _compute(fast, water)
    assert fast.compiled.failure == "RuntimeError: no compiler here"
    assert got["energy"] == pytest.approx(_compute(eager, water)["energy"], rel=1e-12)


def test_calculator_records_compilation_and_refuses_it_without_the_fast_path(
        trace_only, water):
    calc = LowPrecisionMACECalculator(models=build_tiny_model(ELEMENTS, r_max=R_MAX),
                                      policy="fp32", compile_model=True,
                                      compile_in_background=False)
    assert calc.engine is not None and calc.parameters["compile_model"] is True
    water.calc = calc
    assert np.isfinite(water.get_forces()).all() and calc.engine.compiled.active
    assert calc.engine.compiled._reference_call is None  # fp32: checked against eager
    bf16 = LowPrecisionMACECalculator(models=build_tiny_model(ELEMENTS, r_max=R_MAX),
                                      policy="fp32-linear-bf16", compile_model=True)
    bf16.get_forces(water)  # compiles in the background, by default
    assert bf16.engine.compiled.wait(timeout_s=120)
    compiled_error, eager_error = bf16.engine.compiled.check_errors["forces"]
    assert bf16.engine.compiled.active and compiled_error == pytest.approx(eager_error)
    assert eager_error > 1e-4  # the reference really is the model without bf16 operands
    with pytest.raises(CalculatorSetupError, match="compile_model=True needs the fast path"):
        LowPrecisionMACECalculator(models=build_tiny_model(ELEMENTS, r_max=R_MAX),
                                   compile_model=True, fast_path=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TorchScript fuses on CUDA only here")
def test_cuda_trace_after_torchscript_fused_the_spherical_harmonics():
    """After a few eager calls TorchScript runs e3nn's scripted spherical harmonics as fused
    CUDA kernels, which make_fx cannot see; the trace must not freeze their outputs (it did,
    by 2e-3 in the forces, before the trace ran the Python originals)."""
    model = _model("fp32").to("cuda")
    atoms = water_box(27, seed=3)
    eager = MACEEngine(model, z_table_atomic_numbers=ELEMENTS, r_max=R_MAX, device="cuda",
                       use_cuda_graph=False)
    for step in range(4):  # the profiling executor optimises after two runs
        _compute(eager, atoms, stress=False)
        atoms.positions += 0.01
    fast = MACEEngine(model, z_table_atomic_numbers=ELEMENTS, r_max=R_MAX, device="cuda",
                      compile_model=True, compile_in_background=False)
    got = _compute(fast, atoms, stress=False)
    assert fast.compiled.active, fast.compiled.failure
    assert fast.compiled.check_deviation["forces"] < 1e-5
    assert _relative(got["forces"], _compute(eager, atoms, stress=False)["forces"]) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fused convolutions are CUDA-only")
def test_cuda_16bit_compiled_call_is_checked_against_a_working_fp32_copy(trace_only):
    """The reference of a 16-bit check is a copy of the model; cuEquivariance rebuilds its
    kernels on copying, which dropped mace's fused convolution (the copy then failed on
    its first call, and every compiled 16-bit call fell back to eager)."""
    calc = LowPrecisionMACECalculator(models=build_tiny_model(ELEMENTS, r_max=R_MAX),
                                      device="cuda", policy="fp32-linear-bf16",
                                      backend="cuequivariance", compile_model=True,
                                      compile_in_background=False)
    atoms = water_box(27, seed=3)
    atoms.calc = calc
    atoms.get_forces()
    assert calc.engine.compiled.active, calc.engine.compiled.failure
    compiled_error, eager_error = calc.engine.compiled.check_errors["forces"]
    assert 1e-4 < eager_error and compiled_error == pytest.approx(eager_error, rel=1e-3)


def test_a_compiled_engine_regrows_its_edge_capacity_with_extra_headroom(trace_only):
    """Re-compiling costs tens of seconds, so growth, whether found by the post-call count
    or at a neighbour-list rebuild, leaves 12 % room instead of the first 5 %."""
    water = water_box(64, seed=4)  # enough edges that rounding to 64 hides no headroom
    _, fast = _engines(_model())
    _compute(fast, water, stress=False)
    first = fast.edge_capacity
    assert first < 1.12 * fast.n_edges
    builds = fast.neighbors.n_builds
    water.set_cell(water.cell * 0.9, scale_atoms=True)  # more edges inside the cutoff
    water.positions += 0.6  # past half the 1 Å skin: the growth is found at the rebuild
    _compute(fast, water, stress=False)
    assert fast.neighbors.n_builds == builds + 1
    assert fast.edge_capacity > first
    assert fast.edge_capacity >= 1.12 * fast.n_edges
    assert fast.compiled.active, fast.compiled.failure


TRACE_FUSED_SPHERICAL_HARMONICS = """
import mace_lpcalc.compat
import torch
from e3nn import o3
from torch.fx.experimental.proxy_tensor import make_fx
from mace_lpcalc.fastpath import compiled, traceable
# What TorchScript does on CUDA by default: fuse a scripted function once it has run.
torch._C._jit_override_can_fuse_on_cpu(True)
torch._C._jit_set_texpr_fuser_enabled(True)
torch._C._jit_set_te_must_use_llvm_cpu(False)
sh = o3.SphericalHarmonics("1x0e+1x1o+1x2e", normalize=True, normalization="component")
traced, other = torch.randn(50, 3), torch.randn(50, 3)
with torch.no_grad():
    for _ in range(10):
        sh(traced)
    plain = make_fx(sh)(traced)
    traceable.make_traceable(sh)
    token = traceable.TRACING.set(True)
    python_traced = make_fx(sh)(traced)
    traceable.TRACING.reset(token)
    print(float((plain(other) - sh(other)).abs().max()),
          float((python_traced(other) - sh(other)).abs().max()))
"""


def test_a_trace_records_fused_script_functions_as_their_operators():
    """A fused TorchScript function bypasses make_fx (its outputs would be frozen in the
    graph); the traceable instance runs its Python original while tracing. In a fresh
    process: the fuser settings and the fused plan are process-wide."""
    result = subprocess.run([sys.executable, "-c", TRACE_FUSED_SPHERICAL_HARMONICS],
                            capture_output=True, text=True, timeout=300, check=True)
    plain_error, traceable_error = map(float, result.stdout.split())
    assert not plain_error < 1e-3  # the fused function really escapes the trace here
    assert traceable_error < 1e-6


def test_a_graph_compiled_before_skips_the_child_process(trace_only, monkeypatch, water,
                                                        tmp_path):
    """The first compilation of a graph goes through a child process; a later one (another
    engine, as a later run would be) loads it from the cache directly."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    children = []
    monkeypatch.setattr(compiled, "compile_in_child_process",
                        lambda *arguments: children.append(arguments) or True)
    for _ in range(2):
        _, fast = _engines(_model("fp32"))
        fast.compiled._child_process = True
        _compute(fast, water)
        assert fast.compiled.active and fast.compiled.last_call_compiled
    assert len(children) == 1


def test_traces_and_compilations_of_two_engines_never_overlap(monkeypatch, water):
    """torch.fx traces through process-wide state: two calculators compiling in the
    background at once must take turns (on an H100 they broke each other's traces)."""
    running, most, counting = [0], [0], threading.Lock()

    def one_at_a_time(function):
        def run(*arguments):
            with counting:
                running[0] += 1
                most[0] = max(most[0], running[0])
            time.sleep(0.2)
            try:
                return function(*arguments)
            finally:
                with counting:
                    running[0] -= 1
        return run
    real_make_fx = compiled.make_fx
    monkeypatch.setattr(compiled, "make_fx", lambda function: one_at_a_time(real_make_fx(function)))
    monkeypatch.setattr(compiled, "compile_graph", one_at_a_time(lambda graph, inputs: graph))
    engines = [_engines(_model("fp32"), compile_in_background=True)[1] for _ in range(2)]
    threads = [threading.Thread(target=_compute, args=(engine, water)) for engine in engines]
    for thread in threads:
        thread.start()
    for thread, engine in zip(threads, engines):
        thread.join()
        assert engine.compiled.wait(timeout_s=60) and engine.compiled.active
    assert most[0] == 1
