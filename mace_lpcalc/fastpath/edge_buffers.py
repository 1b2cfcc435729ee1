"""The fixed-capacity edge buffers of :class:`mace_lpcalc.fastpath.engine.MACEEngine`.

When the Verlet list (built at ``r_max + skin``) is rebuilt, it is copied into candidate
buffers. At every call the candidates shorter than ``r_max`` are then compacted into the
model's edge buffers with fixed shapes only, so that a captured CUDA graph can run the
selection too. The slots past the in-cutoff count hold padding edges: self-loops on the
padding nodes, which the engine places in a graph of their own whose large cell makes
them longer than ``r_max``. Padding edges cost as much model time as real ones, so the
edge capacity has only a little headroom over the count inside the cutoff; when that count
outgrows it (seen from the count the selection returns) the buffers are allocated again,
larger. An allocation replaces tensors that a captured CUDA graph holds: the caller drops
its graphs after :meth:`EdgeBuffers.grow` and whenever
:meth:`EdgeBuffers.load_candidates` says it allocated.
"""

from __future__ import annotations

import logging
import math

import torch

logger = logging.getLogger(__name__)

#: Edge capacities are rounded up to a multiple of this.
_EDGE_CAPACITY_MULTIPLE = 64
#: Verlet-list buffers are sized with this headroom over the list that needs them (they
#: are refilled outside the graph, so outgrowing them costs only a re-capture).
_CANDIDATE_HEADROOM = 1.1
#: Padding edges are spread over this many padding nodes so that the scatter-adds into
#: them do not all contend for one memory address.
PADDING_NODES = 8


class EdgeBuffers:
    """Verlet-list candidates and the model's edges, for one system size.

    Args:
        n_atoms: real atoms; the padding nodes follow them.
        r_max: the model's cutoff radius in Å.
        dtype: the model's float dtype (of the unit shifts it reads).
        device: where the buffers live.
        headroom: edge capacity as a multiple of the in-cutoff count that first needs it.
        regrowth_headroom: the same once that count has outgrown a capacity.
        min_capacity: the smallest edge capacity.
    """

    def __init__(self, *, n_atoms: int, r_max: float, dtype: torch.dtype, device: torch.device,
                 headroom: float, regrowth_headroom: float, min_capacity: int):
        self.n_atoms = n_atoms
        self.r_max = r_max
        self.dtype = dtype
        self.device = device
        self.headroom = headroom
        self.regrowth_headroom = regrowth_headroom
        self.min_capacity = min_capacity
        #: Model edge slots (in-cutoff edges plus padding); 0 until the first allocation.
        self.capacity = 0
        self.candidate_capacity = 0

    def load_candidates(self, edge_index: torch.Tensor, unit_shifts: torch.Tensor,
                        positions: torch.Tensor, cell: torch.Tensor) -> bool:
        """Copy a freshly built Verlet list into the candidate buffers; return whether any
        buffer was allocated again."""
        n_candidates = edge_index.shape[1]
        reallocated = n_candidates > self.candidate_capacity or not self.candidate_capacity
        if reallocated:
            self._allocate_candidates(n_candidates)
        with torch.no_grad():
            self._candidate_edge_index[:, :n_candidates] = edge_index
            self._candidate_edge_index[:, n_candidates:] = 0
            self._candidate_unit_shifts[:n_candidates] = unit_shifts
            self._is_candidate[:n_candidates] = True
            self._is_candidate[n_candidates:] = False
        # Size the model's edge buffers now (a rebuild synchronises anyway), so that the
        # post-call overflow check is needed only when edges enter the cutoff later.
        n_inside = int(self._inside_cutoff(positions, cell).sum())
        if n_inside > self.capacity or not self.capacity:
            self.grow(n_inside)
            reallocated = True
        return reallocated

    def grow(self, n_edges: int) -> None:
        """Model edge buffers for ``n_edges`` in-cutoff edges plus headroom (and a dump slot)."""
        headroom = self.regrowth_headroom if self.capacity else self.headroom
        capacity = _round_up(max(n_edges * headroom, self.min_capacity))
        device = self.device
        self.edge_index = torch.empty((2, capacity), dtype=torch.int64, device=device)
        self.unit_shifts = torch.empty((capacity, 3), dtype=self.dtype, device=device)
        # Selection scratch: one extra slot at the end receives every unselected candidate.
        padding_node = self.n_atoms + torch.arange(capacity + 1, device=device) % PADDING_NODES
        self._padding_edge_index = padding_node.expand(2, capacity + 1).contiguous()
        self._padding_unit_shifts = torch.tensor(
            [1.0, 0.0, 0.0], dtype=self.dtype, device=device).expand(capacity + 1, 3).contiguous()
        self._selected_edge_index = torch.empty_like(self._padding_edge_index)
        self._selected_unit_shifts = torch.empty_like(self._padding_unit_shifts)
        self.slots = torch.arange(capacity, device=device)
        if self.capacity:
            logger.info("in-cutoff edge count %d outgrew the capacity %d; re-padding to %d",
                        n_edges, self.capacity, capacity)
        self.capacity = capacity

    def select(self, positions: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """Compact the in-cutoff candidates into ``edge_index`` and ``unit_shifts``; fixed
        shapes only.

        Returns the (0-d) number of in-cutoff edges. Candidates beyond the capacity are
        dropped into the dump slot; the caller sees the count and repeats the call.
        """
        inside = self._inside_cutoff(positions, cell)
        slots = torch.cumsum(inside, dim=0)
        capacity = self.capacity
        targets = torch.where(inside, slots - 1, capacity).clamp_(max=capacity)
        self._selected_edge_index.copy_(self._padding_edge_index)
        self._selected_edge_index.index_copy_(1, targets, self._candidate_edge_index)
        self._selected_unit_shifts.copy_(self._padding_unit_shifts)
        self._selected_unit_shifts.index_copy_(0, targets,
                                               self._candidate_unit_shifts.to(self.dtype))
        self.edge_index.copy_(self._selected_edge_index[:, :capacity])
        self.unit_shifts.copy_(self._selected_unit_shifts[:capacity])
        return slots[-1]

    def _allocate_candidates(self, n_candidates: int) -> None:
        capacity = _round_up(n_candidates * _CANDIDATE_HEADROOM)
        device = self.device
        self._candidate_edge_index = torch.zeros((2, capacity), dtype=torch.int64, device=device)
        self._candidate_unit_shifts = torch.zeros((capacity, 3), dtype=torch.float64,
                                                  device=device)
        self._is_candidate = torch.zeros(capacity, dtype=torch.bool, device=device)
        self.candidate_capacity = capacity

    def _inside_cutoff(self, positions: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """Which candidates are shorter than ``r_max`` now (float64 geometry)."""
        sender, receiver = self._candidate_edge_index
        vectors = (positions.index_select(0, receiver) - positions.index_select(0, sender)
                   + self._candidate_unit_shifts @ cell)
        return self._is_candidate & ((vectors * vectors).sum(dim=1) < self.r_max ** 2)


def _round_up(count: float) -> int:
    return _EDGE_CAPACITY_MULTIPLE * max(1, math.ceil(count / _EDGE_CAPACITY_MULTIPLE))
