"""Neighbour lists in MACE's convention, computed by vesin on the positions' own device.

MACE (``mace.data.neighborhood.get_neighborhood``) describes a periodic graph by

* ``edge_index`` [2, E] int64: sender ``edge_index[0]``, receiver ``edge_index[1]``;
* ``unit_shifts`` [E, 3]: integer cell multiples, so that the edge vector is
  ``positions[receiver] - positions[sender] + unit_shifts @ cell``.

Both directions of every pair are present, and an atom's bond to itself appears only
through a non-zero periodic shift (small cells). vesin's full list uses exactly this
convention (``r_ij = r_j - r_i + S @ H``), so it is passed through unchanged.

:class:`VerletNeighborList` adds a skin: it builds the list at ``cutoff + skin`` and
keeps it while it provably still contains every pair closer than ``cutoff``. MACE's
radial cutoff multiplies each edge by ``(r < r_max)``, so the extra edges of a skin list
contribute exactly zero energy, force and stress, and the list can be fed to the model
as it is.
"""

from __future__ import annotations

import numpy as np
import torch
from vesin_torch import NeighborList as _VesinNeighborList


def _check_pbc(pbc) -> tuple[bool, bool, bool]:
    pbc_array = np.asarray(pbc)
    if pbc_array.shape == ():
        pbc_array = np.repeat(pbc_array, 3)
    if pbc_array.shape != (3,) or pbc_array.dtype != bool:
        raise ValueError(f"pbc must be a bool or three bools, got {pbc!r}")
    return tuple(bool(p) for p in pbc_array)


def _check_inputs(positions: torch.Tensor, cell: torch.Tensor, pbc, cutoff_A: float):
    if not (np.isfinite(cutoff_A) and cutoff_A > 0):
        raise ValueError(f"cutoff_A must be a positive number, got {cutoff_A}")
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise ValueError(f"positions must have shape (n_atoms, 3), got {tuple(positions.shape)}")
    if tuple(cell.shape) != (3, 3):
        raise ValueError(f"cell must have shape (3, 3), got {tuple(cell.shape)}")
    if cell.device != positions.device:
        raise ValueError(f"positions are on {positions.device} but cell is on {cell.device}")
    pbc = _check_pbc(pbc)
    if not bool(torch.isfinite(positions).all()):
        raise ValueError("positions contain NaN or infinite values")
    if not bool(torch.isfinite(cell).all()):
        raise ValueError("cell contains NaN or infinite values")
    periodic_rows = cell.detach().cpu().double().numpy()[list(pbc)]
    if len(periodic_rows) and np.linalg.matrix_rank(periodic_rows, tol=1e-8) < len(periodic_rows):
        raise ValueError(
            f"the cell vectors of the periodic directions {pbc} are zero or linearly "
            f"dependent (cell =\n{cell.detach().cpu().numpy()})")
    return pbc


