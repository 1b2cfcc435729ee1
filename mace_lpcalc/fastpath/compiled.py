"""Whole-call compilation of a MACE energy + forces (+ stress) evaluation with TorchInductor.

A MACE call is a forward pass and an autograd backward pass (forces are minus the
gradient of the energy), each a few hundred ATen operators, most of them small
element-wise ones: e3nn's normalisation constants, activations, gradient sums, copies.
Here ``make_fx`` records the whole call, the backward included, as one flat graph of
ATen operators for the current node and edge counts, with the model's weights as the
graph's constants; TorchInductor then fuses the element-wise chains into a few generated
kernels. cuEquivariance's kernels and the matmuls stay library calls.

The graph goes straight to inductor (``torch._inductor.compile``), not through
TorchDynamo, which would only re-trace an already flat graph. It is specialised to its
counts (symbolic counts do not survive e3nn's and cuEquivariance's shape arithmetic), so
a new system size or edge capacity compiles again; inductor's and AOTAutograd's on-disk
caches serve counts seen before, also in later processes (a warm start skips code
generation). The weights are inputs of the generated code, not part of it, so a model of
the same architecture is served too.

Compiling takes tens of seconds on a cold cache. In the background (the engine's
default), the calls meanwhile run the eager model, which on CUDA means the engine's CUDA
graph of the eager call, so MD does not wait; once the compiled function has passed its check it
takes over, and ``version`` tells the engine to capture it. The command lines shorten
Python's thread switch interval for their process (:data:`BACKGROUND_SWITCH_INTERVAL_S`)
so that the MD loop's thread gets the interpreter back promptly from the compiling one;
a script of one's own can do the same with ``sys.setswitchinterval``.

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

import logging
import sys
import threading
import time

import torch

from mace_lpcalc.compat import (FakeTensorMode, ShapeEnv, TracingContext, inductor_cache_hits,
                                inductor_compile, make_fx, tracing)
from mace_lpcalc.fastpath.inductor_child import (cache_key_settings, compile_in_child_process,
                                                compile_marker, mark_compiled)
from mace_lpcalc.fastpath.traceable import TRACING, make_traceable  # noqa: F401 -- engine's

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
#: Python's thread switch interval (s) while a background compilation runs (default
#: 5 ms): the MD loop's thread waits up to this long for the interpreter each time it
#: hands it over (around every torch call, for instance), ~100 times per step.
BACKGROUND_SWITCH_INTERVAL_S = 5e-5


def shorten_switch_interval_of_this_process() -> None:
    """For command lines, which own their process: :data:`BACKGROUND_SWITCH_INTERVAL_S`.

    Only the MD loop and a compiling thread contend for the interpreter, so the short
    interval costs nothing once compilation is over.
    """
    sys.setswitchinterval(BACKGROUND_SWITCH_INTERVAL_S)
#: Held by every eager model call, by CUDA graph captures, and by a background
#: compilation while it traces and runs kernels: a CUDA graph capture fails when another
#: thread launches work that synchronises the device meanwhile, and a compiled
#: function's first run does (inductor benchmarks its kernel configurations). No
#: Python or library state depends on it: what a call changes (gathers, element set,
#: tracing) is the calling thread's own, in context variables.
DEVICE_WORK_LOCK = threading.RLock()
#: Held while this process traces (make_fx here, AOTAutograd inside inductor): torch.fx
#: patches functions through one process-wide patcher, and two threads tracing at once
#: break each other ("CURRENT_PATCHER is None", two calculators compiling on an H100).
#: Taken after DEVICE_WORK_LOCK where both are held, never before it.
TRACING_LOCK = threading.Lock()


class CompiledModelCall:
    """``model(batch, compute_stress=..., training=False)``, compiled once per stress flag.

    Args:
        eager_call: ``eager_call(batch, compute_stress) -> dict``, the model call run
            eagerly (what is traced, the reference of the check and the fallback). The
            traced graphs hold the model's weights, so they must not change afterwards. With ``background``, it is also called from the compiling thread,
            so it must be safe to call from two threads.
        reference_call: for a model with 16-bit operands, the same call on the model
            without them (its fp32 or fp64 master weights); the check then compares
            accuracies against it (see the module docstring). None: compare with eager.
        background: compile in a worker thread while calls run eagerly (see the module
            docstring); False compiles within the call that needs it.
        child_process: generate the code in a child process
            (:mod:`mace_lpcalc.fastpath.inductor_child`), so that a background compilation
            leaves the interpreter to the calls; this process then loads it from inductor's
            on-disk cache.
    """

    def __init__(self, eager_call, reference_call=None, background: bool = False,
                 child_process: bool = False):
        self._eager_call = eager_call
        self._reference_call = reference_call
        self._background = background
        self._child_process = child_process
        #: The background compilation's thread. Not a daemon: a daemon thread still in
        #: torch's code when the interpreter exits aborts the process, so a script ending
        #: while a compilation runs waits for it instead.
        self._job: threading.Thread | None = None
        #: Held while installing or forgetting compiled functions (two threads do so).
        self._install_lock = threading.Lock()
        #: Per stress flag: the (nodes, edges) compiled for and the compiled function.
        self._functions: dict[bool, tuple[tuple[int, int], object]] = {}
        #: Bumped by invalidate(): a compilation started before it is discarded.
        self._generation = 0
        #: Bumped whenever a checked compiled function is installed.
        self.version = 0
        #: Whether the last call ran a compiled function (under a CUDA graph: whether the
        #: graph holds one, as graphs call only while being captured).
        self.last_call_compiled = False
        #: Why the compiled path was abandoned, or None while it is in use.
        self.failure: str | None = None
        #: Wall seconds spent tracing, compiling and checking so far.
        self.setup_seconds = 0.0
        #: Compilations started so far (one per stress flag and size, plus stale ones).
        self.n_compilations = 0
        #: Of those, how many this process loaded from inductor's on-disk cache.
        self.n_cache_hits = 0
        #: Relative L2 difference from the eager model per output, at the last check.
        self.check_deviation: dict[str, float] = {}
        #: With a reference call: per output, the (compiled, eager) relative L2 errors
        #: against it at the last check.
        self.check_errors: dict[str, tuple[float, float]] = {}

    def invalidate(self) -> None:
        """Forget the compiled functions (the model's evaluation changed); compile anew."""
        with self._install_lock:
            self._generation += 1
            self._functions.clear()

    @property
    def active(self) -> bool:
        """Whether calls run the compiled functions (no failure so far)."""
        return self.failure is None

    @property
    def pending(self) -> bool:
        """Whether a background compilation is running."""
        return self._job is not None and self._job.is_alive()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for a background compilation; True when none is running any more."""
        if self._job is not None:
            self._job.join(timeout_s)
        return not self.pending

    def __call__(self, batch: dict, compute_stress: bool) -> dict:
        counts = (batch["node_attrs"].shape[0], batch["edge_index"].shape[1])
        function = self._function_for(compute_stress, counts)
        if function is None and self.failure is None and not _capturing(batch["positions"]):
            with self._install_lock:  # a stale size's function frees its memory
                self._functions.pop(compute_stress, None)
            if self._background:
                self._start_job(batch, compute_stress, counts)
            else:
                self._compile_and_install(batch, compute_stress, counts, self._generation)
                function = self._function_for(compute_stress, counts)
        self.last_call_compiled = function is not None
        if function is None:
            return self._eager_call(batch, compute_stress)
        return self._run(function, batch, compute_stress)

    def _function_for(self, compute_stress: bool, counts):
        if self.failure is not None:
            return None
        compiled_for, function = self._functions.get(compute_stress, (None, None))
        return function if compiled_for == counts else None

    def _start_job(self, batch: dict, compute_stress: bool, counts) -> None:
        if self.pending:  # one at a time; the next call after it starts the next one
            return
        # The caller's buffers change at every step: the job gets its own copy, ready on
        # the job's stream before the job reads it.
        with torch.no_grad():
            snapshot = {key: value.clone() for key, value in batch.items()}
        copied = None
        if snapshot["positions"].is_cuda:
            copied = torch.cuda.Event()
            copied.record()
        self._job = threading.Thread(
            target=self._background_job, name="mace-lpcalc-compile",
            args=(snapshot, compute_stress, counts, self._generation, copied))
        self._job.start()

    def _background_job(self, batch, compute_stress, counts, generation, copied) -> None:
        stream = None
        if copied is not None:
            stream = torch.cuda.Stream(batch["positions"].device)
            stream.wait_event(copied)
        with torch.cuda.stream(stream):  # None: no stream
            self._compile_and_install(batch, compute_stress, counts, generation)
            if stream is not None:
                stream.synchronize()  # everything the check launched has finished

    def _compile_and_install(self, batch, compute_stress, counts, generation) -> None:
        started = time.perf_counter()
        self.n_compilations += 1
        try:
            function = self._compile(batch, compute_stress)
            with DEVICE_WORK_LOCK:
                self._check(function, batch, compute_stress)
        except Exception as err:  # noqa: BLE001 -- any tracing/compiler error means: run eagerly
            if generation != self._generation:
                return  # checked against an evaluation that changed meanwhile: no verdict
            self.failure = f"{type(err).__name__}: {err}"
            logger.warning("compiled MACE call abandoned, running eagerly instead: %s",
                           self.failure)
            return
        finally:
            self.setup_seconds += time.perf_counter() - started
        with self._install_lock:
            if generation != self._generation:
                return  # the evaluation changed while compiling (another element set, say)
            self._functions[compute_stress] = counts, function
            self.version += 1
        logger.info("compiled and checked the MACE call for %d nodes, %d edges (stress: %s) "
                    "in %.1f s", *counts, compute_stress, time.perf_counter() - started)

    def _run(self, function, batch: dict, compute_stress: bool) -> dict:
        with torch.no_grad():
            values = function(*(batch[key] for key in BATCH_KEYS))
        return dict(zip(_output_names(compute_stress), values))

    def _check(self, function, batch: dict, compute_stress: bool) -> None:
        # Checked away from the traced positions: an operator the trace missed would be
        # a constant of the graph and still match at the traced inputs.
        positions = batch["positions"]
        generator = torch.Generator(device=positions.device).manual_seed(0)
        displaced = dict(batch, positions=positions + CHECK_DISPLACEMENT_A * torch.randn(
            positions.shape, generator=generator, dtype=positions.dtype,
            device=positions.device))
        compiled = self._run(function, displaced, compute_stress)
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

        inputs = [batch[key] for key in BATCH_KEYS]
        # Traced on the real inputs: the model's weights become constants of the graph.
        token = TRACING.set(True)
        try:
            with DEVICE_WORK_LOCK, TRACING_LOCK:
                graph = make_fx(energy_forces)(*inputs)
                settings = cache_key_settings()  # those the eager call ran under
        finally:
            TRACING.reset(token)
        if not self._child_process:
            with TRACING_LOCK:
                return compile_graph(graph, inputs)
        # A graph compiled before (in any process) is a cache hit here: a child would only
        # add its own start (imports: 15-20 s on an H100 machine).
        marker = compile_marker(graph, inputs, settings)
        if not marker.exists():
            compile_in_child_process(graph, inputs, settings)
        with TRACING_LOCK:
            hits = inductor_cache_hits()
            function = compile_graph(graph, inputs)
            self.n_cache_hits += inductor_cache_hits() > hits
        mark_compiled(marker)
        return function


def compile_graph(graph: torch.fx.GraphModule, inputs: list[torch.Tensor]):
    """TorchInductor code for a flat ATen graph, specialised to the inputs' shapes.

    The inputs are handed over as static-shaped fake tensors of a mode with a shape
    environment: without one, inductor bypasses its on-disk caches; with real tensors,
    it would make their sizes symbolic.
    """
    fake_mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    # Without gradients, as it runs: else AOTAutograd would differentiate the backward.
    with tracing(TracingContext(fake_mode)), torch.no_grad():
        fakes = [fake_mode.from_tensor(value, static_shapes=True) for value in inputs]
        return inductor_compile(graph, fakes)


def _detached(outputs: dict) -> dict:
    return {name: value.detach() for name, value in outputs.items() if torch.is_tensor(value)}


def _relative_l2(value: torch.Tensor, reference: torch.Tensor) -> float:
    difference = value.double() - reference.double()
    return float(torch.linalg.vector_norm(difference)
                 / torch.linalg.vector_norm(reference.double()).clamp_min(1e-30))


def _output_names(compute_stress: bool) -> tuple[str, ...]:
    """The model outputs a compiled function returns, in order."""
    return ("energy", "forces", "node_energy") + (("stress",) if compute_stress else ())


def _capturing(tensor: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured (then nothing may be copied or compiled)."""
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


def capture_cuda_graph(evaluate, device: torch.device, warmup_calls: int) -> torch.cuda.CUDAGraph:
    """``evaluate()`` captured as a CUDA graph, after ``warmup_calls`` eager calls on a side
    stream (PyTorch needs them to set up autograd's and the libraries' lazy state outside
    the capture). Raises RuntimeError if the capture fails, with the caller's stream
    current again."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    try:
        with DEVICE_WORK_LOCK:
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for _ in range(warmup_calls):
                    evaluate()
            current.wait_stream(side)
            # The warm-up's cached blocks cannot serve the graph's private pool; handing
            # them back first keeps the peak near one evaluation's memory, not two.
            torch.cuda.empty_cache()
            # Each graph gets its own memory pool: graphs of one engine (with and without
            # stress) may be replayed in any order, which pool sharing does not allow.
            graph = torch.cuda.CUDAGraph()
            # "thread_local": a background compilation may still allocate memory.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                evaluate()
    except RuntimeError:
        # A failed capture_end skips restoring the stream torch.cuda.graph switched to;
        # everything after (vesin included) must run on the caller's stream again.
        torch.cuda.set_stream(current)
        torch.cuda.synchronize(device)
        raise
    return graph
