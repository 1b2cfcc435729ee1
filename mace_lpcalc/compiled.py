"""Whole-call compilation of a MACE energy + forces (+ stress) evaluation with TorchInductor.

A MACE call is a forward pass and an autograd backward pass (forces are minus the
gradient of the energy), each a few hundred ATen operators, most of them small
element-wise ones: e3nn's normalisation constants, activations, gradient sums, copies.
Here ``make_fx`` records the whole call, the backward included, as one flat graph of
ATen operators for the current node and edge counts; TorchInductor then fuses the
element-wise chains into a few generated kernels and treats the model's weights as
constants. cuEquivariance's kernels and the matmuls stay library calls.

The graph is specialised to its counts (symbolic counts do not survive e3nn's and
cuEquivariance's shape arithmetic), so a new system size or edge capacity compiles
again; inductor's on-disk cache serves counts seen before, also in later processes.
Each compiled function is checked once against the eager model; a failed compilation
or check logs a warning and the calls fall back to the eager model, so compiling never
changes results beyond rounding.

With 16-bit operands "beyond rounding" needs care. Fused kernels change the fp32
arithmetic (order, intermediates kept in registers) by about 1e-6, and that moves some
values across 16-bit rounding boundaries: on an H200 the compiled fp32-linear-bf16 call
differs from the eager one by 3e-3 in the forces, yet both are 1.2e-2 from fp64. Such a
policy is therefore checked for accuracy instead: against the same model without
reduced-precision operands, the compiled call may be off by at most
``CHECK_ROUNDING_MARGIN`` times the eager call's own error (plus ``CHECK_TOLERANCE``).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time

import torch
from torch.fx.experimental.proxy_tensor import make_fx

logger = logging.getLogger(__name__)

#: The batch entries a MACE model reads, in the order the compiled function takes them.
BATCH_KEYS = ("positions", "node_attrs", "edge_index", "shifts", "unit_shifts", "cell",
              "batch", "ptr", "head")
#: Largest relative L2 difference between compiled and eager results that the check
#: accepts: compilation changes only fp32 rounding (fused and reordered arithmetic;
#: measured 1e-6), while a frozen or missing operator shows as about 1e-2 at the check's
#: displaced positions.
CHECK_TOLERANCE = 1e-4
#: With 16-bit operands: how many times the eager call's error (against the model
#: without them) the compiled call may have. Measured ratios are 0.98-1.01.
CHECK_ROUNDING_MARGIN = 1.25
#: Random displacement (Å, per coordinate) of the positions the check evaluates: far
#: enough from the traced ones that a frozen operator shows above 16-bit rounding.
CHECK_DISPLACEMENT_A = 0.1
#: ``torch.compile`` backend for the traced graph ("aot_eager" skips code generation).
COMPILER_BACKEND = "inductor"


class CompiledModelCall:
    """``model(batch, compute_stress=..., training=False)``, compiled once per stress flag.

    Args:
        eager_call: ``eager_call(batch, compute_stress) -> dict``, the model call run
            eagerly (what is traced, the reference of the check and the fallback). The
            model's weights are baked into the compiled functions, so they must not change
            afterwards.
        reference_call: for a model with 16-bit operands, the same call on the model
            without them (its fp32 or fp64 master weights); the check then compares
            accuracies against it (see the module docstring). None: compare with eager.
    """

    def __init__(self, eager_call, reference_call=None):
        self._eager_call = eager_call
        self._reference_call = reference_call
        #: Per stress flag: the (nodes, edges) compiled for and the compiled function.
        self._functions: dict[bool, tuple[tuple[int, int], object]] = {}
        #: Why the compiled path was abandoned, or None while it is in use.
        self.failure: str | None = None
        #: Wall seconds spent tracing, compiling and checking so far.
        self.setup_seconds = 0.0
        #: Relative L2 difference from the eager model per output, at the last check.
        self.check_deviation: dict[str, float] = {}
        #: With a reference call: per output, the (compiled, eager) relative L2 errors
        #: against it at the last check.
        self.check_errors: dict[str, tuple[float, float]] = {}

    def invalidate(self) -> None:
        """Forget the compiled functions (the model's evaluation changed); compile anew."""
        self._functions.clear()

    @property
    def active(self) -> bool:
        """Whether calls run the compiled functions (no failure so far)."""
        return self.failure is None

    def __call__(self, batch: dict, compute_stress: bool) -> dict:
        counts = (batch["node_attrs"].shape[0], batch["edge_index"].shape[1])
        compiled_for = self._functions.get(compute_stress, (None, None))[0]
        if self.failure is None and counts != compiled_for:
            started = time.perf_counter()
            try:
                self._compile_and_check(batch, compute_stress, counts)
            except Exception as err:  # noqa: BLE001 -- any tracing/compiler error means: run eagerly
                self.failure = f"{type(err).__name__}: {err}"
                logger.warning("compiled MACE call abandoned, running eagerly instead: %s",
                               self.failure)
            elapsed = time.perf_counter() - started
            self.setup_seconds += elapsed
            if self.failure is None:
                logger.info("compiled and checked the MACE call for %d nodes, %d edges "
                            "(stress: %s) in %.1f s", *counts, compute_stress, elapsed)
        if self.failure is not None:
            return self._eager_call(batch, compute_stress)
        return self._run(batch, compute_stress)

    def _run(self, batch: dict, compute_stress: bool) -> dict:
        with torch.no_grad():
            values = self._functions[compute_stress][1](*(batch[key] for key in BATCH_KEYS))
        return dict(zip(_output_names(compute_stress), values))

    def _compile_and_check(self, batch: dict, compute_stress: bool, counts) -> None:
        self._functions.pop(compute_stress, None)  # a stale size's function frees its memory
        self._functions[compute_stress] = counts, self._compile(batch, compute_stress)
        # Checked away from the traced positions: an operator the trace missed would be
        # a constant of the graph and still match at the traced inputs.
        positions = batch["positions"]
        generator = torch.Generator(device=positions.device).manual_seed(0)
        displaced = dict(batch, positions=positions + CHECK_DISPLACEMENT_A * torch.randn(
            positions.shape, generator=generator, dtype=positions.dtype,
            device=positions.device))
        compiled = self._run(displaced, compute_stress)
        eager = _detached(self._eager_call(displaced, compute_stress))
        self.check_deviation = {name: _relative_l2(value, eager[name])
                                for name, value in compiled.items()}
        where = (f"at {batch['node_attrs'].shape[0]} nodes, "
                 f"{batch['edge_index'].shape[1]} edges")
        if self._reference_call is None:
            for name, deviation in self.check_deviation.items():
                if not deviation <= CHECK_TOLERANCE:  # also catches NaN
                    raise ValueError(f"compiled {name} differs from eager by {deviation:.2e} "
                                     f"(relative L2; tolerance {CHECK_TOLERANCE:g}) {where}")
            return
        reference = _detached(self._reference_call(displaced, compute_stress))
        self.check_errors = {name: (_relative_l2(value, reference[name]),
                                    _relative_l2(eager[name], reference[name]))
                             for name, value in compiled.items()}
        for name, (compiled_error, eager_error) in self.check_errors.items():
            if not compiled_error <= CHECK_ROUNDING_MARGIN * eager_error + CHECK_TOLERANCE:
                raise ValueError(
                    f"compiled {name} is less accurate than eager: relative L2 error "
                    f"{compiled_error:.2e} vs {eager_error:.2e} against the model without "
                    f"16-bit operands (allowed: {CHECK_ROUNDING_MARGIN:g}x + "
                    f"{CHECK_TOLERANCE:g}) {where}")

    def _compile(self, batch: dict, compute_stress: bool):
        names = _output_names(compute_stress)

        def energy_forces(*values):
            outputs = self._eager_call(dict(zip(BATCH_KEYS, values)), compute_stress)
            return tuple(outputs[name] for name in names)

        # Traced on the real inputs: the model's weights become constants of the graph.
        with _script_functions_as_python():
            graph = make_fx(energy_forces)(*(batch[key] for key in BATCH_KEYS))
        return torch.compile(graph, backend=COMPILER_BACKEND, dynamic=False, fullgraph=True)


def _detached(outputs: dict) -> dict:
    return {name: value.detach() for name, value in outputs.items() if torch.is_tensor(value)}


def _relative_l2(value: torch.Tensor, reference: torch.Tensor) -> float:
    difference = value.double() - reference.double()
    return float(torch.linalg.vector_norm(difference)
                 / torch.linalg.vector_norm(reference.double()).clamp_min(1e-30))


def _output_names(compute_stress: bool) -> tuple[str, ...]:
    """The model outputs a compiled function returns, in order."""
    return ("energy", "forces", "node_energy") + (("stress",) if compute_stress else ())


@contextlib.contextmanager
def _script_functions_as_python(packages=("e3nn.", "mace.")):
    """Run the TorchScript functions of e3nn and mace as their Python originals.

    Once a scripted function (e3nn's spherical harmonics, ...) has run a few times on
    CUDA, TorchScript executes it as fused kernels that bypass the operators make_fx
    records, and the trace would freeze its outputs at the traced positions. Each such
    function is process-wide, so any earlier MACE model may have triggered this.
    """
    swapped = []
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(packages):
            continue
        for attribute, value in list(vars(module).items()):
            original = getattr(value, "_torchdynamo_inline", None)
            if isinstance(value, torch.jit.ScriptFunction) and callable(original):
                swapped.append((module, attribute, value))
                setattr(module, attribute, original)
    try:
        yield
    finally:
        for module, attribute, value in swapped:
            setattr(module, attribute, value)
