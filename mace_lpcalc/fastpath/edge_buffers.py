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

A batch of replicas (same atoms, each with its own positions and cell) is one list: every
edge carries its graph (replica) index, through which it finds its cell; padding edges
belong to the padding graph, numbered after the replicas.
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
        n_atoms: real atoms of all replicas together; the padding nodes follow them.
        n_graphs: replicas (graphs of real atoms); the padding graph is number ``n_graphs``.
        r_max: the model's cutoff radius in Å.
        dtype: the model's float dtype (of the unit shifts it reads).
        device: where the buffers live.
        headroom: edge capacity as a multiple of the in-cutoff count that first needs it.
        regrowth_headroom: the same once that count has outgrown a capacity.
        min_capacity: the smallest edge capacity.
        capacity_ladder: capacities only on a geometric ladder of this ratio (e.g. 1.05):
            compiled code is specialised to its capacity, and a ladder makes a later run
            of the same system land on capacities its on-disk cache holds. None: any
            multiple of 64.
    """

    def __init__(self, *, n_atoms: int, r_max: float, dtype: torch.dtype, device: torch.device,
                 headroom: float, regrowth_headroom: float, min_capacity: int,
                 n_graphs: int = 1, capacity_ladder: float | None = None):
        self.n_atoms = n_atoms
        self.n_graphs = n_graphs
        self.r_max = r_max
        self.dtype = dtype
        self.device = device
        self.headroom = headroom
        self.regrowth_headroom = regrowth_headroom
        self.min_capacity = min_capacity
        self.capacity_ladder = capacity_ladder
        #: Model edge slots (in-cutoff edges plus padding); 0 until the first allocation.
        self.capacity = 0
        self.candidate_capacity = 0

    def load_candidates(self, edge_index: torch.Tensor, unit_shifts: torch.Tensor,
                        edge_graph: torch.Tensor, positions: torch.Tensor,
                        cells: torch.Tensor) -> bool:
        """Copy a freshly built Verlet list (each edge's graph in ``edge_graph``) into the
        candidate buffers; ``cells`` is (n_graphs, 3, 3). Return whether any buffer was
        allocated again."""
        n_candidates = edge_index.shape[1]
        reallocated = n_candidates > self.candidate_capacity or not self.candidate_capacity
        if reallocated:
            self._allocate_candidates(n_candidates)
        with torch.no_grad():
            self._candidate_edge_index[:, :n_candidates] = edge_index
            self._candidate_edge_index[:, n_candidates:] = 0
            self._candidate_unit_shifts[:n_candidates] = unit_shifts
            self._candidate_graph[:n_candidates] = edge_graph
            self._candidate_graph[n_candidates:] = 0
            self._is_candidate[:n_candidates] = True
            self._is_candidate[n_candidates:] = False
        # Size the model's edge buffers now (a rebuild synchronises anyway), so that the
        # post-call overflow check is needed only when edges enter the cutoff later.
        n_inside = int(self._inside_cutoff(positions, cells).sum())
        if n_inside > self.capacity or not self.capacity:
            self.grow(n_inside)
            reallocated = True
        return reallocated

    def grow(self, n_edges: int) -> None:
        """Model edge buffers for ``n_edges`` in-cutoff edges plus headroom (and a dump slot)."""
        headroom = self.regrowth_headroom if self.capacity else self.headroom
        capacity = _round_up(max(n_edges * headroom, self.min_capacity))
        if self.capacity_ladder is not None:
            capacity = ladder_rung(capacity, self.capacity_ladder)
        device = self.device
        self.edge_index = torch.empty((2, capacity), dtype=torch.int64, device=device)
        self.unit_shifts = torch.empty((capacity, 3), dtype=self.dtype, device=device)
        # Selection scratch: one extra slot at the end receives every unselected candidate.
        padding_node = self.n_atoms + torch.arange(capacity + 1, device=device) % PADDING_NODES
        self._padding_edge_index = padding_node.expand(2, capacity + 1).contiguous()
        self._padding_unit_shifts = torch.tensor(
            [1.0, 0.0, 0.0], dtype=self.dtype, device=device).expand(capacity + 1, 3).contiguous()
        self._padding_graph = torch.full((capacity + 1,), self.n_graphs, dtype=torch.int64,
                                         device=device)
        self.edge_graph = torch.empty((capacity,), dtype=torch.int64, device=device)
        self._selected_edge_index = torch.empty_like(self._padding_edge_index)
        self._selected_unit_shifts = torch.empty_like(self._padding_unit_shifts)
        self._selected_graph = torch.empty_like(self._padding_graph)
        if self.capacity:
            logger.info("in-cutoff edge count %d outgrew the capacity %d; re-padding to %d",
                        n_edges, self.capacity, capacity)
        self.capacity = capacity

    def select(self, positions: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """Compact the in-cutoff candidates into ``edge_index``, ``unit_shifts`` and
        ``edge_graph``; fixed shapes only.

        Returns the (0-d) number of in-cutoff edges. Candidates beyond the capacity are
        dropped into the dump slot; the caller sees the count and repeats the call.
        """
        inside = self._inside_cutoff(positions, cells)
        slots = torch.cumsum(inside, dim=0)
        capacity = self.capacity
        targets = torch.where(inside, slots - 1, capacity).clamp_(max=capacity)
        self._selected_edge_index.copy_(self._padding_edge_index)
        self._selected_edge_index.index_copy_(1, targets, self._candidate_edge_index)
        self._selected_unit_shifts.copy_(self._padding_unit_shifts)
        self._selected_unit_shifts.index_copy_(0, targets,
                                               self._candidate_unit_shifts.to(self.dtype))
        self._selected_graph.copy_(self._padding_graph)
        self._selected_graph.index_copy_(0, targets, self._candidate_graph)
        self.edge_index.copy_(self._selected_edge_index[:, :capacity])
        self.unit_shifts.copy_(self._selected_unit_shifts[:capacity])
        self.edge_graph.copy_(self._selected_graph[:capacity])
        return slots[-1]

    def _allocate_candidates(self, n_candidates: int) -> None:
        capacity = _round_up(n_candidates * _CANDIDATE_HEADROOM)
        device = self.device
        self._candidate_edge_index = torch.zeros((2, capacity), dtype=torch.int64, device=device)
        self._candidate_unit_shifts = torch.zeros((capacity, 3), dtype=torch.float64,
                                                  device=device)
        self._is_candidate = torch.zeros(capacity, dtype=torch.bool, device=device)
        self._candidate_graph = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.candidate_capacity = capacity

    def _inside_cutoff(self, positions: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """Which candidates are shorter than ``r_max`` now (float64 geometry)."""
        sender, receiver = self._candidate_edge_index
        vectors = (positions.index_select(0, receiver) - positions.index_select(0, sender)
                   + shifts_in_cells(self._candidate_unit_shifts, cells, self._candidate_graph))
        return self._is_candidate & ((vectors * vectors).sum(dim=1) < self.r_max ** 2)


def shifts_in_cells(unit_shifts: torch.Tensor, cells: torch.Tensor,
                    edge_graph: torch.Tensor) -> torch.Tensor:
    """Cartesian shifts (E, 3) of integer ``unit_shifts`` (E, 3), each edge in the cell
    (of ``cells``, (G, 3, 3)) of its graph. One graph needs no gather."""
    if cells.shape[0] == 1:
        return unit_shifts @ cells[0]
    return torch.bmm(unit_shifts.unsqueeze(1), cells.index_select(0, edge_graph)).squeeze(1)


def ladder_rung(count: int, ratio: float) -> int:
    """The smallest capacity of the ladder ``_round_up(64 ratio^k)`` that holds ``count``."""
    # From just below the rung the logarithm names: rounding up to multiples of 64 can
    # make a lower rung large enough.
    rung = max(0, math.floor(math.log(max(count, 1) / _EDGE_CAPACITY_MULTIPLE, ratio)) - 2)
    while _round_up(_EDGE_CAPACITY_MULTIPLE * ratio ** rung) < count:
        rung += 1
    return _round_up(_EDGE_CAPACITY_MULTIPLE * ratio ** rung)


def _round_up(count: float) -> int:
    return _EDGE_CAPACITY_MULTIPLE * max(1, math.ceil(count / _EDGE_CAPACITY_MULTIPLE))
