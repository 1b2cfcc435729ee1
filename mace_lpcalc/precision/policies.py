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
reductions stay in the model dtype. Where cuEquivariance's fused convolution kernel
consumes the radial MLP's per-edge output, that output is handed over in 16 bits, as
the MLP's matmul produced it, and the kernel computes in fp32: the same numbers as
casting it to fp32 first, without writing and re-reading an fp32 copy of the largest
per-edge tensor (edges × tensor-product weights) in the forward and backward passes. The 16-bit layers keep their fp32 parameters
(so they stay trainable as master weights) and cast operands on the fly; cuBLAS's
reduced-precision reductions are switched off while a policy is active, so every
16-bit product accumulates in fp32.

Each equivariant Linear (e3nn ``o3.Linear`` or cuEquivariance ``cuet.Linear``) is
replaced by :class:`IrrepBlockLinear`, which runs one matmul per irrep block in the
model's own memory layout (``mul_ir`` for e3nn, ``ir_mul`` for cuEquivariance). Its
block weights are found by probing the original layer and verified to reproduce it
exactly, so an unknown layout raises an error instead of silently permuting channels.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses

from mace_lpcalc import compat
from mace_lpcalc.compat import E3nnDenseLayer, with_cueq_conv_fusion
import torch
from e3nn import o3

try:
    import cuequivariance_torch as cuet

    _CUET_LINEAR: tuple = (cuet.Linear,)
except ImportError:  # cuEquivariance is optional at run time
    cuet = None
    _CUET_LINEAR = ()

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


class BlockMatmul(torch.nn.Module):
    """The reduced-precision product itself, a module of its own so hooks see its operands."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x @ weight


class _OperandCache(torch.nn.Module):
    """Holds the 16-bit copy of a weight, remade only when the fp32 parameter changes.

    While the parameter trains (``requires_grad``) the copy is made on every call, so the
    gradient reaches the fp32 master weight; in inference the cast is done once, which also
    keeps it out of captured CUDA graphs.
    """

    def operand(self, parameter: torch.Tensor, build):
        if parameter.requires_grad:
            return build()
        key = (parameter._version, parameter.data_ptr(), parameter.device)
        if getattr(self, "_operand_key", None) != key:
            self._operand_value, self._operand_key = build(), key
        return self._operand_value


class IrrepBlockLinear(_OperandCache):
    """An equivariant Linear run as one matmul per irrep block, with 16-bit operands.

    ``linear`` (the original e3nn or cuEquivariance layer) is kept as a child: its fp32
    weight stays the trainable parameter and ``strip_policy`` restores it unchanged.
    """

    def __init__(self, linear: torch.nn.Module, operand_dtype: torch.dtype,
                 layout: str | None = None, blocks: list | None = None):
        super().__init__()
        self.linear = linear
        self.operand_dtype = operand_dtype
        self.matmul = BlockMatmul()
        if blocks is None:  # probe the layer; given blocks are only for verifying a probe
            layout, blocks = _probe_blocks(linear, o3.Irreps(str(linear.irreps_in)),
                                           o3.Irreps(str(linear.irreps_out)))
        self.layout, self.blocks = layout, blocks

    def _block_weights(self) -> list[torch.Tensor | None]:
        """Per output block, the stacked (sum of mul_in, mul_out) matrix in 16 bits."""
        weight = self.linear.weight.reshape(-1)
        return [torch.cat([source.alpha * weight[source.w_start:source.w_start + source.mul_in
                                                 * block.mul_out].view(source.mul_in,
                                                                       block.mul_out)
                           for source in block.sources]).to(self.operand_dtype)
                if block.sources else None for block in self.blocks]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block_weights = self.operand(self.linear.weight, self._block_weights)
        rows = x.shape[0]
        pieces = []
        for block, block_weight in zip(self.blocks, block_weights):
            if block_weight is None:  # an output irrep no input reaches: zero, as in e3nn
                pieces.append(x.new_zeros(rows, block.mul_out * block.ir_dim))
                continue
            features = [block_as_rows(x, self.layout, source.in_start, source.mul_in,
                                      block.ir_dim) for source in block.sources]
            # One product over all sources, so the whole sum accumulates in fp32.
            stacked = features[0] if len(features) == 1 else torch.cat(features, dim=1)
            out = self.matmul(stacked.to(self.operand_dtype), block_weight)
            pieces.append(rows_as_block(out.to(x.dtype), self.layout, rows, block.ir_dim,
                                        block.mul_out))
        if not pieces:  # no output irreps (a dipole readout's empty gate): nothing to compute
            return x.new_zeros(rows, 0)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)


def block_as_rows(x: torch.Tensor, layout: str, start: int, mul: int,
                  ir_dim: int) -> torch.Tensor:
    """One irrep block of ``x`` (columns ``start``.. in ``layout``) as (rows*ir_dim, mul):
    each of the irrep's components is a row of ``mul`` channels, ready for a matmul."""
    rows = x.shape[0]
    part = x[:, start:start + mul * ir_dim]
    if layout == "mul_ir":
        part = part.reshape(rows, mul, ir_dim).transpose(1, 2)
    return part.reshape(rows * ir_dim, mul)


