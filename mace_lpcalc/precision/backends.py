"""Which equivariant library a model uses, and cuEquivariance's fused convolutions in 16 bits.

Where cuEquivariance's fused convolution kernel consumes the radial MLP's per-edge output,
that output is handed over in 16 bits, as the MLP's matmul produced it, and the kernel
computes in fp32: the same numbers as casting it to fp32 first, without writing and
re-reading an fp32 copy of the largest per-edge tensor (edges × tensor-product weights) in
the forward and backward passes.
"""

from __future__ import annotations

from mace_lpcalc import compat  # noqa: F401  -- mace before e3nn; version check
import torch
from e3nn import o3

from mace_lpcalc.precision.casting import DenseProduct16


def inner_convolution(interaction: torch.nn.Module) -> torch.nn.Module:
    """An interaction's ``conv_tp``, seen through the fast path's edge-chunking wrapper
    (:class:`mace_lpcalc.fastpath.edge_chunks.ChunkedConvolution`) where there is one."""
    return getattr(interaction.conv_tp, "convolution", interaction.conv_tp)


def _fused_convolutions(model: torch.nn.Module):
    """(radial MLP, fused-convolution kernel) pairs of a cuEquivariance model on CUDA.

    mace marks interactions whose ``conv_tp`` gathers, multiplies and scatters in one
    ``uniform_1d`` kernel with ``conv_fusion``; ``kernel.dtypes`` maps each of its
    buffers to the input whose dtype it takes (-1: the kernel's math dtype). Seen through
    the fast path's edge-chunking wrappers (their ``convolution`` and ``radial_mlp``).
    """
    for interaction in getattr(model, "interactions", ()):
        kernel = (getattr(inner_convolution(interaction), "m", None)
                  if hasattr(interaction, "conv_tp") else None)
        mlp = getattr(interaction, "conv_tp_weights", None)
        mlp = getattr(mlp, "radial_mlp", mlp)
        if hasattr(interaction, "conv_fusion") and hasattr(kernel, "dtypes") and mlp is not None:
            yield mlp, kernel


def feed_16bit_radial_weights(model: torch.nn.Module, model_dtype: torch.dtype) -> None:
    """Let each fused convolution take its radial MLP's 16-bit output directly.

    The kernel then writes its output in its math dtype (the model dtype) instead of
    the dtype of its first input (the weights). Skipped where the last MLP layer cannot
    hand over its raw product (an activation or bias follows it) or the kernel does
    not compute in the model dtype.
    """
    for mlp, kernel in _fused_convolutions(model):
        layers = [m for m in mlp.modules() if isinstance(m, DenseProduct16)]
        if not layers or not layers[-1].can_emit_operand_dtype \
                or kernel.math_dtype != model_dtype:
            continue
        kernel.dtypes_without_policy = list(kernel.dtypes)
        kernel.dtypes = kernel.dtypes[:kernel.num_inputs] + [-1] * kernel.num_outputs
        layers[-1].emits_operand_dtype = True


def unfeed_16bit_radial_weights(model: torch.nn.Module) -> None:
    """Undo :func:`feed_16bit_radial_weights`."""
    for mlp, kernel in _fused_convolutions(model):
        if hasattr(kernel, "dtypes_without_policy"):
            kernel.dtypes = kernel.dtypes_without_policy
            del kernel.dtypes_without_policy
        for layer in mlp.modules():
            if isinstance(layer, DenseProduct16):
                layer.emits_operand_dtype = False


def model_backend(model: torch.nn.Module) -> str:
    """``"cuequivariance"`` or ``"e3nn"``: which library the model's equivariant layers use."""
    return "cuequivariance" if any(
        type(module).__module__.startswith("cuequivariance_torch.operations")
        for module in model.modules()) else "e3nn"


def check_single_backend(model: torch.nn.Module) -> None:
    """Refuse a model whose equivariant layers mix e3nn and cuEquivariance.

    The two libraries order irrep features differently (``mul_ir`` vs ``ir_mul``); an e3nn
    Linear fed cuEquivariance features permutes channels (the thesis measured a relative
    L2 error of ~0.7 in node features), so such a model computes wrong physics silently.
    """
    e3nn_layers = [name for name, module in model.named_modules()
                   if isinstance(module, (o3.Linear, o3.TensorProduct))]
    cuet_layers = [name for name, module in model.named_modules()
                   if type(module).__module__.startswith("cuequivariance_torch.operations")]
    if e3nn_layers and cuet_layers:
        raise ValueError(
            "model mixes e3nn and cuEquivariance layers (e3nn: "
            f"{', '.join(e3nn_layers[:3])}...; cuEquivariance: {', '.join(cuet_layers[:3])}...); "
            "their irrep layouts differ, so mixing them silently permutes features. "
            "Convert the whole model with mace.cli.convert_e3nn_cueq or convert_cueq_e3nn.")
