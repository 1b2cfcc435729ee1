"""What the installed packages give a calculator: its equivariant backend, and provenance.

The backend a calculator runs on: the names it accepts, what ``"auto"`` resolves to on a
device (cuEquivariance on CUDA when its compiled kernels import, else e3nn), and putting
models on it with mace's own converters. The provenance: the version of Python and of
every package a result depends on, which runs and benchmarks record.
"""

from __future__ import annotations

import datetime
import platform
import warnings
from importlib import metadata

from mace_lpcalc import compat  # noqa: F401  -- mace before e3nn; version check
import torch
from ase.calculators.calculator import CalculatorSetupError

from mace_lpcalc.precision.backends import check_single_backend, model_backend

BACKENDS = ("auto", "e3nn", "cuequivariance")


def cuequivariance_kernels_available() -> bool:
    """True when cuEquivariance's compiled CUDA kernels are importable."""
    try:
        import cuequivariance_ops_torch  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn ``"auto"`` into a concrete backend: cuEquivariance on CUDA when its kernels import."""
    if backend not in BACKENDS:
        raise CalculatorSetupError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    if backend == "auto":
        use_cueq = device.type == "cuda" and cuequivariance_kernels_available()
        return "cuequivariance" if use_cueq else "e3nn"
    return backend


def _convert_backend(model: torch.nn.Module, backend: str, device: str) -> torch.nn.Module:
    """Convert a whole model between e3nn and cuEquivariance (mace's own converters)."""
    if model_backend(model) == backend:
        return model
    saved_dtype = torch.get_default_dtype()  # mace's converters change the global default
    try:
        if backend == "cuequivariance":
            from mace.cli.convert_e3nn_cueq import run as convert
        else:
            from mace.cli.convert_cueq_e3nn import run as convert
        return convert(model, device=device).to(device)
    finally:
        torch.set_default_dtype(saved_dtype)


def models_on_backend(models: list[torch.nn.Module], backend: str, *, dtype: torch.dtype,
                      device_type: str, auto: bool) -> tuple[list[torch.nn.Module], str]:
    """``models`` in ``dtype`` on ``backend``, and the backend they ended up on.

    A model mace's converter cannot take stays on e3nn, with a warning, when the backend
    was chosen by ``"auto"`` (``auto``) and the model is e3nn; otherwise that refuses the
    set-up, as does a model that mixes the two libraries.
    """
    prepared = []
    for model in models:
        try:
            check_single_backend(model)
        except ValueError as err:
            raise CalculatorSetupError(str(err)) from None
        model = model.to(dtype)
        try:
            prepared.append(_convert_backend(model, backend, device_type))
        except Exception as err:  # noqa: BLE001 -- mace's converters raise anything
            problem = (f"mace's converter to {backend} cannot convert this "
                       f"{type(model).__name__} ({type(err).__name__}: {err})")
            if not auto or model_backend(model) != "e3nn":
                raise CalculatorSetupError(problem) from None
            # stacklevel 3: the line that builds the calculator, whose __init__ calls this.
            warnings.warn(f"LowPrecisionMACECalculator: {problem}; running it on e3nn",
                          RuntimeWarning, stacklevel=3)
            backend = "e3nn"
            prepared.append(model)
    return prepared, backend


def package_versions() -> dict[str, str]:
    """Versions of Python and of every package a result depends on, for provenance."""
    from mace_lpcalc import __version__
    versions = {"python": platform.python_version(), "mace_lpcalc": __version__}
    for package in ("mace-torch", "torch", "e3nn", "cuequivariance-torch",
                    "cuequivariance-ops-torch-cu12", "cuequivariance-ops-torch-cu13", "ase",
                    "numpy", "h5py", "mdtraj", "vesin-torch", "torch-sim-atomistic"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def measurement_provenance(device: str) -> dict:
    """What every committed measurement records beside its numbers: the GPU (None off
    CUDA), the UTC date, and the package and CUDA versions."""
    return {"gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": package_versions() | {"cuda": torch.version.cuda}}
