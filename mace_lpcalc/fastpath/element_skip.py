"""MACE's element-dependent skip connections as one matmul per irrep block over the elements in use.

Each MACE interaction calls ``skip_tp(features, node_attrs)``: a fully connected tensor
product with the one-hot element vector, i.e. a separate equivariant linear map per
element of the model. e3nn and cuEquivariance (method ``"naive"``) evaluate it for all
elements at once, through an intermediate of nodes × elements × channels: for
MACE-OFF24(M)'s ten elements the first interaction's skip costs 1.3 ms of forward
device time at 5184 water atoms on an H200 (bench/results/h200_profile_cueq_fp32_1728.json),
for a system that contains two of them.

:class:`ElementSkip` evaluates the same map as, per output irrep block, one matmul of the
block's features with the weights of the elements in use side by side, then picks each
node's own column block with its one-hot row. The block weights are read off the original
module by probing it with unit vectors and verified to reproduce it, as
:class:`mace_lpcalc.precision.casting.IrrepBlockLinear` does for Linear layers. A caller that knows
which elements occur (:class:`mace_lpcalc.fastpath.engine.MACEEngine`) restricts the matmul to them
for its own calls with :func:`elements_in_use` (a context variable: other threads and
callers of the same model are not affected); by default every element of the model is
used, so the module is a faithful replacement anywhere.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging

from mace_lpcalc import compat  # noqa: F401  -- mace before e3nn; version check
import torch
from e3nn import o3

from mace_lpcalc.precision.casting import _flat_index, block_as_rows, rows_as_block

logger = logging.getLogger(__name__)

_ELEMENTS_IN_USE = contextvars.ContextVar("mace_lpcalc_elements_in_use", default=None)


@contextlib.contextmanager
def elements_in_use(elements):
    """Within this block, this thread's :class:`ElementSkip` calls evaluate only these
    element indices (one-hot columns); None: all of them.

    Nodes of any other element would get a zero skip term: the caller guarantees that
    none occur.
    """
    token = _ELEMENTS_IN_USE.set(None if elements is None else tuple(elements))
    try:
        yield
    finally:
        _ELEMENTS_IN_USE.reset(token)


@dataclasses.dataclass(frozen=True)
class _SkipBlock:
    out_start: int
    mul_out: int
    ir_dim: int
    in_start: int | None  # None: no input irrep reaches this output block (it stays zero)
    mul_in: int


class ElementSkip(torch.nn.Module):
    """``skip_tp(x, node_attrs)`` for one-hot ``node_attrs``, one matmul per irrep block.

    Args:
        skip_tp: the original e3nn or cuEquivariance ``FullyConnectedTensorProduct`` whose
            second input is the one-hot element vector (``n_elements x 0e``).

    Raises:
        ValueError: if the module is not such a product or its weights cannot be read as
            per-element block matrices (checked by reconstruction).
    """

    def __init__(self, skip_tp: torch.nn.Module):
        super().__init__()
        irreps_in, irreps_attrs, irreps_out = (
            o3.Irreps(str(getattr(skip_tp, name)))
            for name in ("irreps_in1", "irreps_in2", "irreps_out"))
        if irreps_attrs.lmax != 0 or len(irreps_attrs) != 1:
            raise ValueError(f"skip_tp's second input must be one-hot scalars, got {irreps_attrs}")
        self.n_elements = irreps_attrs.dim
        self.dim_out = irreps_out.dim
        self.layout, self.blocks, weights = _read_blocks(skip_tp, irreps_in, irreps_out,
                                                         self.n_elements)
        for index, weight in enumerate(weights):
            self.register_buffer(f"weight_{index}", weight)  # (elements, mul_in, mul_out)

    def _side_by_side(self, like: torch.Tensor, elements: tuple[int, ...]):
        """Per block, the elements' (mul_in, mul_out) matrices side by side, and their
        indices; cached per element set, device and dtype."""
        key = (elements, like.device, like.dtype)
        cached = getattr(self, "_cached", None)  # read once: another thread may replace it
        if cached is None or cached[0] != key:
            index = torch.tensor(elements, dtype=torch.int64, device=like.device)
            # Blocks no input irrep reaches (a residual first interaction maps scalars to
            # every hidden irrep) have no weights: forward writes zeros for them.
            weights = [None if block.in_start is None else
                       getattr(self, f"weight_{i}").to(like).index_select(0, index)
                       .permute(1, 0, 2).reshape(block.mul_in, -1)
                       for i, block in enumerate(self.blocks)]
            cached = self._cached = (key, weights, index)
        return cached[1], cached[2]

    def forward(self, x: torch.Tensor, node_attrs: torch.Tensor) -> torch.Tensor:
        elements = _ELEMENTS_IN_USE.get() or tuple(range(self.n_elements))
        weights, element_index = self._side_by_side(x, elements)
        rows = x.shape[0]
        one_hot = node_attrs.index_select(1, element_index)[:, None, :, None]
        pieces = []
        for block, weight in zip(self.blocks, weights):
            if block.in_start is None:
                pieces.append(x.new_zeros(rows, block.mul_out * block.ir_dim))
                continue
            part = block_as_rows(x, self.layout, block.in_start, block.mul_in, block.ir_dim)
            products = (part @ weight).view(rows, block.ir_dim, len(elements),
                                            block.mul_out)
            out = (products * one_hot).sum(dim=2)  # (rows, ir_dim, mul_out)
            pieces.append(rows_as_block(out, self.layout, rows, block.ir_dim, block.mul_out))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)


def _read_blocks(skip_tp, irreps_in: o3.Irreps, irreps_out: o3.Irreps, n_elements: int):
    """Probe each element's linear map and find a layout whose block weights reproduce it."""
    reference = next(skip_tp.parameters())
    eye = torch.eye(irreps_in.dim, dtype=reference.dtype, device=reference.device)
    with torch.no_grad():
        maps = [skip_tp(eye, torch.nn.functional.one_hot(
            torch.full((irreps_in.dim,), element, device=reference.device),
            n_elements).to(reference.dtype)) for element in range(n_elements)]
    problems = []
    for layout in ("ir_mul", "mul_ir"):
        blocks, weights = _blocks_for_layout(maps, irreps_in, irreps_out, layout)
        error = max(float((_rebuild(blocks, weights, layout, irreps_in.dim, irreps_out.dim,
                                    element) - matrix).abs().max()
                          / matrix.abs().max().clamp_min(1e-30))
                    for element, matrix in enumerate(maps))
        tolerance = 1e-10 if reference.dtype == torch.float64 else 1e-5
        if error <= tolerance:
            return layout, blocks, weights
        problems.append(f"{layout}: off by {error:.1e}")
    raise ValueError(f"cannot read {type(skip_tp).__name__}({irreps_in} x "
                     f"{n_elements}x0e -> {irreps_out}) as per-element irrep blocks "
                     f"({'; '.join(problems)})")


