"""The compiled energy+forces(+stress) call against the eager model, and its safety net."""

import logging

import mace  # noqa: F401  -- before e3nn
import numpy as np
import pytest
import torch
from ase.calculators.calculator import CalculatorSetupError

from mace_lpcalc import compiled
from mace_lpcalc.calculator import LowPrecisionMACECalculator
from mace_lpcalc.engine import MACEEngine
from mace_lpcalc.models import build_tiny_model
from mace_lpcalc.policies import apply_policy, copy_without_policy
from mace_lpcalc.systems import water_box

ELEMENTS = (1, 8)
R_MAX = 4.0

pytestmark = pytest.mark.usefixtures("single_thread")


def _model(policy="fp32"):
    return apply_policy(build_tiny_model(ELEMENTS, r_max=R_MAX), policy)


def _engines(model):
    make = lambda **kw: MACEEngine(model, z_table_atomic_numbers=ELEMENTS, r_max=R_MAX, **kw)
    return make(), make(compile_model=True)


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


@pytest.fixture
def trace_only(monkeypatch):
    """Trace with make_fx as usual but skip inductor's code generation (seconds, not a minute)."""
    monkeypatch.setattr(compiled, "COMPILER_BACKEND", "aot_eager")


@pytest.mark.parametrize("policy", ["fp32", "fp32-linear-bf16"])
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
    with caplog.at_level(logging.WARNING, logger="mace_lpcalc.compiled"):
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
                      reference_model=reference)


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
                                      policy="fp32", compile_model=True)
    assert calc.engine is not None and calc.parameters["compile_model"] is True
    water.calc = calc
    assert np.isfinite(water.get_forces()).all() and calc.engine.compiled.active
    assert calc.engine.compiled._reference_call is None  # fp32: checked against eager
    bf16 = LowPrecisionMACECalculator(models=build_tiny_model(ELEMENTS, r_max=R_MAX),
                                      policy="fp32-linear-bf16", compile_model=True)
    bf16.get_forces(water)
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
                      compile_model=True)
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
                                      backend="cuequivariance", compile_model=True)
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
