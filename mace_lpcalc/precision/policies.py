"""Named precision policies and the model transform that applies them.

A policy says which parts of a MACE model run in which floating-point format:

=====================  ============  ==========================================
name                   model dtype   what runs in reduced precision
=====================  ============  ==========================================
``fp64``               float64       nothing (the reference)
``fp32``               float32       nothing
``tf32``               float32       every fp32 matmul on TF32 tensor cores (CUDA)
``fp32-linear-bf16``   float32       equivariant Linear layers, radial MLP and
                                     readout MLP: bf16 operands, fp32 accumulation
``fp32-linear-fp16``   float32       the same with fp16 operands
``bf16``               float32       everything autocast covers (torch.autocast)
=====================  ============  ==========================================

In the ``-linear-`` policies, Clebsch–Gordan tables, spherical harmonics, tensor
products, symmetric contractions, the energy sum and the force/stress autograd
reductions stay in the model dtype (where the 16-bit radial weights meet cuEquivariance's
fused convolution, see :mod:`.backends`). The 16-bit layers (:mod:`.casting`) keep their
fp32 parameters (so they stay trainable as master weights) and cast operands on the fly;
cuBLAS's reduced-precision reductions are switched off while a policy is active, so every
16-bit product accumulates in fp32.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses

from mace_lpcalc import compat
from mace_lpcalc.compat import with_cueq_conv_fusion
import torch

from mace_lpcalc.precision.backends import (check_single_backend, feed_16bit_radial_weights,
                                            inner_convolution, unfeed_16bit_radial_weights)
from mace_lpcalc.precision.casting import (POLICY_WRAPPERS, AutocastExempt, AutocastRegion,
                                           replacement_16bit)

_DTYPE_NAMES = {torch.float64: "float64", torch.float32: "float32",
                torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclasses.dataclass(frozen=True)
class PrecisionPolicy:
    """Which floating-point format each part of a MACE model runs in."""

    name: str
    description: str
    model_dtype: torch.dtype
    linear_dtype: torch.dtype | None = None
    autocast_dtype: torch.dtype | None = None
    allow_tf32: bool = False

    @property
    def model_dtype_name(self) -> str:
        """``"float64"`` or ``"float32"``, as mace's calculator spells it."""
        return _DTYPE_NAMES[self.model_dtype]

    @property
    def reduced_dtypes(self) -> tuple[torch.dtype, ...]:
        """16-bit formats this policy computes in, if any."""
        return tuple(d for d in (self.linear_dtype, self.autocast_dtype) if d is not None)

    def as_dict(self) -> dict:
        """A JSON-friendly description (dtypes as names)."""
        return {
            field.name: _DTYPE_NAMES.get(value, value)
            for field in dataclasses.fields(self)
            for value in [getattr(self, field.name)]
        }


POLICIES: dict[str, PrecisionPolicy] = {
    policy.name: policy
    for policy in (
        PrecisionPolicy("fp64", "float64 everywhere (the reference)", torch.float64),
        PrecisionPolicy("fp32", "float32 everywhere", torch.float32),
        PrecisionPolicy("tf32", "float32 with TF32 tensor-core matmuls (CUDA only; fp32 on CPU)",
                        torch.float32, allow_tf32=True),
        PrecisionPolicy("fp32-linear-bf16",
                        "float32; Linear layers and radial/readout MLPs with bf16 operands, "
                        "fp32 accumulation", torch.float32, linear_dtype=torch.bfloat16),
        PrecisionPolicy("fp32-linear-fp16",
                        "float32; Linear layers and radial/readout MLPs with fp16 operands, "
                        "fp32 accumulation", torch.float32, linear_dtype=torch.float16),
        PrecisionPolicy("bf16", "torch.autocast(bfloat16) over the whole model, for comparison",
                        torch.float32, autocast_dtype=torch.bfloat16),
    )
}


def get_policy(policy: str | PrecisionPolicy) -> PrecisionPolicy:
    """Look a policy up by name; an unknown name raises ``ValueError`` listing valid ones."""
    if isinstance(policy, PrecisionPolicy):
        return policy
    try:
        return POLICIES[policy]
    except KeyError:
        raise ValueError(
            f"unknown precision policy {policy!r}; valid policies: {', '.join(POLICIES)}"
        ) from None


def policy_for(policy, default_dtype: str) -> str | PrecisionPolicy:
    """The policy a caller means by ``policy`` and mace's ``default_dtype`` together."""
    by_dtype = {"float64": "fp64", "float32": "fp32"}
    if default_dtype and default_dtype not in by_dtype:
        raise ValueError(f"default_dtype must be 'float64' or 'float32', got {default_dtype!r}")
    if policy is None:
        return by_dtype.get(default_dtype, "fp32")
    if default_dtype and get_policy(policy).model_dtype_name != default_dtype:
        raise ValueError(f"policy {get_policy(policy).name!r} runs a "
                         f"{get_policy(policy).model_dtype_name} model, but "
                         f"default_dtype={default_dtype!r}")
    return policy