def rows_as_block(out: torch.Tensor, layout: str, rows: int, ir_dim: int,
                  mul: int) -> torch.Tensor:
    """The inverse of :func:`block_as_rows`: (rows*ir_dim, mul) back to (rows, mul*ir_dim)."""
    out = out.reshape(rows, ir_dim, mul)
    if layout == "mul_ir":
        out = out.transpose(1, 2)
    return out.reshape(rows, mul * ir_dim)


@dataclasses.dataclass(frozen=True)
class _Source:
    in_start: int
    mul_in: int
    w_start: int
    alpha: float


@dataclasses.dataclass(frozen=True)
class _Block:
    mul_out: int
    ir_dim: int
    sources: tuple[_Source, ...]


def _probe_blocks(linear, irreps_in: o3.Irreps, irreps_out: o3.Irreps):
    """Find each output block's input slice, weight slice and normalisation by probing.

    A block's matrix is ``alpha * w[w_start : w_start + mul_in*mul_out].view(mul_in, mul_out)``;
    the gradient of one matrix entry with respect to the flat weight is ``alpha`` at exactly
    one index, which gives both. The result is then checked against the layer on random
    inputs, in float64, for both layouts; only a layout that reproduces it is accepted.
    """
    weight = linear.weight
    original = weight.detach().clone()
    flat_numel = weight.numel()
    problems = []
    try:
        with torch.no_grad():
            weight.copy_(torch.randn_like(weight, dtype=torch.float64).to(weight.dtype))
        for layout in ("mul_ir", "ir_mul"):
            try:
                blocks = _blocks_for_layout(linear, irreps_in, irreps_out, layout, flat_numel)
                _verify_blocks(linear, blocks, irreps_in, layout)
                return layout, blocks
            except _LayoutMismatch as err:
                problems.append(f"{layout}: {err}")
    finally:
        with torch.no_grad():
            weight.copy_(original)
    raise ValueError(f"cannot map {type(linear).__name__}({irreps_in} -> {irreps_out}) onto "
                     f"irrep blocks ({'; '.join(problems)}); refusing to guess its layout")


class _LayoutMismatch(Exception):
    pass


def _flat_index(layout: str, start: int, mul: int, ir_dim: int, u: int, m: int) -> int:
    return start + (u * ir_dim + m if layout == "mul_ir" else m * mul + u)


def _blocks_for_layout(linear, irreps_in, irreps_out, layout, flat_numel):
    inputs_of = {}
    offset = 0
    for mul, ir in irreps_in:
        inputs_of.setdefault(ir, []).append((offset, mul))
        offset += mul * ir.dim
    blocks = []
    out_offset = 0
    for mul_out, ir in irreps_out:
        out_index = _flat_index(layout, out_offset, mul_out, ir.dim, 0, 0)
        sources = tuple(_probe_source(linear, irreps_in.dim, layout, in_start, mul_in, ir,
                                      out_index, mul_out, flat_numel)
                        for in_start, mul_in in inputs_of.get(ir, []))
        blocks.append(_Block(mul_out, ir.dim, sources))
        out_offset += mul_out * ir.dim
    return blocks


