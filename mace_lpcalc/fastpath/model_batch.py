"""The model's side of :class:`mace_lpcalc.fastpath.engine.MACEEngine`: the padded batch, the
call, the packed outputs.

The model is called exactly as mace's calculator calls it,
``model(batch, compute_stress=..., training=False)`` (:func:`eager_model_call`), on a
batch dictionary of persistent tensors (:class:`PaddedBatch`). What it returns depends on
mace's calculator ``model_type`` (:data:`MODEL_OUTPUTS`); graph 0's outputs are packed
into one flat buffer, laid out by :func:`output_layout`, for a single device-to-host copy.
A batch of replicas puts graphs ``0 ... n_graphs - 1`` before the padding graph.
The model's head and float dtype are read off it as mace's calculator reads them.
"""

from __future__ import annotations

import numpy as np
import torch

from mace_lpcalc.fastpath.compiled import DEVICE_WORK_LOCK
from mace_lpcalc.fastpath.edge_buffers import PADDING_NODES, EdgeBuffers, shifts_in_cells
from mace_lpcalc.fastpath.edge_geometry import index_select_gathers

#: Outputs per mace calculator ``model_type``, each with its shape (``n``: atoms; the
#: graph-level outputs have one such value per graph).
MODEL_OUTPUTS = {
    "MACE": (("energy", (1,)), ("forces", ("n", 3)), ("node_energy", ("n",)),
             ("stress", (3, 3))),
    "EnergyDipoleMACE": (("energy", (1,)), ("forces", ("n", 3)), ("node_energy", ("n",)),
                         ("stress", (3, 3)), ("dipole", (3,))),
    "DipoleMACE": (("dipole", (3,)),),
}
_ATOMIC_STRESS_OUTPUTS = (("atomic_stresses", ("n", 3, 3)), ("atomic_virials", ("n", 3, 3)))
_NUMPY_DTYPES = {torch.float64: np.float64, torch.float32: np.float32}
#: Outputs with one value per graph (the others have one per node).
GRAPH_OUTPUTS = frozenset({"energy", "stress", "dipole"})


class PaddedBatch:
    """The model's input tensors for one system size, and the packed output buffer.

    Graphs ``0 ... n_graphs - 1`` hold ``n_atoms`` real atoms each (replica ``r`` nodes
    ``r n_atoms ... (r + 1) n_atoms - 1``), graph ``n_graphs`` the padding nodes (element
    0) that the padding edges loop on; its cell makes every such self-loop ``2 r_max`` long.
    Every tensor is allocated here once and then written in place, so that captured CUDA
    graphs, which read and write them, stay valid.
    """

    def __init__(self, n_atoms: int, *, n_elements: int, r_max: float, head_index: int,
                 dtype: torch.dtype, device: torch.device, model_type: str,
                 atomic_stresses: bool, n_graphs: int = 1):
        n_real = n_graphs * n_atoms
        n_nodes = n_real + PADDING_NODES
        self.n_atoms, self.n_graphs, self.n_real = n_atoms, n_graphs, n_real
        self.node_attrs = torch.zeros((n_nodes, n_elements), dtype=dtype, device=device)
        self.node_attrs[n_real:, 0] = 1  # padding nodes: any element will do
        self.positions = torch.zeros((n_nodes, 3), dtype=dtype, device=device)
        # The padding graph's cell makes every padding self-loop 2*r_max long: beyond the
        # cutoff.
        self.cells = torch.zeros((n_graphs + 1, 3, 3), dtype=dtype, device=device)
        self.cells[n_graphs] = 2 * r_max * torch.eye(3, dtype=dtype, device=device)
        self.batch = torch.cat((
            torch.arange(n_graphs, device=device).repeat_interleave(n_atoms),
            torch.full((PADDING_NODES,), n_graphs, dtype=torch.int64, device=device)))
        self.ptr = torch.tensor([*range(0, n_real + 1, n_atoms), n_nodes], dtype=torch.int64,
                                device=device)
        self.head = torch.full((n_graphs + 1,), head_index, dtype=torch.int64, device=device)
        self.charges = torch.zeros(n_nodes, dtype=dtype, device=device)
        # Every output, then the in-cutoff edge count: packed for one copy out.
        self.layout = output_layout(model_type, n_atoms, atomic_stresses, n_graphs)
        size = sum(np.prod(shape, dtype=int) for _, shape in self.layout.values())
        self.out = torch.zeros(size + 1, dtype=torch.float64, device=device)
        self.host_out = (torch.empty_like(self.out, device="cpu").pin_memory()
                         if device.type == "cuda" else self.out)
        self._output_dtypes: dict[str, type] = {}

    def inputs(self, positions: torch.Tensor, cells: torch.Tensor, edges: EdgeBuffers) -> dict:
        """The batch dictionary, with the real graphs' positions (n_graphs n_atoms, 3) and
        cells (n_graphs, 3, 3) set to the given ones."""
        with torch.no_grad():
            self.positions[:self.n_real] = positions
            self.cells[:self.n_graphs] = cells
            shifts = shifts_in_cells(edges.unit_shifts, self.cells, edges.edge_graph)
        return {
            "positions": self.positions,
            "node_attrs": self.node_attrs,
            "edge_index": edges.edge_index,
            "shifts": shifts,
            "unit_shifts": edges.unit_shifts,
            "cell": self.cells.view(-1, 3),
            "batch": self.batch,
            "ptr": self.ptr,
            "head": self.head,
            "charges": self.charges,
        }

    def pack(self, output: dict, compute_stress: bool, n_edges: torch.Tensor) -> None:
        """Write the real graphs' outputs, then the in-cutoff edge count, into ``out``."""
        with torch.no_grad():
            for name, (where, _) in self.layout.items():
                if name == "stress" and not compute_stress:
                    continue
                # Graph-level outputs: the real graphs; per-atom outputs: the real atoms.
                value = output[name][:self.n_graphs if name in GRAPH_OUTPUTS else self.n_real]
                self.out[where] = value.reshape(-1)
                self._output_dtypes[name] = _NUMPY_DTYPES[value.dtype]
            self.out[-1] = n_edges

    def unpack(self, out: np.ndarray, compute_stress: bool) -> dict:
        """The outputs in a host copy of ``out``, shaped (graph-level ones with a leading
        axis of graphs, per-atom ones with all real atoms), in the dtypes the model returned
        them in (mace's calculator passes those on)."""
        return {name: out[where].reshape(shape).astype(self._output_dtypes[name])
                for name, (where, shape) in self.layout.items()
                if name != "stress" or compute_stress}