def check_device_supports(policy: PrecisionPolicy, device: torch.device | str) -> None:
    """Raise ``RuntimeError`` if ``device`` cannot compute in the policy's 16-bit formats."""
    device = torch.device(device)
    for dtype in policy.reduced_dtypes:
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            if dtype == torch.bfloat16 and major < 8:
                raise RuntimeError(
                    f"policy {policy.name!r} needs bfloat16 matmuls, which "
                    f"{torch.cuda.get_device_name(device)} (sm_{major}{minor}) lacks; "
                    "use fp32-linear-fp16 or fp32")
            if dtype == torch.float16 and major < 7:
                raise RuntimeError(
                    f"policy {policy.name!r} needs fp16 tensor cores (sm_70+); "
                    f"{torch.cuda.get_device_name(device)} is sm_{major}{minor}")
        try:
            probe = torch.ones(2, 2, dtype=dtype, device=device)
            probe @ probe
        except RuntimeError as err:
            raise RuntimeError(
                f"policy {policy.name!r}: device {device} cannot multiply {dtype} "
                f"matrices ({err})") from err


@contextlib.contextmanager
def policy_context(policy: PrecisionPolicy):
    """Set the process-wide matmul flags a policy needs, restoring them after.

    TF32 is off unless the policy asks for it (PyTorch's default may differ), and
    reduced-precision reductions in 16-bit matmuls are off so they accumulate in fp32.
    """
    matmul = torch.backends.cuda.matmul
    saved = (matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             matmul.allow_bf16_reduced_precision_reduction,
             matmul.allow_fp16_reduced_precision_reduction)
    matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = policy.allow_tf32
    matmul.allow_bf16_reduced_precision_reduction = False
    matmul.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        (matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         matmul.allow_bf16_reduced_precision_reduction,
         matmul.allow_fp16_reduced_precision_reduction) = saved


_AUTOCAST_BLOCKS = ("node_embedding", "radial_embedding", "spherical_harmonics",
                    "interactions", "products", "readouts")


def _needs_autocast_exemption(module: torch.nn.Module) -> bool:
    return (type(module).__name__ == "SymmetricContraction"
            or type(module).__module__.startswith("cuequivariance_torch.operations"))


def apply_policy(model: torch.nn.Module, policy: str | PrecisionPolicy) -> torch.nn.Module:
    """Convert ``model`` in place to the policy's dtype and wrap its 16-bit layers.

    Returns the model. Applying a policy to a model that already carries one first
    strips the old one. Refuses a model that mixes e3nn and cuEquivariance layers.
    """
    policy = get_policy(policy)
    check_single_backend(model)
    strip_policy(model)
    model.to(policy.model_dtype)
    if policy.linear_dtype is not None:
        _replace_modules(model, lambda module: replacement_16bit(module, policy.linear_dtype))
        feed_16bit_radial_weights(model, policy.model_dtype)
    if policy.autocast_dtype is not None:
        _replace_modules(model, lambda module: AutocastExempt(module, policy.model_dtype)
                         if _needs_autocast_exemption(module) else None)
        for name in _AUTOCAST_BLOCKS:
            block = getattr(model, name, None)
            if isinstance(block, torch.nn.ModuleList):
                for index, member in enumerate(block):
                    block[index] = AutocastRegion(member, policy.autocast_dtype, policy.model_dtype)
            elif block is not None:
                setattr(model, name, AutocastRegion(block, policy.autocast_dtype,
                                                    policy.model_dtype))
    return model


def strip_policy(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`apply_policy`'s wrappers in place, leaving a plain MACE model."""
    unfeed_16bit_radial_weights(model)
    _replace_modules(model, lambda module: next(iter(module.children()))
                     if isinstance(module, POLICY_WRAPPERS) else None)
    return model


def copy_without_policy(model: torch.nn.Module) -> torch.nn.Module:
    """A separate copy of ``model`` with the policy's wrappers stripped (``model`` keeps them).

    cuEquivariance's ``SegmentedPolynomial`` deep-copies (and pickles) by rebuilding itself
    from its polynomial, which drops the fused-convolution ``forward`` mace installs on the
    instance; the copy gets it again.
    """
    copied_model = strip_policy(copy.deepcopy(model))
    for original, copied in zip(getattr(model, "interactions", ()),
                                getattr(copied_model, "interactions", ())):
        original, copied = inner_convolution(original), inner_convolution(copied)
        if (hasattr(original, compat.CUEQ_FUSION_MARKER)
                and not hasattr(copied, compat.CUEQ_FUSION_MARKER)):
            with_cueq_conv_fusion(copied)
    return copied_model


def _replace_modules(model: torch.nn.Module, replacement_for) -> None:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            replacement = replacement_for(child)
            if replacement is not None:
                setattr(parent, name, replacement)
