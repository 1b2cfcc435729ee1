"""TorchInductor code generation in a child process, so that MD keeps the interpreter.

A background compilation in a thread shares the Python interpreter with the MD loop.
Inductor's code generation is Python from end to end, and while it runs the MD thread
gets the interpreter only now and then: steps ran at 0.6-0.7x the uncompiled speed
meanwhile (``bench/results/h200_background_compile_*_cold.json``). So the compiling
thread here only traces the call (a few seconds), writes the traced graph, the shapes of
its inputs and the process settings that inductor's cache keys read to a file, and
waits, without the interpreter, for a child process (``python -m`` this module) that
compiles the same graph. The child leaves the generated code in inductor's on-disk cache,
and the compiling thread's own compilation of the graph is then a cache hit that loads it.

Nothing depends on the child succeeding: if it fails or its result is not found in the
cache (a setting the key reads differs), the thread compiles as before. A graph compiled
before, by any process using the same cache, needs no child: a marker beside inductor's
cache (:func:`compile_marker`) says so, and loading from the cache is quick.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from mace_lpcalc.compat import inductor_cache_dir

logger = logging.getLogger(__name__)

#: Longest wait for the child (s); compiling a MACE-OFF-sized call takes 30-60 s.
CHILD_TIMEOUT_S = 900.0


def cache_key_settings() -> dict:
    """The process settings, besides the graph and its inputs, that inductor's cache key
    reads and a fresh process would not share by default."""
    matmul = torch.backends.cuda.matmul
    return {
        "default_dtype": torch.get_default_dtype(),
        "matmul_fp32_precision": matmul.fp32_precision,
        "fp16_reduced_precision_reduction": matmul.allow_fp16_reduced_precision_reduction,
        "bf16_reduced_precision_reduction": matmul.allow_bf16_reduced_precision_reduction,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "num_threads": torch.get_num_threads(),
    }


def apply_cache_key_settings(settings: dict) -> None:
    """Make this process's settings those :func:`cache_key_settings` recorded."""
    matmul = torch.backends.cuda.matmul
    torch.set_default_dtype(settings["default_dtype"])
    matmul.fp32_precision = settings["matmul_fp32_precision"]
    matmul.allow_fp16_reduced_precision_reduction = settings["fp16_reduced_precision_reduction"]
    matmul.allow_bf16_reduced_precision_reduction = settings["bf16_reduced_precision_reduction"]
    torch.use_deterministic_algorithms(settings["deterministic"],
                                       warn_only=settings["deterministic_warn_only"])
    torch.set_num_threads(settings["num_threads"])


def compile_in_child_process(graph: torch.fx.GraphModule, inputs: list[torch.Tensor],
                             settings: dict | None = None,
                             timeout_s: float = CHILD_TIMEOUT_S) -> bool:
    """Compile ``graph`` for ``inputs``' shapes in a child process; True if it succeeded.

    ``settings``: what :func:`cache_key_settings` returns for the process that will look
    the result up (default: this one's now). The child inherits the environment, so it
    writes to the cache this process reads (inductor's directory is resolved here first).
    """
    # The package where this process found it, also when only its sys.path knew the place.
    package_root = str(Path(__file__).resolve().parents[2])
    environment = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=inductor_cache_dir(),
                       PYTHONPATH=os.pathsep.join(filter(None, [
                           package_root, os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory(prefix="mace_lpcalc_compile_") as directory:
        payload = Path(directory) / "graph.pt"
        torch.save({"graph": graph,
                    "inputs": [_describe(value) for value in inputs],
                    "settings": settings or cache_key_settings()}, payload)
        try:
            child = subprocess.run([sys.executable, "-m", __name__, str(payload), str(os.getpid())],
                                   env=environment, capture_output=True, text=True,
                                   timeout=timeout_s, check=False)
        except (OSError, subprocess.SubprocessError) as err:
            logger.info("compiling in a child process failed (%s); compiling here", err)
            return False
    if child.returncode != 0:
        logger.info("compiling in a child process failed (exit %d); compiling here: %s",
                    child.returncode, child.stderr.strip()[-2000:])
        return False
    return True


def compile_marker(graph: torch.fx.GraphModule, inputs: list[torch.Tensor],
                   settings: dict) -> Path:
    """The file beside inductor's cache that says this graph was compiled for these
    inputs and settings (then compiling it again is a cache hit); see :func:`mark_compiled`."""
    # What inductor's key reads besides the constants' values (which it leaves out too).
    described = repr((graph.code, [_describe(value) for value in inputs],
                      sorted(settings.items()), torch.__version__))
    key = hashlib.sha256(described.encode()).hexdigest()
    return Path(inductor_cache_dir()) / "mace_lpcalc_compiled" / key


def mark_compiled(marker: Path) -> None:
    """Record that inductor's cache now holds the code :func:`compile_marker` names."""
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()


def _end_with_parent(parent_pid: int) -> None:
    """On Linux, have the kernel end this child when its parent ends (a compilation
    nobody waits for would hold CPU cores and GPU memory)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # it ended before the line above
        sys.exit(1)


def _describe(value: torch.Tensor) -> dict:
    return {"shape": tuple(value.shape), "stride": tuple(value.stride()),
            "dtype": value.dtype, "device": str(value.device)}


def _example(description: dict) -> torch.Tensor:
    return torch.empty_strided(description["shape"], description["stride"],
                               dtype=description["dtype"], device=description["device"])


def main(argv=None) -> None:
    """Compile the graph of a file :func:`compile_in_child_process` wrote."""
    path, parent_pid = sys.argv[1:] if argv is None else argv
    _end_with_parent(int(parent_pid))
    from mace_lpcalc import compat  # noqa: F401  -- mace before e3nn; registers mace's ops
    try:  # the custom operators of cuEquivariance's kernels, where the graph calls them
        import cuequivariance_ops_torch  # noqa: F401
    except ImportError:
        pass
    from mace_lpcalc.fastpath.compiled import compile_graph

    payload = torch.load(path, weights_only=False)  # written by our parent a moment ago
    apply_cache_key_settings(payload["settings"])
    compile_graph(payload["graph"], [_example(value) for value in payload["inputs"]])


if __name__ == "__main__":
    main()