class _VesinFullList:
    """A reusable vesin calculator (it keeps its buffers, on CPU or CUDA, between calls)."""

    def __init__(self, cutoff_A: float):
        self.cutoff_A = float(cutoff_A)
        self._by_device_type: dict[str, _VesinNeighborList] = {}

    def _vesin(self, device: torch.device) -> _VesinNeighborList:
        if device.type not in self._by_device_type:
            # On CPU, edges sorted by sender (as matscipy gives mace) make runs reproducible
            # for free. On CUDA the order is nondeterministic anyway (atomics, in vesin and
            # in the model's scatter-adds), and vesin's bitonic sort would cost ~200 kernel
            # passes over the list at every rebuild.
            self._by_device_type[device.type] = _VesinNeighborList(
                cutoff=self.cutoff_A, full_list=True, sorted=device.type == "cpu")
        return self._by_device_type[device.type]

    def compute(self, positions: torch.Tensor, cell: torch.Tensor, pbc: tuple[bool, bool, bool],
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        periodic = torch.tensor(pbc, dtype=torch.bool, device=positions.device)
        box = cell.to(torch.float64) if any(pbc) else torch.zeros(
            3, 3, dtype=torch.float64, device=positions.device)
        sender, receiver, unit_shifts = self._vesin(positions.device).compute(
            points=positions.detach().to(torch.float64).contiguous(), box=box.contiguous(),
            periodic=periodic, quantities="ijS")
        edge_index = torch.stack((sender, receiver)).to(torch.int64)
        return edge_index, unit_shifts.to(dtype)


def neighbor_list(positions: torch.Tensor, cell: torch.Tensor, pbc, cutoff_A: float, *,
                  dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All pairs closer than ``cutoff_A``, in MACE's convention (see the module docstring).

    Args:
        positions: (n_atoms, 3) Å, on any device vesin supports (CPU, CUDA); they need not
            be wrapped into the cell.
        cell: (3, 3) Å, lattice vectors as rows, on the same device. Ignored in
            non-periodic directions (it may be all zeros for an open system).
        pbc: a bool or three bools (per lattice vector); mixed periodicity is supported.
        cutoff_A: pair cutoff in Å; any size, including more than half the cell.
        dtype: float dtype of ``unit_shifts``; defaults to ``positions.dtype``.

    Returns:
        ``(edge_index, unit_shifts)``: [2, E] int64 and [E, 3] ``dtype``, on the positions'
        device; sorted by sender on CPU, in no particular order on CUDA.
    """
    positions, cell = torch.as_tensor(positions), torch.as_tensor(cell)
    pbc = _check_inputs(positions, cell, pbc, cutoff_A)
    return _VesinFullList(cutoff_A).compute(positions, cell, pbc, dtype or positions.dtype)


class VerletNeighborList:
    """A neighbour list with a skin, rebuilt only when it may have become incomplete.

    The list holds every pair closer than ``cutoff_A + skin_A`` at the last build. With
    positions ``r`` and cell ``H`` then and ``r'``, ``H'`` now, write ``F = H⁻¹ H'`` (the
    cell deformation) and ``δ_i = |r'_i − r_i F|`` (each atom's displacement apart from
    the affine one). A pair vector becomes ``d' = d F + (r'_j − r_j F) − (r'_i − r_i F)``,
    so ``|d'| ≥ |d| (1 − ‖F − I‖_F) − 2 max δ``. A pair missing from the list had
    ``|d| ≥ cutoff + skin``; it still cannot be inside ``cutoff`` while

        2 max_i δ_i + (cutoff + skin) ‖F − I‖_F ≤ skin,

    and the list is rebuilt as soon as this fails. With a fixed cell (NVT, NVE) ``F = I``
    exactly and this is the usual rule: rebuild once an atom has moved more than
    ``skin/2``. Under a barostat small cell changes use up part of the skin instead of
    forcing a rebuild. Open systems ignore the cell. With mixed periodicity any change of
    a periodic cell vector triggers a rebuild.

    Displacements are measured on the positions as given, never wrapped: an atom that
    crosses the cell boundary keeps its list (its shifts already account for it), and
    nothing jumps by a cell vector. The decision is taken in float64 on the host: callers
    that hold the positions there anyway (an ASE calculator) pass them along and a step
    without rebuild launches nothing on the device. ``skin_A = 0`` rebuilds whenever any
    position or the cell changed at all.
    """

    def __init__(self, cutoff_A: float, skin_A: float = 0.0):
        if not (np.isfinite(skin_A) and skin_A >= 0):
            raise ValueError(f"skin_A must be a non-negative number, got {skin_A}")
        if not (np.isfinite(cutoff_A) and cutoff_A > 0):
            raise ValueError(f"cutoff_A must be a positive number, got {cutoff_A}")
        self.cutoff_A = float(cutoff_A)
        self.skin_A = float(skin_A)
        self._vesin = _VesinFullList(self.cutoff_A + self.skin_A)
        self.n_builds = 0
        self.edge_index: torch.Tensor | None = None
        self.unit_shifts: torch.Tensor | None = None
        self._pbc: tuple[bool, bool, bool] | None = None
        self._device: torch.device | None = None
        self._reference_positions: np.ndarray | None = None
        self._reference_cell: np.ndarray | None = None
        self._reference_cell_inverse: np.ndarray | None = None

    @property
    def n_edges(self) -> int:
        """Number of edges in the current list (0 before the first build)."""
        return 0 if self.edge_index is None else int(self.edge_index.shape[1])

    def update(self, positions: torch.Tensor, cell: torch.Tensor, pbc, *,
               host_positions: np.ndarray | None = None,
               host_cell: np.ndarray | None = None) -> bool:
        """Rebuild the list if it may miss a pair inside the cutoff; return whether it did.

        ``positions`` (n_atoms, 3) and ``cell`` (3, 3) are in Å on one device; the list
        (``edge_index``, ``unit_shifts`` in ``positions.dtype``) lives there too.
        ``host_positions`` and ``host_cell``, if given, are the same values as float64
        NumPy arrays; otherwise they are copied from the device.
        """
        pbc = _check_pbc(pbc)
        if host_positions is None or host_cell is None:
            host_positions, host_cell = (tensor.detach().cpu().double().numpy()
                                         for tensor in (positions, cell))
        if not self._needs_rebuild(host_positions, host_cell, pbc, positions.device):
            return False
        pbc = _check_inputs(positions, cell, pbc, self.cutoff_A)
        self.edge_index, self.unit_shifts = self._vesin.compute(
            positions, cell, pbc, positions.dtype)
        self._pbc, self._device = pbc, positions.device
        self._reference_positions = np.array(host_positions, dtype=np.float64)
        self._reference_cell = np.array(host_cell, dtype=np.float64)
        if all(pbc):
            self._reference_cell_inverse = np.linalg.inv(self._reference_cell)
        self.n_builds += 1
        return True

    def invalidate(self) -> None:
        """Make the next :meth:`update` rebuild, whatever the positions."""
        self._reference_positions = None

    def _needs_rebuild(self, positions: np.ndarray, cell: np.ndarray,
                       pbc: tuple[bool, bool, bool], device: torch.device) -> bool:
        reference = self._reference_positions
        if (reference is None or pbc != self._pbc or reference.shape != positions.shape
                or device != self._device):
            return True
        if all(pbc) and not np.array_equal(cell, self._reference_cell):
            deformation = self._reference_cell_inverse @ cell
            displacement = positions - reference @ deformation
            strain = np.linalg.norm(deformation - np.eye(3))
        else:
            # An unchanged cell gives F = I exactly, so NVT/NVE follow the plain skin/2
            # rule without rounding noise from H⁻¹H.
            displacement, strain = positions - reference, 0.0
            if any(pbc) and not all(pbc):
                periodic = np.asarray(pbc)
                if (cell[periodic] != self._reference_cell[periodic]).any():
                    return True
        largest = np.sqrt(np.einsum("ij,ij->i", displacement, displacement).max())
        budget_used = 2 * largest + (self.cutoff_A + self.skin_A) * strain
        return not budget_used <= self.skin_A  # NaN positions rebuild (and are refused)


class ReplicaNeighborLists:
    """One :class:`VerletNeighborList` per replica of a batch, read as one list.

    Replica ``r``'s atoms are nodes ``r * n_atoms ... (r + 1) * n_atoms - 1`` of the batch;
    :attr:`edge_index` holds every replica's edges with those node offsets,
    :attr:`edge_graph` the replica of each edge. Each replica keeps its own skin
    bookkeeping, so one replica's rebuild leaves the others' lists as they are; the
    concatenation is redone after any rebuild (on the device, a few copies).
    """

    def __init__(self, cutoff_A: float, skin_A: float = 0.0):
        self.cutoff_A, self.skin_A = float(cutoff_A), float(skin_A)
        self.replicas = [VerletNeighborList(cutoff_A, skin_A)]
        self.edge_index: torch.Tensor | None = None
        self.unit_shifts: torch.Tensor | None = None
        self.edge_graph: torch.Tensor | None = None

    @property
    def n_builds(self) -> int:
        """Builds over all replicas."""
        return sum(replica.n_builds for replica in self.replicas)

    @property
    def n_edges(self) -> int:
        """Edges in the current lists of all replicas (0 before the first build)."""
        return sum(replica.n_edges for replica in self.replicas)

    def update(self, positions: torch.Tensor, cells: torch.Tensor, pbc, *,
               host_positions: np.ndarray, host_cells: np.ndarray) -> bool:
        """Rebuild the replicas' lists that may miss a pair; return whether any did.

        ``positions`` (n_replicas, n_atoms, 3) and ``cells`` (n_replicas, 3, 3), Å, on the
        device; ``host_positions`` and ``host_cells`` the same as float64 NumPy arrays.
        """
        n_replicas, n_atoms = positions.shape[:2]
        if len(self.replicas) != n_replicas:
            self.replicas = [VerletNeighborList(self.cutoff_A, self.skin_A)
                             for _ in range(n_replicas)]
        rebuilt = [replica.update(positions[index], cells[index], pbc,
                                  host_positions=host_positions[index],
                                  host_cell=host_cells[index])
                   for index, replica in enumerate(self.replicas)]
        if not any(rebuilt):
            return False
        if n_replicas == 1:
            replica = self.replicas[0]
            self.edge_index, self.unit_shifts = replica.edge_index, replica.unit_shifts
        else:
            self.edge_index = torch.cat([replica.edge_index + index * n_atoms
                                         for index, replica in enumerate(self.replicas)], dim=1)
            self.unit_shifts = torch.cat([replica.unit_shifts for replica in self.replicas])
        self.edge_graph = torch.cat([
            torch.full((replica.n_edges,), index, dtype=torch.int64, device=positions.device)
            for index, replica in enumerate(self.replicas)])
        return True

    def invalidate(self) -> None:
        """Make the next :meth:`update` rebuild every replica's list."""
        for replica in self.replicas:
            replica.invalidate()
