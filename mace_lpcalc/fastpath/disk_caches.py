"""Where compiled kernels are kept between runs, so that a second run starts at full speed.

Two compilers serve a calculator on CUDA, and both can keep what they compiled on disk:

* TorchInductor (the whole-call compilation of :mod:`mace_lpcalc.fastpath.compiled`):
  its FX-graph, AOTAutograd and Triton caches are keyed by the traced graph (the
  architecture, the policy's dtypes, the node and edge counts), the GPU and the
  torch/Triton versions. torch keeps them in a temporary directory by default, which a
  reboot, or a batch job's private ``/tmp``, throws away.
* cuEquivariance's NVRTC compiler, which builds each tensor-product kernel at its first
  call in a process (about 10 s of a fresh process's start at 5184 atoms,
  ``bench/results/h200_fresh_process_setup_profile_5184.txt``); its cache is off unless
  ``CUEQUIVARIANCE_OPS_NVRTC_CACHE_DIR`` names a directory.

Before either compiles, building a cuEquivariance model (or converting an e3nn one) works
out each symmetric contraction's descriptor, and the projection of e3nn's weights onto
it, by exact group theory in Python, in every fresh process: for an OFF24(M)-shaped model
4.1 s on our CPU (``python -m mace_lpcalc.perf.descriptor_cache``), 12.8 of the 14.4 s an
H200 machine spent constructing its first calculator under cProfile
(``bench/results/h200_fresh_process_setup_profile_5184.txt``). Their inputs are irreps
and degrees, so :func:`use_descriptor_cache` keeps one file per input under
``descriptors/``, beside the compilers' caches, for every later process (0.01 s). The
files are pickles, as torch's own compile caches are: the cache directory is trusted as
the rest of the user's home is.

All go under one root, ``$MACE_LPCALC_CACHE_DIR`` or else ``mace_lpcalc`` in the user's
cache directory (``$XDG_CACHE_HOME``, default ``~/.cache``), one directory per GPU model
and versions of torch and cuEquivariance's kernels, so that a shared home directory
serves nodes with different GPUs and an upgrade starts clean instead of growing an old
cache. The libraries read environment variables, so that is what is set, once per
process and before the first compilation; a variable the user has set is left alone.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import os
import pickle
import re
import tempfile
import warnings
from importlib import metadata
from pathlib import Path

import torch

from mace_lpcalc.compat import SYMMETRIC_CONTRACTION_DESCRIPTORS, inductor_default_cache_dir

#: Environment variable naming the cache root.
CACHE_ROOT_VARIABLE = "MACE_LPCALC_CACHE_DIR"
#: Each library's variable, and the subdirectory of the versioned cache it gets.
LIBRARY_CACHE_VARIABLES = {"TORCHINDUCTOR_CACHE_DIR": "inductor",
                           "CUEQUIVARIANCE_OPS_NVRTC_CACHE_DIR": "cuequivariance_nvrtc"}


def cache_root() -> Path:
    """The directory all of this package's caches live under."""
    if os.environ.get(CACHE_ROOT_VARIABLE):
        return Path(os.environ[CACHE_ROOT_VARIABLE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "mace_lpcalc"


def versioned_cache_dir(device: torch.device) -> Path:
    """``cache_root()/<gpu>-sm<major><minor>/torch-<v>_cueq-<v>`` for a CUDA device."""
    major, minor = torch.cuda.get_device_capability(device)
    gpu = re.sub(r"[^A-Za-z0-9.]+", "-", torch.cuda.get_device_name(device)).strip("-")
    return cache_root() / f"{gpu}-sm{major}{minor}" / (
        f"torch-{torch.__version__}_cueq-{_cuequivariance_ops_version()}")


def use_disk_caches(device) -> dict[str, str]:
    """Point the compilers' caches at :func:`versioned_cache_dir` unless already set, and
    serve the symmetric-contraction descriptors from disk (:func:`use_descriptor_cache`).

    Returns each variable's directory as it now is, and the descriptors' (for
    provenance). No variable is set for a CPU device: inductor's CPU code is cheap to
    regenerate and cuEquivariance's kernels run on CUDA only; its descriptors are built
    on the CPU, for either device.
    """
    device = torch.device(device)
    directories = {"descriptors": str(use_descriptor_cache())}
    if device.type != "cuda":
        return directories
    # Inductor writes its temporary default into the environment at its first use (an
    # import of another package may have made it): that is no choice of the user's.
    untouched = {"", inductor_default_cache_dir()}
    directory = versioned_cache_dir(device)
    for variable, subdirectory in LIBRARY_CACHE_VARIABLES.items():
        if os.environ.get(variable, "") in untouched:
            path = directory / subdirectory
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as err:  # a read-only home, say: the libraries' defaults then
                warnings.warn(f"no compile cache in {path} ({err}); compiled code will not "
                              f"be kept between runs (set {CACHE_ROOT_VARIABLE})",
                              RuntimeWarning, stacklevel=2)
                continue
            os.environ[variable] = str(path)
    return {variable: os.environ[variable] for variable in LIBRARY_CACHE_VARIABLES
            if os.environ.get(variable)} | directories


def use_descriptor_cache() -> Path:
    """Serve this process's symmetric-contraction descriptors from files, written the first
    time each is computed (:data:`~mace_lpcalc.compat.SYMMETRIC_CONTRACTION_DESCRIPTORS`),
    in ``cache_root()/descriptors/cue-<v>_mace-<v>``, which is returned. Nothing is
    written until a descriptor is computed: an e3nn model leaves no trace."""
    directory = cache_root() / "descriptors" / (
        f"cue-{_version('cuequivariance')}_mace-{_version('mace-torch')}")
    for module_name, name in SYMMETRIC_CONTRACTION_DESCRIPTORS:
        module = importlib.import_module(module_name)
        function = getattr(module, name)
        if isinstance(function, DescriptorsOnDisk):
            if function.directory == directory:
                continue
            function = function.function
        setattr(module, name, DescriptorsOnDisk(function, directory))
    return directory


class DescriptorsOnDisk:
    """``function`` with its results kept in ``directory``, a file per input, and in
    memory; inputs other than irreps and tuples of ints are passed straight through."""

    def __init__(self, function, directory: Path):
        functools.update_wrapper(self, function)
        self.function, self.directory = function, directory
        self._in_memory = {}
        self._warned = False

    def __call__(self, *args):
        key = _input_key(args)
        if key is None:
            return self.function(*args)
        if key not in self._in_memory:
            name = f"{self.function.__module__}.{self.function.__qualname__}-{key}.pkl"
            path = self.directory / name
            try:
                with path.open("rb") as file:
                    self._in_memory[key] = pickle.load(file)
            except Exception:  # noqa: BLE001 -- absent, truncated or from other code: recompute
                self._in_memory[key] = self.function(*args)
                self._write(path, self._in_memory[key])
        return self._in_memory[key]

    def _write(self, path: Path, result) -> None:
        """Through a temporary file and a rename, so that a process reading meanwhile, or
        writing the same file, never sees half a file. A failed write only loses the cache."""
        temporary = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp",
                                             delete=False) as file:
                temporary = file.name
                pickle.dump(result, file)
            os.replace(temporary, path)
        except (OSError, pickle.PicklingError) as err:
            if temporary:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
            if not self._warned:
                self._warned = True
                warnings.warn(f"no descriptor cache in {path.parent} ({err}); cuEquivariance "
                              f"models will be set up from scratch in every process (set "
                              f"{CACHE_ROOT_VARIABLE})", RuntimeWarning, stacklevel=3)


def _input_key(args) -> str | None:
    """A digest naming the inputs exactly (the irreps' group included), or None."""
    parts = []
    for arg in args:
        if hasattr(arg, "irrep_class"):  # cuequivariance.Irreps
            parts.append(f"{arg.irrep_class.__module__}.{arg.irrep_class.__qualname__}:{arg}")
        elif isinstance(arg, tuple) and all(type(item) is int for item in arg):
            parts.append(repr(arg))
        else:
            return None
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "none"


def _cuequivariance_ops_version() -> str:
    versions = [_version(package) for package in ("cuequivariance-ops-torch-cu13",
                                                    "cuequivariance-ops-torch-cu12")]
    return next((version for version in versions if version != "none"), "none")