def replica_arrays(positions, numbers, cells) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions (n_replicas, n_atoms, 3), numbers (n_atoms,) and cells (n_replicas, 3, 3)
    as float64 / integer arrays, or a ValueError naming the wrong shape."""
    positions = np.asarray(positions, dtype=np.float64)
    numbers = np.asarray(numbers)
    cells = np.asarray(cells, dtype=np.float64)
    if positions.ndim != 3 or positions.shape[2] != 3 or 0 in positions.shape:
        raise ValueError(f"positions must have shape (n_replicas >= 1, n_atoms >= 1, 3), "
                         f"got {positions.shape}")
    n_replicas, n_atoms = positions.shape[:2]
    if numbers.shape != (n_atoms,):
        raise ValueError(f"numbers must have shape ({n_atoms},), got {numbers.shape}")
    if cells.shape != (n_replicas, 3, 3):
        raise ValueError(f"cells must have shape ({n_replicas}, 3, 3), got {cells.shape}")
    return positions, numbers, cells


def check_model_type(model_type: str, atomic_stresses: bool, compiled: bool) -> None:
    """Refuse outputs the engine does not read (or does not compile)."""
    if model_type not in MODEL_OUTPUTS:
        raise ValueError(f"model_type {model_type!r} is not evaluated by MACEEngine; "
                         f"it evaluates {', '.join(MODEL_OUTPUTS)}")
    if atomic_stresses and model_type != "MACE":
        raise ValueError("atomic stresses are computed for energy models (model_type "
                         f"'MACE') only, not {model_type!r}")
    if compiled and (model_type != "MACE" or atomic_stresses):
        raise ValueError("compile_model compiles energy, forces and stress of energy "
                         "models; it does not compile dipoles or atomic stresses")


def eager_model_call(model: torch.nn.Module, batch: dict, compute_stress: bool,
                     atomic_stresses: bool = False) -> dict:
    # Fresh leaves sharing the buffers' memory: the models set requires_grad on them.
    batch = dict(batch, positions=batch["positions"].detach(),
                 node_attrs=batch["node_attrs"].detach())
    extra = (dict(compute_edge_forces=True, compute_atomic_stresses=True) if atomic_stresses
             else {})
    with DEVICE_WORK_LOCK, torch.enable_grad(), index_select_gathers():
        return model(batch, compute_stress=compute_stress, training=False, **extra)


def output_layout(model_type: str, n_atoms: int, atomic_stresses: bool,
                  n_graphs: int = 1) -> dict:
    """Where each output lies in the packed output buffer: name -> (slice, shape)."""
    fields = MODEL_OUTPUTS[model_type] + (_ATOMIC_STRESS_OUTPUTS if atomic_stresses else ())
    layout, offset = {}, 0
    for name, shape in fields:
        if name in GRAPH_OUTPUTS:
            shape = (n_graphs, *shape) if shape != (1,) else (n_graphs,)
        shape = tuple(n_graphs * n_atoms if size == "n" else size for size in shape)
        size = int(np.prod(shape))
        layout[name] = (slice(offset, offset + size), shape)
        offset += size
    return layout


def float_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def cast_floats(batch: dict, dtype: torch.dtype) -> dict:
    return {key: value.to(dtype) if value.is_floating_point() else value
            for key, value in batch.items()}


def head_index(model: torch.nn.Module, head: str | None) -> int:
    """The head mace's calculator would use: the given one, the only one, or 'default'."""
    heads = list(getattr(model, "heads", None) or ["Default"])
    if head is None:
        if len(heads) == 1:
            return 0
        defaults = [index for index, name in enumerate(heads) if name.lower() == "default"]
        if not defaults:
            raise ValueError(f"the model has several heads {heads} and none is 'default'; "
                             "pass head=...")
        return defaults[0]
    if head not in heads:
        raise ValueError(f"head {head!r} is not among the model's heads {heads}")
    return heads.index(head)