def _probe_source(linear, dim_in, layout, in_start, mul_in, ir, out_index, mul_out, flat_numel):
    weight = linear.weight
    probe = torch.zeros(1, dim_in, dtype=weight.dtype, device=weight.device)
    probe[0, _flat_index(layout, in_start, mul_in, ir.dim, 0, 0)] = 1.0
    weight.grad = None
    with torch.enable_grad():
        weight.requires_grad_(True)
        linear(probe)[0, out_index].backward()
    gradient = weight.grad.reshape(-1)
    weight.grad = None
    nonzero = torch.nonzero(gradient).flatten()
    if nonzero.numel() != 1:
        raise _LayoutMismatch(f"entry (0,0) of a {ir} block depends on {nonzero.numel()} weights")
    w_start = int(nonzero[0])
    if w_start + mul_in * mul_out > flat_numel:
        raise _LayoutMismatch(f"{ir} block weights run past the end of the weight vector")
    return _Source(in_start, mul_in, w_start, float(gradient[w_start]))


def _verify_blocks(linear, blocks, irreps_in, layout):
    weight = linear.weight
    x = torch.randn(5, irreps_in.dim, dtype=weight.dtype, device=weight.device)
    rebuilt = IrrepBlockLinear(linear, weight.dtype, layout, blocks)
    with torch.no_grad():
        expected, got = linear(x), rebuilt(x)
    if expected.numel() == 0 and got.shape == expected.shape:
        return  # no output irreps: nothing to reproduce
    tolerance = 1e-10 if weight.dtype == torch.float64 else 1e-4
    error = (expected - got).abs().max() / expected.abs().max().clamp_min(1e-30)
    if not error <= tolerance:
        raise _LayoutMismatch(f"block reconstruction is off by {float(error):.2e} (relative)")


