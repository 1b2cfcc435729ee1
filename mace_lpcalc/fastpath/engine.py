"""Fast MACE evaluation: persistent device state, a Verlet neighbour list, CUDA graphs.

mace's own calculator rebuilds everything on every call: a CPU neighbour list, an
``AtomicData`` and a ``torch_geometric`` batch, host-to-device copies of each field,
then thousands of small kernel launches. :class:`MACEEngine` keeps the model inputs on
the device between calls and per step only

1. copies the new positions and cell in (one host-to-device copy),
2. decides on the host, from the positions it already has, whether the Verlet list
   (built at ``r_max + skin``) is still valid, rebuilding it with vesin on the device
   when not,
3. replays a captured CUDA graph that first selects, from the Verlet list, the edges
   shorter than ``r_max`` into fixed-capacity edge buffers, then evaluates energy +
   forces (+ stress) — or runs the same code eagerly on CPU, or where capture is
   impossible,
4. copies the results out (one device-to-host copy).

The selection makes the skin free for the model: it always sees exactly the edges
inside the cutoff, while vesin runs only every few steps instead of at every step.

The model's element-dependent skip connections are evaluated for the elements present
only (:mod:`mace_lpcalc.fastpath.element_skip`), which MACEEngine converts them to in place.

With ``compile_model`` the model call is traced and fused by TorchInductor
(:mod:`mace_lpcalc.fastpath.compiled`) in the background while the CUDA graph of the eager
call keeps MD going; once it is ready and checked, the graph is captured around it.

Large systems evaluate their convolutions in chunks of edges, recomputing each chunk's
weights in the backward pass (:mod:`mace_lpcalc.fastpath.edge_chunks`); such calls run
uncompiled, since compiling would need about the memory that chunking saves.

The model is called exactly as mace's calculator calls it, on a batch dictionary built
from persistent tensors (:mod:`mace_lpcalc.fastpath.model_batch`): the system's graph (or
one graph per replica, :meth:`MACEEngine.compute_replicas`), then a graph of a few padding
nodes with self-loop padding edges, whose periodic shift in that graph's large cell makes
them longer than ``r_max``: MACE's radial cutoff zeroes them, so padding adds exactly
nothing and never produces a zero-length edge (NaN spherical harmonics). Padding edges
cost as much model time as real ones, so the edge capacity has little headroom over the
count inside the cutoff (:mod:`mace_lpcalc.fastpath.edge_buffers`); a captured graph is
re-captured only when the count outgrows the capacity or the atom count changes.
Results are returned as computed (NaN or infinite values are not masked).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from mace_lpcalc.fastpath.compiled import (DEVICE_WORK_LOCK, CompiledModelCall, capture_cuda_graph,
                                          make_traceable)
from mace_lpcalc.fastpath.edge_buffers import EdgeBuffers
from mace_lpcalc.fastpath.edge_chunks import EdgeChunking, convolution_chunks
from mace_lpcalc.fastpath.element_skip import convert_element_skips, elements_in_use
from mace_lpcalc.fastpath.model_batch import (
    GRAPH_OUTPUTS,
    MODEL_OUTPUTS,
    PaddedBatch,
    cast_floats,
    check_model_type,
    eager_model_call,
    float_dtype,
    head_index,
    replica_arrays,
)
from mace_lpcalc.fastpath.neighbors import ReplicaNeighborLists, _check_pbc

logger = logging.getLogger(__name__)

#: Verlet skin (Å) of the fast path unless the caller chooses one: rebuilds every ~10 steps
#: for water at 300 K and 1 fs (per-step times of skins 0.5-2 Å are within 5% of each
#: other, bench/results/h200_skins_648-5184.json).
DEFAULT_SKIN_A = 1.0
#: With a compiled call: edge headroom after the in-cutoff count outgrew the capacity,
#: and the ratio of the capacity ladder (a later run lands on capacities its cache holds).
_COMPILED_REGROWTH_HEADROOM, _COMPILED_CAPACITY_LADDER = 1.12, 1.05
#: Eager calls on a side stream before capture (PyTorch needs at least one to set up
#: autograd's and the libraries' lazy state outside the capture).
_WARMUP_CALLS = 2


class MACEEngine:
    """Evaluates a MACE model on one system repeatedly, keeping its state on the device.

    Args:
        model: a prepared MACE model (any float dtype, possibly with 16-bit Linear
            wrappers), called like mace's calculator calls it. Moved to ``device``; its
            parameters stop requiring gradients (as in mace's calculator), and its skip
            connections become :class:`mace_lpcalc.fastpath.element_skip.ElementSkip` modules.
        z_table_atomic_numbers: the model's elements, in its one-hot order.
        r_max: the model's cutoff radius in Å.
        device: where the model and all per-step tensors live.
        skin_A: Verlet skin in Å (0 rebuilds the neighbour list whenever anything moved).
            The model never sees skin edges; a larger skin means rarer rebuilds but a
            longer list to select from at every step.
        use_cuda_graph: ``"auto"`` (on for CUDA devices), True or False.
        edge_headroom: edge capacity as a multiple of the in-cutoff edge count that first
            needs it. Padding edges cost model time, so keep it small; outgrowing the
            capacity costs one re-capture.
        head: the model head to evaluate; default as mace's calculator chooses.
        compile_model: evaluate through :class:`mace_lpcalc.fastpath.compiled.CompiledModelCall`
            (forward and backward fused by TorchInductor; falls back to the eager model,
            with a warning, where compilation or its check fails).
        compile_in_background: compile in a worker thread (on CUDA, with a child process)
            while calls run the eager model; False compiles within the first call.
        reference_model: with ``compile_model`` and 16-bit operands: the model without
            them, against which the compiled call's accuracy is checked.
        edge_chunk_size: when convolutions run in chunks of edges
            (:class:`mace_lpcalc.fastpath.edge_chunks.EdgeChunking`): ``"auto"`` (where memory
            needs it), None (never) or the most edges a chunk holds.
    """

    def __init__(self, model: torch.nn.Module, *, z_table_atomic_numbers, r_max: float,
                 device="cpu", skin_A: float = DEFAULT_SKIN_A, use_cuda_graph="auto",
                 edge_headroom: float = 1.05, head: str | None = None,
                 model_type: str = "MACE", compute_atomic_stresses: bool = False,
                 min_edge_capacity: int = 0,
                 compile_model: bool = False, compile_in_background: bool = True,
                 reference_model: torch.nn.Module | None = None, edge_chunk_size="auto"):
        self.device = torch.device(device)
        if not (use_cuda_graph == "auto" or isinstance(use_cuda_graph, bool)):
            raise ValueError(
                f"use_cuda_graph must be 'auto', True or False, got {use_cuda_graph!r}")
        if use_cuda_graph is True and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got device={self.device}")
        if not edge_headroom >= 1.0:
            raise ValueError(f"edge_headroom must be at least 1, got {edge_headroom}")
        if not (np.isfinite(r_max) and r_max > 0):
            raise ValueError(f"r_max must be a positive number of Å, got {r_max}")
        if hasattr(model, "joint_embedding"):
            raise ValueError("models with charge/spin embeddings need per-system inputs "
                             "that MACEEngine does not provide")
        check_model_type(model_type, compute_atomic_stresses, compile_model)
        self.model_type = model_type
        self.compute_atomic_stresses = bool(compute_atomic_stresses)
        self.min_edge_capacity = int(min_edge_capacity)
        self.model = model.to(self.device)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        convert_element_skips(self.model)
        self.edge_chunking = EdgeChunking(self.model, edge_chunk_size, self.device)
        #: One-hot columns (model element indices) present in the system, padding included.
        self._elements_in_use: tuple[int, ...] | None = None
        self.dtype = float_dtype(self.model)
        if self.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"model parameters must be float32 or float64, got {self.dtype}")
        self.r_max = float(r_max)
        self.atomic_numbers = tuple(int(z) for z in z_table_atomic_numbers)
        self._species_index = {z: index for index, z in enumerate(self.atomic_numbers)}
        self._head_index = head_index(self.model, head)
        self._has_energy = "energy" in dict(MODEL_OUTPUTS[model_type])
        self.edge_headroom = float(edge_headroom)
        self.use_cuda_graph = self.device.type == "cuda" if use_cuda_graph == "auto" else use_cuda_graph
        self.neighbors = ReplicaNeighborLists(self.r_max, skin_A)
        self.compiled = None
        if compile_model:
            reference_call = None
            if reference_model is not None:
                reference_model = reference_model.to(self.device).requires_grad_(False)
                reference_call = lambda batch, compute_stress: eager_model_call(  # noqa: E731
                    reference_model, cast_floats(batch, float_dtype(reference_model)),
                    compute_stress)
            make_traceable(self.model)
            # A child process generates the code on CUDA (on a CPU it would take the calls' cores).
            self.compiled = CompiledModelCall(
                self._eager_model_call, reference_call, background=compile_in_background,
                child_process=compile_in_background and self.device.type == "cuda")
        #: Number of CUDA graphs captured so far (each capture costs a few model calls).
        self.n_graph_captures = 0
        self._capture_failed: set[bool] = set()
        self._graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        #: The compiled call's version when the graphs were captured (a newer one replaces
        #: them).
        self._graphs_compiled_version = None
        self._numbers: np.ndarray | None = None
        self._n_atoms = self._n_replicas = 0
        #: Whether the last call replayed a captured graph.
        self.last_call_replayed_graph = False
        self._edges: EdgeBuffers | None = None
        #: Edges inside the cutoff at the last evaluation (what the model saw, unpadded).
        self.n_edges = 0

    # ------------------------------------------------------------------ public API

    def compute(self, positions, numbers, cell, pbc, compute_stress: bool = False,
                charges=None) -> dict:
        """Energy, forces, per-atom energies (and stress) of one configuration.

        Args: ``positions`` (n_atoms, 3) Å, wrapped or not; ``numbers`` (n_atoms,) atomic
        numbers, all among the model's elements; ``cell`` (3, 3) Å, lattice vectors as
        rows (ignored in open directions); ``pbc`` a bool or three bools;
        ``compute_stress`` also the stress, as mace's calculator computes it for any cell
        (zero for a zero-volume cell); ``charges`` (n_atoms,) fixed charges, e, of the
        dipole models' baseline dipole (None: zero).

        Returns, for energy models, ``energy`` (float, eV), ``forces`` (n_atoms, 3) eV/Å,
        ``node_energy`` (n_atoms,) eV (E0 included), ``node_e0`` (n_atoms,) eV, with
        ``compute_stress`` ``stress`` (3, 3) eV/Å³ in mace's sign convention, with atomic
        stresses ``atomic_stresses`` and ``atomic_virials`` (n_atoms, 3, 3); for dipole
        models ``dipole`` (3,) e·Å. Values are not checked for NaN.
        """
        positions = np.asarray(positions, dtype=np.float64)
        cell = np.asarray(cell, dtype=np.float64)
        if positions.ndim != 2 or positions.shape[1] != 3 or len(positions) == 0:
            raise ValueError(f"positions must have shape (n_atoms >= 1, 3), got {positions.shape}")
        if cell.shape != (3, 3):
            raise ValueError(f"cell must have shape (3, 3), got {cell.shape}")
        return self.compute_replicas(positions[None], numbers, cell[None], pbc,
                                     compute_stress, charges)[0]

    def compute_replicas(self, positions, numbers, cells, pbc, compute_stress: bool = False,
                         charges=None) -> list[dict]:
        """:meth:`compute` for several configurations of the same atoms (replicas: seeds of
        one system, each with its own positions and cell) in one model call.

        Args:
            positions: (n_replicas, n_atoms, 3) Å.
            numbers: (n_atoms,) atomic numbers, the same in every replica.
            cells: (n_replicas, 3, 3) Å.
            pbc: a bool or three bools, the same for every replica.
            compute_stress, charges: as for :meth:`compute` (the charges of every replica).

        Returns:
            One dict per replica, as :meth:`compute` returns.
        """
        positions, numbers, cells = replica_arrays(positions, numbers, cells)
        pbc = _check_pbc(pbc)
        n_replicas, n_atoms = positions.shape[:2]
        compute_stress = bool(compute_stress) and self._has_energy
        if (self._numbers is None or n_replicas != self._n_replicas
                or not np.array_equal(numbers, self._numbers)):
            self._set_species(numbers, n_replicas)
        self._set_charges(charges)

        n_real = n_replicas * n_atoms
        host_in = self._host_in.numpy()
        host_in[:n_real] = positions.reshape(n_real, 3)
        host_in[n_real:] = cells.reshape(3 * n_replicas, 3)
        self._device_in.copy_(self._host_in, non_blocking=True)
        device_positions, device_cells = self._device_positions_and_cells()
        if self.neighbors.update(device_positions.view(n_replicas, n_atoms, 3), device_cells,
                                 pbc, host_positions=positions, host_cells=cells):
            self._load_candidates()
        out = self._evaluate_and_read(compute_stress)
        n_edges = int(out[-1])
        if n_edges > self.edge_capacity:  # more edges entered the cutoff than it holds
            self._edges.grow(n_edges)
            self._drop_graphs()
            out = self._evaluate_and_read(compute_stress)
            n_edges = int(out[-1])
        self.n_edges = n_edges
        return self._per_replica(self._batch.unpack(out, compute_stress))

    def _per_replica(self, results: dict) -> list[dict]:
        """Split the batch's outputs (graph-level: one row per replica; per-atom: all
        replicas' atoms) into one dict per replica."""
        n_atoms = self._n_atoms
        replicas = []
        for replica in range(self._n_replicas):
            atoms = slice(replica * n_atoms, (replica + 1) * n_atoms)
            own = {name: value[replica] if name in GRAPH_OUTPUTS else value[atoms]
                   for name, value in results.items()}
            if self._has_energy:
                own["energy"] = float(own["energy"])
                own["node_e0"] = self._node_e0.copy()
            replicas.append(own)
        return replicas

    def _device_positions_and_cells(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the device input: positions (n_replicas n_atoms, 3), cells (n_replicas, 3, 3)."""
        n_real = self._n_replicas * self._n_atoms
        return self._device_in[:n_real], self._device_in[n_real:].view(-1, 3, 3)

    def _evaluate_and_read(self, compute_stress: bool) -> np.ndarray:
        with torch.enable_grad():
            self._run(compute_stress)
        batch = self._batch
        if batch.host_out is not batch.out:
            batch.host_out.copy_(batch.out, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
        return batch.host_out.numpy()

    @property
    def edge_capacity(self) -> int:
        """Model edge slots (in-cutoff edges plus padding); 0 before the first call."""
        return self._edges.capacity if self._edges is not None else 0

    # --------------------------------------------------------------- system state

    def _set_species(self, numbers: np.ndarray, n_replicas: int) -> None:
        unknown = sorted({int(z) for z in numbers} - set(self.atomic_numbers))
        if unknown:
            raise ValueError(f"atomic numbers {unknown} are not among the model's elements "
                             f"{list(self.atomic_numbers)}")
        indices = torch.tensor([self._species_index[int(z)] for z in numbers],
                               dtype=torch.int64, device=self.device)
        n_atoms = len(numbers)
        if self._numbers is None or (len(self._numbers), self._n_replicas) != (n_atoms, n_replicas):
            self._allocate_system(n_atoms, n_replicas)
        # Padding nodes are element 0. Graphs and compiled calls evaluate the skip
        # connections for these elements only, so a new set needs new ones.
        elements = tuple(sorted({self._species_index[int(z)] for z in numbers} | {0}))
        if elements != self._elements_in_use:
            self._elements_in_use = elements
            self._drop_graphs()
            if self.compiled is not None:
                self.compiled.invalidate()
        # Written in place so that captured graphs, which read these buffers, stay valid.
        n_real = n_replicas * n_atoms
        node_attrs = self._batch.node_attrs
        node_attrs[:n_real] = 0
        node_attrs[torch.arange(n_real, device=self.device), indices.repeat(n_replicas)] = 1
        if self._has_energy:
            with torch.no_grad():
                e0 = self.model.atomic_energies_fn(node_attrs[:n_atoms])
            self._node_e0 = e0[:, self._head_index].detach().cpu().numpy()
        self._numbers = numbers.copy()

    def _set_charges(self, charges) -> None:
        charges = (np.zeros(self._n_atoms) if charges is None
                   else np.asarray(charges, dtype=np.float64))
        if charges.shape != (self._n_atoms,):
            raise ValueError(f"charges must have shape ({self._n_atoms},), got {charges.shape}")
        if not np.array_equal(charges, self._last_charges):
            device_charges = self._batch.charges
            device_charges[:self._batch.n_real] = torch.from_numpy(
                np.tile(charges, self._n_replicas)).to(device_charges)
            self._last_charges = charges.copy()

    def _allocate_system(self, n_atoms: int, n_replicas: int) -> None:
        device, dtype = self.device, self.dtype
        on_cuda = device.type == "cuda"
        # Positions (every replica's atoms) and cells (three rows per replica, after the
        # positions) travel in one copy.
        n_rows = n_replicas * (n_atoms + 3)
        self._host_in = torch.empty((n_rows, 3), dtype=torch.float64, pin_memory=on_cuda)
        self._device_in = torch.empty((n_rows, 3), dtype=torch.float64, device=device)
        self._batch = PaddedBatch(n_atoms, n_elements=len(self.atomic_numbers), r_max=self.r_max,
                                  head_index=self._head_index, dtype=dtype, device=device,
                                  model_type=self.model_type,
                                  atomic_stresses=self.compute_atomic_stresses,
                                  n_graphs=n_replicas)
        self._last_charges = None
        self._n_atoms, self._n_replicas = n_atoms, n_replicas
        self._numbers = None
        # A compiled call, whose re-compilation costs tens of seconds, gets more room once
        # the system proves to be still changing (a lattice start disorders, a box shrinks).
        compiled = self.compiled is not None
        regrowth = max(self.edge_headroom, _COMPILED_REGROWTH_HEADROOM) if compiled \
            else self.edge_headroom
        self._edges = EdgeBuffers(
            n_atoms=n_replicas * n_atoms, n_graphs=n_replicas, r_max=self.r_max, dtype=dtype,
            device=device, headroom=self.edge_headroom, min_capacity=self.min_edge_capacity,
            regrowth_headroom=regrowth, capacity_ladder=_COMPILED_CAPACITY_LADDER if compiled else None)
        self.neighbors.invalidate()
        self._drop_graphs()

    def _load_candidates(self) -> None:
        """Copy a freshly built Verlet list into the edge buffers' candidates."""
        if self._edges.load_candidates(self.neighbors.edge_index, self.neighbors.unit_shifts,
                                       self.neighbors.edge_graph,
                                       *self._device_positions_and_cells()):
            self._drop_graphs()

    # ------------------------------------------------------------------ evaluation

    def _evaluate(self, compute_stress: bool) -> None:
        """One model call from the persistent buffers into the packed output (capturable)."""
        positions, cells = self._device_positions_and_cells()
        with torch.no_grad():
            n_edges = self._edges.select(positions, cells)
        batch = self._batch.inputs(positions, cells, self._edges)
        chunk_edges = self.edge_chunking.chunk_edges(self.edge_capacity)
        if self.compiled is not None and chunk_edges is None:
            output = self.compiled(batch, compute_stress)
        else:
            with convolution_chunks(chunk_edges):
                output = self._eager_model_call(batch, compute_stress)
        self._batch.pack(output, compute_stress, n_edges)

    def _eager_model_call(self, batch: dict, compute_stress: bool) -> dict:
        with DEVICE_WORK_LOCK, elements_in_use(self._elements_in_use):
            return eager_model_call(self.model, batch, compute_stress,
                                    atomic_stresses=self.compute_atomic_stresses)

    def _run(self, compute_stress: bool) -> None:
        if self.compiled is not None and self.compiled.version != self._graphs_compiled_version:
            self._drop_graphs()  # captured before the compiled call was ready
        graph = None
        if self.use_cuda_graph and compute_stress not in self._capture_failed:
            graph = self._graphs.get(compute_stress)
            if graph is None:
                graph = self._capture(compute_stress)
        self.last_call_replayed_graph = graph is not None
        if graph is not None:
            graph.replay()
        else:
            self._evaluate(compute_stress)

    def _capture(self, compute_stress: bool):
        """Capture ``_evaluate`` as a CUDA graph; on failure log once and return None."""
        # Read first: a compiled call installed during the capture must trigger another.
        compiled_version = self.compiled.version if self.compiled is not None else None
        try:
            graph = capture_cuda_graph(lambda: self._evaluate(compute_stress), self.device,
                                       warmup_calls=_WARMUP_CALLS)
        except RuntimeError as err:
            self._capture_failed.add(compute_stress)
            logger.warning("CUDA graph capture failed (compute_stress=%s); running eagerly "
                           "instead: %s", compute_stress, err)
            return None
        self._graphs[compute_stress] = graph
        self._graphs_compiled_version = compiled_version
        self.n_graph_captures += 1
        return graph

    def _drop_graphs(self) -> None:
        self._graphs.clear()

