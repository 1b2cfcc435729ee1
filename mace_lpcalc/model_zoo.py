"""MACE architectures built in code with mace's own constructors, for conformance and speed tests.

No pretrained weights can be downloaded, so the models users bring are imitated by
architecture: every interaction-block class mace offers (the training CLI's default is a
residual first block, MACE-OFF and MACE-MP use a plain one), hidden irreps with L = 0 to
3, correlation 1 to 3, 1 to 3 interactions, ``MACE`` and ``ScaleShiftMACE``, several
heads, ZBL pair repulsion, the agnostic product, distance transforms, and the dipole
models. Weights are random (seeded), so energies mean nothing; what the tests compare is
our calculator against mace's own on the same weights.

:data:`ARCHITECTURES` maps a name to the keyword arguments of :func:`build_architecture`;
``size="tiny"`` shrinks channels for CPU tests, ``size="off24m"`` uses MACE-OFF24(M)'s
widths (128 channels, 64-wide radial MLP) for speed measurements.
"""

from __future__ import annotations

from mace_lpcalc import compat  # noqa: F401  -- mace before e3nn; version check
import numpy as np
import torch
from e3nn import o3
from mace import modules

#: name -> architecture options (see :func:`build_architecture`).
ARCHITECTURES: dict[str, dict] = {
    # mace's training CLI at its defaults (--model MACE builds a ScaleShiftMACE):
    # residual interactions from the first one.
    "residual-first": dict(first="RealAgnosticResidualInteractionBlock", lmax=1,
                           correlation=3, num_interactions=2, model="ScaleShiftMACE"),
    "unscaled-MACE-class": dict(first="RealAgnosticResidualInteractionBlock", lmax=1,
                                correlation=2, num_interactions=2, model="MACE"),
    # MACE-OFF / MACE-MP: a plain first interaction, residual ones after.
    "plain-first": dict(first="RealAgnosticInteractionBlock", lmax=1, correlation=3,
                        num_interactions=2, model="ScaleShiftMACE"),
    "L0": dict(lmax=0, correlation=2, num_interactions=2, model="ScaleShiftMACE"),
    "L2": dict(lmax=2, correlation=2, num_interactions=2, model="ScaleShiftMACE"),
    "L3-one-interaction": dict(lmax=3, correlation=1, num_interactions=1,
                               model="ScaleShiftMACE"),
    "three-interactions": dict(lmax=1, correlation=[3, 2, 1], num_interactions=3,
                               model="ScaleShiftMACE"),
    "density": dict(first="RealAgnosticDensityInteractionBlock",
                    later="RealAgnosticDensityResidualInteractionBlock", lmax=1,
                    correlation=2, num_interactions=2, model="ScaleShiftMACE"),
    "attention-residual": dict(first="RealAgnosticAttResidualInteractionBlock",
                               later="RealAgnosticAttResidualInteractionBlock", lmax=1,
                               correlation=2, num_interactions=2, model="ScaleShiftMACE"),
    "nonlinear-residual": dict(first="RealAgnosticResidualNonLinearInteractionBlock",
                               later="RealAgnosticResidualNonLinearInteractionBlock",
                               lmax=1, correlation=2, num_interactions=2,
                               model="ScaleShiftMACE"),
    "multihead": dict(lmax=1, correlation=2, num_interactions=2, model="ScaleShiftMACE",
                      heads=("pt_head", "default")),
    "zbl-agnostic-agnesi": dict(lmax=1, correlation=2, num_interactions=2,
                                model="ScaleShiftMACE", pair_repulsion=True,
                                use_agnostic_product=True, distance_transform="Agnesi"),
    "dipole": dict(lmax=1, correlation=2, num_interactions=2, model="AtomicDipolesMACE"),
    "energy-dipole": dict(lmax=1, correlation=2, num_interactions=2,
                          model="EnergyDipolesMACE"),
}

_SIZES = {
    "tiny": dict(channels=4, radial_mlp=(8, 8), mlp_irreps="4x0e", num_bessel=4),
    "off24m": dict(channels=128, radial_mlp=(64, 64, 64), mlp_irreps="16x0e", num_bessel=8),
}

#: mace's calculator ``model_type`` for each model class.
MODEL_TYPES = {"MACE": "MACE", "ScaleShiftMACE": "MACE", "AtomicDipolesMACE": "DipoleMACE",
               "EnergyDipolesMACE": "EnergyDipoleMACE"}


def _hidden_irreps(channels: int, lmax: int) -> o3.Irreps:
    parities = "eoeo"
    return o3.Irreps(" + ".join(f"{channels}x{l}{parities[l]}" for l in range(lmax + 1)))


def build_architecture(name: str, atomic_numbers=(1, 6, 8), *, size: str = "tiny",
                       r_max: float = 4.0, seed: int = 0,
                       dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """Build architecture ``name`` of :data:`ARCHITECTURES` with seeded random weights (e3nn backend).

    Args:
        name: a key of :data:`ARCHITECTURES`.
        atomic_numbers: the model's elements.
        size: ``"tiny"`` (4 channels, for CPU tests) or ``"off24m"`` (MACE-OFF24(M) widths).
        r_max: cutoff radius in Å.
        seed: seeds the random weights.
        dtype: parameter dtype.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    if size not in _SIZES:
        raise ValueError(f"unknown size {size!r}; known: {', '.join(_SIZES)}")
    spec, widths = dict(ARCHITECTURES[name]), _SIZES[size]
    atomic_numbers = sorted(int(z) for z in atomic_numbers)
    model_class = spec.pop("model")
    heads = list(spec.pop("heads", ("Default",)))
    kwargs = dict(
        r_max=r_max,
        num_bessel=widths["num_bessel"],
        num_polynomial_cutoff=5,
        max_ell=max(2, spec["lmax"]),
        interaction_cls=modules.interaction_classes[
            spec.pop("later", "RealAgnosticResidualInteractionBlock")],
        interaction_cls_first=modules.interaction_classes[
            spec.pop("first", "RealAgnosticInteractionBlock")],
        num_interactions=spec.pop("num_interactions"),
        num_elements=len(atomic_numbers),
        hidden_irreps=_hidden_irreps(widths["channels"], spec.pop("lmax")),
        MLP_irreps=o3.Irreps(widths["mlp_irreps"]),
        gate=torch.nn.functional.silu,
        avg_num_neighbors=8.0,
        atomic_numbers=atomic_numbers,
        correlation=spec.pop("correlation"),
        radial_MLP=list(widths["radial_mlp"]),
    )
    energies = -np.arange(1, len(atomic_numbers) + 1, dtype=float)
    if model_class in ("MACE", "ScaleShiftMACE"):
        kwargs.update(heads=heads, atomic_energies=np.tile(energies, (len(heads), 1)), **spec)
        if model_class == "ScaleShiftMACE":
            kwargs.update(atomic_inter_scale=[0.5] * len(heads),
                          atomic_inter_shift=[0.1] * len(heads))
    elif model_class == "AtomicDipolesMACE":
        kwargs.update(atomic_energies=None)
    else:
        kwargs.update(atomic_energies=energies)
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(seed)
        model = getattr(modules, model_class)(**kwargs)
    finally:
        torch.set_default_dtype(previous_dtype)
    return model.to(dtype)


def model_type_of(model: torch.nn.Module) -> str:
    """The ``model_type`` mace's calculator needs for ``model`` (``MACE`` for energy models)."""
    return MODEL_TYPES.get(type(model).__name__, "MACE")