class _DenseProduct16(_OperandCache):
    """A dense layer whose matmul runs on 16-bit operands with fp32 accumulation.

    The wrapped layer is registered first, as the child ``strip_policy`` restores; its
    fp32 parameters stay the master weights.
    """

    def __init__(self, wrapped_name: str, wrapped: torch.nn.Module, operand_dtype: torch.dtype):
        super().__init__()
        setattr(self, wrapped_name, wrapped)
        self.operand_dtype = operand_dtype
        self.matmul = BlockMatmul()
        #: Return the 16-bit product as it is (a consumer that computes in fp32 takes it).
        #: Set only where ``can_emit_operand_dtype``: nothing follows the product.
        self.emits_operand_dtype = False

    def _product(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out = self.matmul(x.to(self.operand_dtype), weight)
        return out if self.emits_operand_dtype else out.to(x.dtype)


class DenseLayer16(_DenseProduct16):
    """An e3nn ``FullyConnectedNet`` layer (radial MLP) with 16-bit operands.

    Same arithmetic as ``e3nn.nn._fc._Layer``: ``act(x @ W / sqrt(h_in var_in)) sqrt(var_out)``.
    """

    def __init__(self, layer: E3nnDenseLayer, operand_dtype: torch.dtype):
        super().__init__("layer", layer, operand_dtype)

    @property
    def can_emit_operand_dtype(self) -> bool:
        return self.layer.act is None

    def _scaled_weight(self) -> torch.Tensor:
        layer = self.layer
        if layer.act is not None:
            scale = (layer.h_in * layer.var_in) ** -0.5
        else:
            scale = (layer.h_in * layer.var_in / layer.var_out) ** -0.5
        return (layer.weight * scale).to(self.operand_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._product(x, self.operand(self.layer.weight, self._scaled_weight))
        if self.layer.act is not None:
            out = self.layer.act(out) * self.layer.var_out ** 0.5
        return out


class TorchLinear16(_DenseProduct16):
    """A ``torch.nn.Linear`` (mace's newer RadialMLP) with 16-bit operands."""

    def __init__(self, linear: torch.nn.Linear, operand_dtype: torch.dtype):
        super().__init__("linear", linear, operand_dtype)

    @property
    def can_emit_operand_dtype(self) -> bool:
        return self.linear.bias is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._product(x, self.operand(
            self.linear.weight, lambda: self.linear.weight.t().to(self.operand_dtype)))
        return out if self.linear.bias is None else out + self.linear.bias


def _device_type(*values) -> str:
    """The device type autocast must target: that of the first tensor argument."""
    return next((value.device.type for value in values if torch.is_tensor(value)), "cpu")


class AutocastExempt(torch.nn.Module):
    """Runs a module outside autocast, on inputs cast back to the model dtype.

    Symmetric contractions and cuEquivariance kernels take only fp32/fp64 operands, so a
    naive whole-model autocast crashes inside them; the ``bf16`` policy runs them here.
    """

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module = module
        self.dtype = dtype

    def forward(self, *args):
        with torch.autocast(_device_type(*args), enabled=False):
            return self.module(*(a.to(self.dtype) if torch.is_tensor(a) and a.is_floating_point()
                                 else a for a in args))


class AutocastRegion(torch.nn.Module):
    """Runs a MACE block under ``torch.autocast`` and hands its outputs back in the model dtype.

    The ``bf16`` policy wraps every block (embeddings, interactions, products, readouts)
    this way; the energy sum and the autograd force/stress reductions in the model's own
    forward stay outside autocast.
    """

    def __init__(self, module: torch.nn.Module, autocast_dtype: torch.dtype,
                 model_dtype: torch.dtype):
        super().__init__()
        self.module = module
        self.autocast_dtype = autocast_dtype
        self.model_dtype = model_dtype

    def forward(self, *args, **kwargs):
        device_type = _device_type(*args, *kwargs.values())
        with torch.autocast(device_type, dtype=self.autocast_dtype):
            out = self.module(*args, **kwargs)
        if isinstance(out, tuple):
            return tuple(self._restore(o) for o in out)
        return self._restore(out)

    def _restore(self, value):
        if torch.is_tensor(value) and value.is_floating_point():
            return value.to(self.model_dtype)
        return value


_AUTOCAST_BLOCKS = ("node_embedding", "radial_embedding", "spherical_harmonics",
                    "interactions", "products", "readouts")


def _needs_autocast_exemption(module: torch.nn.Module) -> bool:
    return (type(module).__name__ == "SymmetricContraction"
            or type(module).__module__.startswith("cuequivariance_torch.operations"))


_WRAPPERS = (IrrepBlockLinear, DenseLayer16, TorchLinear16, AutocastExempt, AutocastRegion)


def _wrap(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module | None:
    if isinstance(module, (o3.Linear, *_CUET_LINEAR)):
        return IrrepBlockLinear(module, dtype)
    if isinstance(module, E3nnDenseLayer):
        return DenseLayer16(module, dtype)
    if isinstance(module, torch.nn.Linear):
        return TorchLinear16(module, dtype)
    return None


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
        _replace_modules(model, lambda module: _wrap(module, policy.linear_dtype))
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
                     if isinstance(module, _WRAPPERS) else None)
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
        if (hasattr(original.conv_tp, compat.CUEQ_FUSION_MARKER)
                and not hasattr(copied.conv_tp, compat.CUEQ_FUSION_MARKER)):
            with_cueq_conv_fusion(copied.conv_tp)
    return copied_model


def _fused_convolutions(model: torch.nn.Module):
    """(radial MLP, fused-convolution kernel) pairs of a cuEquivariance model on CUDA.

    mace marks interactions whose ``conv_tp`` gathers, multiplies and scatters in one
    ``uniform_1d`` kernel with ``conv_fusion``; ``kernel.dtypes`` maps each of its
    buffers to the input whose dtype it takes (-1: the kernel's math dtype).
    """
    for interaction in getattr(model, "interactions", ()):
        kernel = getattr(getattr(interaction, "conv_tp", None), "m", None)
        mlp = getattr(interaction, "conv_tp_weights", None)
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
        layers = [m for m in mlp.modules() if isinstance(m, _DenseProduct16)]
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
            if isinstance(layer, _DenseProduct16):
                layer.emits_operand_dtype = False


def _replace_modules(model: torch.nn.Module, replacement_for) -> None:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            replacement = replacement_for(child)
            if replacement is not None:
                setattr(parent, name, replacement)


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
