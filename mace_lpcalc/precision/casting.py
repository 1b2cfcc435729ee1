"""The 16-bit module replacements a precision policy installs, and how each is built.

Each equivariant Linear (e3nn ``o3.Linear`` or cuEquivariance ``cuet.Linear``) is
replaced by :class:`IrrepBlockLinear`, which runs one matmul per irrep block in the
model's own memory layout (``mul_ir`` for e3nn, ``ir_mul`` for cuEquivariance). Its
block weights are found by probing the original layer and verified to reproduce it
exactly, so an unknown layout raises an error instead of silently permuting channels.
Dense layers of the radial and readout MLPs become :class:`DenseLayer16` (e3nn) or
:class:`TorchLinear16` (``torch.nn.Linear``). Every replacement keeps the original layer
as its first child, with its fp32 parameters as the trainable master weights, and casts
operands on the fly. The ``bf16`` policy's :class:`AutocastRegion` and
:class:`AutocastExempt` wrap whole blocks instead.
"""

from __future__ import annotations

import dataclasses

from mace_lpcalc.compat import E3nnDenseLayer
import torch
from e3nn import o3

try:
    import cuequivariance_torch as cuet

    _CUET_LINEAR: tuple = (cuet.Linear,)
except ImportError:  # cuEquivariance is optional at run time
    _CUET_LINEAR = ()


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


class DenseProduct16(_OperandCache):
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


class DenseLayer16(DenseProduct16):
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


class TorchLinear16(DenseProduct16):
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


#: Every wrapper a policy installs; each one's first child is the module it wraps.
POLICY_WRAPPERS = (IrrepBlockLinear, DenseLayer16, TorchLinear16, AutocastExempt, AutocastRegion)


def replacement_16bit(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module | None:
    """The 16-bit replacement of an equivariant Linear or dense layer; ``None`` for others."""
    if isinstance(module, (o3.Linear, *_CUET_LINEAR)):
        return IrrepBlockLinear(module, dtype)
    if isinstance(module, E3nnDenseLayer):
        return DenseLayer16(module, dtype)
    if isinstance(module, torch.nn.Linear):
        return TorchLinear16(module, dtype)
    return None
