"""MACE models for mace_lpcalc: safe loading, hashing, and builders.

Loading a ``.model`` file runs code: MACE models are full Python pickles, so
``load_model`` unpickles with ``weights_only=False``. Only load files you trust.

Builders make models in code because no pretrained weights can be downloaded:

* :func:`build_tiny_model` — a few thousand parameters, sub-second on a CPU, for tests.
* :func:`build_off24m_shaped_model` — the MACE-OFF24(M) architecture (128x0e+128x1o,
  L=1 messages, max_ell 3, correlation 3, 2 interactions, r_max 6 Å, 8 Bessel, 10
  organic elements) with random weights, for speed work. Its energies are meaningless.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

from mace_lpcalc import compat  # noqa: F401  -- mace before e3nn; version check
import numpy as np
import torch
from e3nn import o3
from mace import modules

#: The elements of MACE-OFF24: H C N O F P S Cl Br I.
ORGANIC_ELEMENTS = (1, 6, 7, 8, 9, 15, 16, 17, 35, 53)


class ModelLoadError(ValueError):
    """A model file is missing or is not a MACE model."""


def build_model(
    atomic_numbers=ORGANIC_ELEMENTS,
    *,
    hidden_irreps: str = "128x0e + 128x1o",
    max_ell: int = 3,
    correlation: int = 3,
    num_interactions: int = 2,
    r_max: float = 6.0,
    num_bessel: int = 8,
    num_polynomial_cutoff: int = 5,
    radial_mlp=(64, 64, 64),
    mlp_irreps: str = "16x0e",
    avg_num_neighbors: float = 30.0,
    atomic_energies=None,
    scale: float = 1.0,
    shift: float = 0.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> torch.nn.Module:
    """Build an e3nn-backend ``ScaleShiftMACE`` with seeded random weights.

    The interaction blocks are those of MACE-OFF (a plain first interaction, residual
    ones after), so ``mace.cli.convert_e3nn_cueq`` converts the result.
    """
    atomic_numbers = sorted(int(z) for z in atomic_numbers)
    if atomic_energies is None:
        atomic_energies = np.zeros(len(atomic_numbers))
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(seed)
        model = modules.ScaleShiftMACE(
            r_max=r_max,
            num_bessel=num_bessel,
            num_polynomial_cutoff=num_polynomial_cutoff,
            max_ell=max_ell,
            interaction_cls=modules.interaction_classes[
                "RealAgnosticResidualInteractionBlock"
            ],
            interaction_cls_first=modules.interaction_classes[
                "RealAgnosticInteractionBlock"
            ],
            num_interactions=num_interactions,
            num_elements=len(atomic_numbers),
            hidden_irreps=o3.Irreps(hidden_irreps),
            MLP_irreps=o3.Irreps(mlp_irreps),
            gate=torch.nn.functional.silu,
            atomic_energies=np.asarray(atomic_energies, dtype=float),
            avg_num_neighbors=avg_num_neighbors,
            atomic_numbers=atomic_numbers,
            correlation=correlation,
            radial_MLP=list(radial_mlp),
            atomic_inter_scale=scale,
            atomic_inter_shift=shift,
        )
    finally:
        torch.set_default_dtype(previous_dtype)
    return model.to(dtype)


def build_tiny_model(atomic_numbers=(1, 6, 8), *, r_max: float = 4.0, seed: int = 0,
                     dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """A small MACE with the full block structure (L=1, correlation 2), for tests."""
    return build_model(
        atomic_numbers,
        hidden_irreps="8x0e + 8x1o",
        max_ell=2,
        correlation=2,
        r_max=r_max,
        num_bessel=6,
        radial_mlp=(16, 16),
        mlp_irreps="4x0e",
        avg_num_neighbors=10.0,
        atomic_energies=-np.arange(1, len(atomic_numbers) + 1, dtype=float),
        scale=0.5,
        seed=seed,
        dtype=dtype,
    )


def build_off24m_shaped_model(*, seed: int = 0, dtype: torch.dtype = torch.float32):
    """The MACE-OFF24(M) architecture with random weights (about the same size)."""
    return build_model(ORGANIC_ELEMENTS, seed=seed, dtype=dtype)


def load_model(path, device: str = "cpu") -> torch.nn.Module:
    """Load a MACE ``.model`` file (a full pickle: this executes code from the file).

    Raises :class:`ModelLoadError` naming the problem if the file is missing, cannot
    be unpickled, or does not hold a MACE model.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"MACE model file not found: {path}")
    try:
        model = torch.load(path, map_location=device, weights_only=False)
    except Exception as err:  # noqa: BLE001 -- any unpickling failure means "not a model"
        raise ModelLoadError(
            f"{path} is not a loadable MACE model ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "atomic_numbers"):
        raise ModelLoadError(
            f"{path} does not hold a MACE model (found {type(model).__name__})"
        )
    return model


def model_hash(model: torch.nn.Module) -> str:
    """SHA-256 over the model's class, parameter/buffer names, shapes and values."""
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        buffer = io.BytesIO()
        np.save(buffer, tensor.detach().cpu().double().numpy() if tensor.is_floating_point()
                else tensor.detach().cpu().numpy())
        digest.update(buffer.getvalue())
    return digest.hexdigest()


def model_elements(model: torch.nn.Module) -> list[int]:
    """Atomic numbers a MACE model knows, in its own order."""
    return [int(z) for z in model.atomic_numbers]


def default_model_path() -> Path | None:
    """The shipped water model, if present in the checkout's ``systems/``."""
    candidate = Path(os.environ.get("MACE_LPCALC_MODEL", Path(__file__).resolve().parent.parent
                                    / "systems" / "water_mace.model"))
    return candidate if candidate.is_file() else None