def _blocks_for_layout(maps, irreps_in, irreps_out, layout):
    starts_in, offset = {}, 0
    for mul, ir in irreps_in:
        if ir in starts_in:
            raise ValueError(f"input irreps {irreps_in} repeat {ir}; not supported")
        starts_in[ir] = (offset, mul)
        offset += mul * ir.dim
    blocks, weights, out_start = [], [], 0
    for mul_out, ir in irreps_out:
        in_start, mul_in = starts_in.get(ir, (None, 0))
        blocks.append(_SkipBlock(out_start, mul_out, ir.dim, in_start, mul_in))
        if in_start is None:
            weights.append(maps[0].new_zeros(len(maps), 0, mul_out))
        else:
            rows = [_flat_index(layout, in_start, mul_in, ir.dim, u, 0)
                    for u in range(mul_in)]
            columns = [_flat_index(layout, out_start, mul_out, ir.dim, w, 0)
                       for w in range(mul_out)]
            weights.append(torch.stack([matrix[rows][:, columns] for matrix in maps]))
        out_start += mul_out * ir.dim
    return blocks, weights


def _rebuild(blocks, weights, layout, dim_in, dim_out, element):
    matrix = weights[0].new_zeros(dim_in, dim_out)
    for block, weight in zip(blocks, weights):
        if block.in_start is None:
            continue
        for m in range(block.ir_dim):
            rows = [_flat_index(layout, block.in_start, block.mul_in, block.ir_dim, u, m)
                    for u in range(block.mul_in)]
            columns = [_flat_index(layout, block.out_start, block.mul_out, block.ir_dim, w, m)
                       for w in range(block.mul_out)]
            matrix[torch.tensor(rows)[:, None], torch.tensor(columns)[None, :]] = weight[element]
    return matrix


def convert_element_skips(model: torch.nn.Module) -> list[ElementSkip]:
    """Replace every interaction's ``skip_tp`` with an :class:`ElementSkip`, in place.

    Returns the converted modules (already converted ones included). Interactions whose
    skip is not an element-dependent product (a plain Linear, say) are left alone.
    """
    converted = []
    for index, interaction in enumerate(getattr(model, "interactions", ())):
        skip = getattr(interaction, "skip_tp", None)
        if skip is None:
            continue
        if not isinstance(skip, ElementSkip):
            if not all(hasattr(skip, name) for name in ("irreps_in1", "irreps_in2")):
                continue
            try:
                skip = ElementSkip(skip)
            except ValueError as err:  # a product we cannot read: keep it, it is exact
                logger.info("interaction %d keeps its skip_tp: %s", index, err)
                continue
            interaction.skip_tp = skip
        converted.append(skip)
    return converted
