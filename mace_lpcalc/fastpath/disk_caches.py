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

Both go under one root, ``$MACE_LPCALC_CACHE_DIR`` or else ``mace_lpcalc`` in the user's
cache directory (``$XDG_CACHE_HOME``, default ``~/.cache``), one directory per GPU model
and versions of torch and cuEquivariance's kernels, so that a shared home directory
serves nodes with different GPUs and an upgrade starts clean instead of growing an old
cache. The libraries read environment variables, so that is what is set, once per
process and before the first compilation; a variable the user has set is left alone.
"""

from __future__ import annotations

import os
import re
import warnings
from importlib import metadata
from pathlib import Path

import torch

from mace_lpcalc.compat import inductor_default_cache_dir

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
    """Point the compilers' caches at :func:`versioned_cache_dir` unless already set.

    Returns each variable's directory as it now is (for provenance). Nothing is set for
    a CPU device: inductor's CPU code is cheap to regenerate and cuEquivariance's kernels
    run on CUDA only.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return {}
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
            if os.environ.get(variable)}


def _cuequivariance_ops_version() -> str:
    for package in ("cuequivariance-ops-torch-cu13", "cuequivariance-ops-torch-cu12"):
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return "none"
