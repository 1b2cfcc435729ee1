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

With ``compile_model`` the model call is traced, backward pass included, and fused by
TorchInductor (:mod:`mace_lpcalc.fastpath.compiled`), by default in a background thread while
the CUDA graph of the eager call keeps MD going; once the compiled call is ready and
checked, the graph is captured again around it.

The model is called exactly as mace's calculator calls it,
``model(batch, compute_stress=..., training=False)``, on a batch dictionary built from
persistent tensors. The batch has two graphs: graph 0 is the real system; graph 1 holds
a few padding nodes with self-loop padding edges, whose periodic shift in graph 1's own
large cell makes them longer than ``r_max``. MACE's radial cutoff zeroes such edges, so
padding adds exactly nothing to graph 0 and never produces a zero-length edge (whose
normalised spherical harmonics would be NaN). Padding edges cost as much model time as
real ones, so the edge capacity has only a little headroom over the count inside the
cutoff; the captured graph stays valid while that count fluctuates, and it is
re-captured only when the count outgrows the capacity (detected from a count the graph
writes beside the results; the call is then repeated with larger buffers) or the atom
count changes.

Results are returned as computed: NaN or infinite values are not masked, so callers can
detect a failed evaluation.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from mace_lpcalc.fastpath.compiled import DEVICE_WORK_LOCK, CompiledModelCall, make_traceable
from mace_lpcalc.fastpath.edge_geometry import index_select_gathers
from mace_lpcalc.fastpath.element_skip import convert_element_skips, elements_in_use
from mace_lpcalc.fastpath.neighbors import VerletNeighborList, _check_pbc

logger = logging.getLogger(__name__)

#: Verlet skin (Å) of the fast path unless the caller chooses one: rebuilds every ~10 steps
#: for water at 300 K and 1 fs (per-step times of skins 0.5-2 Å are within 5% of each
#: other, bench/results/h200_skins_648-5184.json).
DEFAULT_SKIN_A = 1.0
#: Edge capacities are rounded up to a multiple of this.
_EDGE_CAPACITY_MULTIPLE = 64
#: Verlet-list buffers are sized with this headroom over the list that needs them (they
#: are refilled outside the graph, so outgrowing them costs only a re-capture).
_CANDIDATE_HEADROOM = 1.1
#: Edge headroom after the in-cutoff count outgrew the capacity, with a compiled call.
_COMPILED_REGROWTH_HEADROOM = 1.12
#: Padding edges are spread over this many padding nodes so that the scatter-adds into
#: them do not all contend for one memory address.
_PADDING_NODES = 8
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
            (forward and backward fused by TorchInductor; the first use of a model at a
            size compiles for tens of seconds, later processes load inductor's cache).
            Falls back to the eager model, with a warning, where compilation or its check
            fails.
        compile_in_background: compile in a worker thread while calls run the eager
            model (see :mod:`mace_lpcalc.fastpath.compiled`); False compiles within the first call.
        reference_model: with ``compile_model`` and a model with 16-bit operands: the same
            model without them, against which the compiled call's accuracy is checked (it
            must be about as accurate as the eager call; see :mod:`mace_lpcalc.fastpath.compiled`).
    """

    def __init__(self, model: torch.nn.Module, *, z_table_atomic_numbers, r_max: float,
                 device="cpu", skin_A: float = DEFAULT_SKIN_A, use_cuda_graph="auto",
                 edge_headroom: float = 1.05, head: str | None = None,
                 model_type: str = "MACE", compute_atomic_stresses: bool = False,
                 min_edge_capacity: int = 0,
                 compile_model: bool = False, compile_in_background: bool = True,
                 reference_model: torch.nn.Module | None = None):
        self.device = torch.device(device)
        if use_cuda_graph not in ("auto", True, False):
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
        if model_type not in MODEL_OUTPUTS:
            raise ValueError(f"model_type {model_type!r} is not evaluated by MACEEngine; "
                             f"it evaluates {', '.join(MODEL_OUTPUTS)}")
        if compute_atomic_stresses and model_type != "MACE":
            raise ValueError("atomic stresses are computed for energy models (model_type "
                             f"'MACE') only, not {model_type!r}")
        if compile_model and (model_type != "MACE" or compute_atomic_stresses):
            raise ValueError("compile_model compiles energy, forces and stress of energy "
                             "models; it does not compile dipoles or atomic stresses")
        self.model_type = model_type
        self.compute_atomic_stresses = bool(compute_atomic_stresses)
        self.min_edge_capacity = int(min_edge_capacity)
        self.model = model.to(self.device)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        convert_element_skips(self.model)
        #: One-hot columns (model element indices) present in the system, padding included.
        self._elements_in_use: tuple[int, ...] | None = None
        self.dtype = _float_dtype(self.model)
        if self.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"model parameters must be float32 or float64, got {self.dtype}")
        self.r_max = float(r_max)
        self.atomic_numbers = tuple(int(z) for z in z_table_atomic_numbers)
        self._species_index = {z: index for index, z in enumerate(self.atomic_numbers)}
        self._head_index = _head_index(self.model, head)
        self._has_energy = "energy" in dict(MODEL_OUTPUTS[model_type])
        self.edge_headroom = float(edge_headroom)
        self.use_cuda_graph = (self.device.type == "cuda" if use_cuda_graph == "auto"
                               else bool(use_cuda_graph))
        self.neighbors = VerletNeighborList(self.r_max, skin_A)
        self.compiled = None
        if compile_model:
            reference_call = None
            if reference_model is not None:
                reference_model = reference_model.to(self.device).requires_grad_(False)
                reference_call = lambda batch, compute_stress: _eager_model_call(  # noqa: E731
                    reference_model, _cast_floats(batch, _float_dtype(reference_model)),
                    compute_stress)
            make_traceable(self.model)
            self.compiled = CompiledModelCall(self._eager_model_call, reference_call,
                                              background=compile_in_background)
        #: Number of CUDA graphs captured so far (each capture costs a few model calls).
        self.n_graph_captures = 0
        self._capture_failed: set[bool] = set()
        self._graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        #: The compiled call's version when the graphs were captured (a newer one replaces
        #: them).
        self._graphs_compiled_version = None
        self._numbers: np.ndarray | None = None
        self._last_call_used_graph = False
        self.edge_capacity = 0
        self.candidate_capacity = 0
        #: Edges inside the cutoff at the last evaluation (what the model saw, unpadded).
        self.n_edges = 0

    # ------------------------------------------------------------------ public API

    def compute(self, positions, numbers, cell, pbc, compute_stress: bool = False,
                charges=None) -> dict:
        """Energy, forces, per-atom energies (and stress) of one configuration.

        Args:
            positions: (n_atoms, 3) Å, unwrapped or wrapped.
            numbers: (n_atoms,) atomic numbers, all among the model's elements.
            cell: (3, 3) Å, lattice vectors as rows (ignored in non-periodic directions).
            pbc: a bool or three bools.
            compute_stress: also return the stress, computed as mace's calculator does for
                any cell (from the cell's volume; zero for a zero-volume cell).
            charges: (n_atoms,) fixed charges, e, for the dipole models' baseline dipole
                (None: zero).

        Returns:
            For energy models ``energy`` (float, eV), ``forces`` (n_atoms, 3) eV/Å,
            ``node_energy`` (n_atoms,) eV as the model outputs it (reference energy
            included), ``node_e0`` (n_atoms,) eV (each atom's reference energy E0), with
            ``compute_stress`` ``stress`` (3, 3) eV/Å³ in mace's sign convention (as its
            calculator has it before the Voigt conversion), with atomic stresses
            ``atomic_stresses`` and ``atomic_virials`` (n_atoms, 3, 3); for dipole models
            ``dipole`` (3,) e·Å. Values are not checked for NaN.
        """
        positions = np.asarray(positions, dtype=np.float64)
        numbers = np.asarray(numbers)
        cell = np.asarray(cell, dtype=np.float64)
        pbc = _check_pbc(pbc)
        if positions.ndim != 2 or positions.shape[1] != 3 or len(positions) == 0:
            raise ValueError(f"positions must have shape (n_atoms >= 1, 3), got {positions.shape}")
        if numbers.shape != (len(positions),):
            raise ValueError(f"numbers must have shape ({len(positions)},), got {numbers.shape}")
        if cell.shape != (3, 3):
            raise ValueError(f"cell must have shape (3, 3), got {cell.shape}")
        compute_stress = bool(compute_stress) and self._has_energy
        if self._numbers is None or not np.array_equal(numbers, self._numbers):
            self._set_species(numbers)
        self._set_charges(charges)

        n_atoms = len(positions)
        host_in = self._host_in.numpy()
        host_in[:n_atoms] = positions
        host_in[n_atoms:] = cell
        self._device_in.copy_(self._host_in, non_blocking=True)
        if self.neighbors.update(self._device_in[:n_atoms], self._device_in[n_atoms:], pbc,
                                 host_positions=positions, host_cell=cell):
            self._load_candidates()
        out = self._evaluate_and_read(compute_stress)
        n_edges = int(out[-1])
        if n_edges > self.edge_capacity:  # more edges entered the cutoff than it holds
            self._allocate_edges(n_edges)
            out = self._evaluate_and_read(compute_stress)
            n_edges = int(out[-1])
        self.n_edges = n_edges
        # In the dtypes the model returned them (mace's calculator passes those on).
        results = {name: out[where].reshape(shape).astype(self._output_dtypes[name])
                   for name, (where, shape) in self._layout.items()
                   if name != "stress" or compute_stress}
        if self._has_energy:
            results["energy"] = float(results["energy"][0])
            results["node_e0"] = self._node_e0.copy()
        return results

    def _evaluate_and_read(self, compute_stress: bool) -> np.ndarray:
        with torch.enable_grad():
            self._run(compute_stress)
        if self._host_out is not self._out:
            self._host_out.copy_(self._out, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
        return self._host_out.numpy()

    @property
    def last_call_replayed_graph(self) -> bool:
        """Whether the last call replayed a captured graph."""
        return self._last_call_used_graph

    # --------------------------------------------------------------- system state

    def _set_species(self, numbers: np.ndarray) -> None:
        unknown = sorted({int(z) for z in numbers} - set(self.atomic_numbers))
        if unknown:
            raise ValueError(f"atomic numbers {unknown} are not among the model's elements "
                             f"{list(self.atomic_numbers)}")
        indices = torch.tensor([self._species_index[int(z)] for z in numbers],
                               dtype=torch.int64, device=self.device)
        n_atoms = len(numbers)
        if self._numbers is None or len(self._numbers) != n_atoms:
            self._allocate_system(n_atoms)
        # Padding nodes are element 0. Graphs and compiled calls evaluate the skip
        # connections for these elements only, so a new set needs new ones.
        elements = tuple(sorted({self._species_index[int(z)] for z in numbers} | {0}))
        if elements != self._elements_in_use:
            self._elements_in_use = elements
            self._drop_graphs()
            if self.compiled is not None:
                self.compiled.invalidate()
        # Written in place so that captured graphs, which read these buffers, stay valid.
        self._node_attrs[:n_atoms] = 0
        self._node_attrs[torch.arange(n_atoms, device=self.device), indices] = 1
        if self._has_energy:
            with torch.no_grad():
                e0 = self.model.atomic_energies_fn(self._node_attrs[:n_atoms])
            self._node_e0 = e0[:, self._head_index].detach().cpu().numpy()
        self._numbers = numbers.copy()

    def _set_charges(self, charges) -> None:
        charges = (np.zeros(self._n_atoms) if charges is None
                   else np.asarray(charges, dtype=np.float64))
        if charges.shape != (self._n_atoms,):
            raise ValueError(f"charges must have shape ({self._n_atoms},), got {charges.shape}")
        if not np.array_equal(charges, self._last_charges):
            self._charges[:self._n_atoms] = torch.from_numpy(charges).to(self._charges)
            self._last_charges = charges.copy()

    def _allocate_system(self, n_atoms: int) -> None:
        device, dtype = self.device, self.dtype
        n_nodes = n_atoms + _PADDING_NODES
        on_cuda = device.type == "cuda"
        # Positions (rows 0..n-1) and cell (last three rows) travel in one copy.
        self._host_in = torch.empty((n_atoms + 3, 3), dtype=torch.float64, pin_memory=on_cuda)
        self._device_in = torch.empty((n_atoms + 3, 3), dtype=torch.float64, device=device)
        self._node_attrs = torch.zeros((n_nodes, len(self.atomic_numbers)), dtype=dtype,
                                       device=device)
        self._node_attrs[n_atoms:, 0] = 1  # padding nodes: any element will do
        self._positions = torch.zeros((n_nodes, 3), dtype=dtype, device=device)
        # Graph 1's cell makes every padding self-loop 2*r_max long: beyond the cutoff.
        self._cells = torch.zeros((2, 3, 3), dtype=dtype, device=device)
        self._cells[1] = 2 * self.r_max * torch.eye(3, dtype=dtype, device=device)
        self._batch = torch.cat((torch.zeros(n_atoms, dtype=torch.int64, device=device),
                                 torch.ones(_PADDING_NODES, dtype=torch.int64, device=device)))
        self._ptr = torch.tensor([0, n_atoms, n_nodes], dtype=torch.int64, device=device)
        self._head = torch.full((2,), self._head_index, dtype=torch.int64, device=device)
        self._charges = torch.zeros(n_nodes, dtype=dtype, device=device)
        self._last_charges = None
        # Every output, then the in-cutoff edge count: packed for one copy out.
        self._layout = _output_layout(self.model_type, n_atoms, self.compute_atomic_stresses)
        size = sum(np.prod(shape, dtype=int) for _, shape in self._layout.values())
        self._out = torch.zeros(size + 1, dtype=torch.float64, device=device)
        self._output_dtypes: dict[str, type] = {}
        self._host_out = (torch.empty_like(self._out, device="cpu").pin_memory() if on_cuda
                          else self._out)
        self._n_atoms = n_atoms
        self._numbers = None
        self.edge_capacity = self.candidate_capacity = 0
        self.neighbors.invalidate()
        self._drop_graphs()

    def _allocate_edges(self, n_edges: int) -> None:
        """Model edge buffers for ``n_edges`` in-cutoff edges plus headroom (and a dump slot)."""
        headroom = self.edge_headroom
        if self.edge_capacity and self.compiled is not None:
            # The system is still changing (a lattice start disorders, a box shrinks); a
            # compiled call, whose re-compilation costs tens of seconds, gets more room.
            headroom = max(headroom, _COMPILED_REGROWTH_HEADROOM)
        capacity = _round_up(max(n_edges * headroom, self.min_edge_capacity))
        device = self.device
        self._edge_index = torch.empty((2, capacity), dtype=torch.int64, device=device)
        self._unit_shifts = torch.empty((capacity, 3), dtype=self.dtype, device=device)
        # Selection scratch: one extra slot at the end receives every unselected candidate.
        padding_node = self._n_atoms + torch.arange(capacity + 1, device=device) % _PADDING_NODES
        self._padding_edge_index = padding_node.expand(2, capacity + 1).contiguous()
        self._padding_unit_shifts = torch.tensor(
            [1.0, 0.0, 0.0], dtype=self.dtype, device=device).expand(capacity + 1, 3).contiguous()
        self._selected_edge_index = torch.empty_like(self._padding_edge_index)
        self._selected_unit_shifts = torch.empty_like(self._padding_unit_shifts)
        self._edge_slots = torch.arange(capacity, device=device)
        if self.edge_capacity:
            logger.info("in-cutoff edge count %d outgrew the capacity %d; re-padding to %d",
                        n_edges, self.edge_capacity, capacity)
        self.edge_capacity = capacity
        self._drop_graphs()

    def _allocate_candidates(self, n_candidates: int) -> None:
        capacity = _round_up(n_candidates * _CANDIDATE_HEADROOM)
        device = self.device
        self._candidate_edge_index = torch.zeros((2, capacity), dtype=torch.int64, device=device)
        self._candidate_unit_shifts = torch.zeros((capacity, 3), dtype=torch.float64,
                                                  device=device)
        self._is_candidate = torch.zeros(capacity, dtype=torch.bool, device=device)
        self.candidate_capacity = capacity
        self._drop_graphs()

    def _load_candidates(self) -> None:
        """Copy a freshly built Verlet list into the fixed-capacity candidate buffers."""
        n_candidates = self.neighbors.n_edges
        if n_candidates > self.candidate_capacity or not self.candidate_capacity:
            self._allocate_candidates(n_candidates)
        with torch.no_grad():
            self._candidate_edge_index[:, :n_candidates] = self.neighbors.edge_index
            self._candidate_edge_index[:, n_candidates:] = 0
            self._candidate_unit_shifts[:n_candidates] = self.neighbors.unit_shifts
            self._is_candidate[:n_candidates] = True
            self._is_candidate[n_candidates:] = False
        # Size the model's edge buffers now (a rebuild synchronises anyway), so that the
        # post-call overflow check is needed only when edges enter the cutoff later.
        n_inside = int(self._inside_cutoff().sum())
        if n_inside > self.edge_capacity or not self.edge_capacity:
            self._allocate_edges(n_inside)

    # ------------------------------------------------------------------ evaluation

    def _inside_cutoff(self) -> torch.Tensor:
        """Which Verlet-list candidates are shorter than ``r_max`` now (float64 geometry)."""
        n_atoms = self._n_atoms
        positions, cell = self._device_in[:n_atoms], self._device_in[n_atoms:]
        sender, receiver = self._candidate_edge_index
        vectors = (positions.index_select(0, receiver) - positions.index_select(0, sender)
                   + self._candidate_unit_shifts @ cell)
        return self._is_candidate & ((vectors * vectors).sum(dim=1) < self.r_max ** 2)

    def _select_edges(self) -> torch.Tensor:
        """Compact the in-cutoff candidates into the model's edge buffers; fixed shapes only.

        Returns the (0-d) number of in-cutoff edges. Candidates beyond the capacity are
        dropped into the dump slot; the caller sees the count and repeats the call.
        """
        inside = self._inside_cutoff()
        slots = torch.cumsum(inside, dim=0)
        capacity = self.edge_capacity
        targets = torch.where(inside, slots - 1, capacity).clamp_(max=capacity)
        self._selected_edge_index.copy_(self._padding_edge_index)
        self._selected_edge_index.index_copy_(1, targets, self._candidate_edge_index)
        self._selected_unit_shifts.copy_(self._padding_unit_shifts)
        self._selected_unit_shifts.index_copy_(0, targets,
                                               self._candidate_unit_shifts.to(self.dtype))
        self._edge_index.copy_(self._selected_edge_index[:, :capacity])
        self._unit_shifts.copy_(self._selected_unit_shifts[:capacity])
        return slots[-1]

    def _evaluate(self, compute_stress: bool) -> None:
        """One model call from the persistent buffers into ``self._out`` (capturable)."""
        n_atoms = self._n_atoms
        with torch.no_grad():
            n_edges = self._select_edges()
            is_real_edge = (self._edge_slots < n_edges)[:, None]
            self._positions[:n_atoms] = self._device_in[:n_atoms]
            self._cells[0] = self._device_in[n_atoms:]
            shifts = torch.where(is_real_edge, self._unit_shifts @ self._cells[0],
                                 self._unit_shifts @ self._cells[1])
        batch = {
            "positions": self._positions,
            "node_attrs": self._node_attrs,
            "edge_index": self._edge_index,
            "shifts": shifts,
            "unit_shifts": self._unit_shifts,
            "cell": self._cells.view(6, 3),
            "batch": self._batch,
            "ptr": self._ptr,
            "head": self._head,
            "charges": self._charges,
        }
        if self.compiled is not None:
            output = self.compiled(batch, compute_stress)
        else:
            output = self._eager_model_call(batch, compute_stress)
        with torch.no_grad():
            for name, (where, _) in self._layout.items():
                if name == "stress" and not compute_stress:
                    continue
                # Graph-level outputs: graph 0; per-atom outputs: the real atoms.
                value = output[name][0] if name in _GRAPH_OUTPUTS else output[name][:n_atoms]
                self._out[where] = value.reshape(-1)
                self._output_dtypes[name] = _NUMPY_DTYPES[value.dtype]
            self._out[-1] = n_edges

    def _eager_model_call(self, batch: dict, compute_stress: bool) -> dict:
        with DEVICE_WORK_LOCK, elements_in_use(self._elements_in_use):
            return _eager_model_call(self.model, batch, compute_stress,
                                     atomic_stresses=self.compute_atomic_stresses)

    def _run(self, compute_stress: bool) -> None:
        if self.compiled is not None and self.compiled.version != self._graphs_compiled_version:
            self._drop_graphs()  # captured before the compiled call was ready
        graph = None
        if self.use_cuda_graph and compute_stress not in self._capture_failed:
            graph = self._graphs.get(compute_stress)
            if graph is None:
                graph = self._capture(compute_stress)
        self._last_call_used_graph = graph is not None
        if graph is not None:
            graph.replay()
        else:
            self._evaluate(compute_stress)

    def _capture(self, compute_stress: bool):
        """Capture ``_evaluate`` as a CUDA graph; on failure log once and return None."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        # Read first: a compiled call installed during the capture must trigger another.
        compiled_version = self.compiled.version if self.compiled is not None else None
        try:
            with DEVICE_WORK_LOCK:
                side.wait_stream(current)
                with torch.cuda.stream(side):
                    for _ in range(_WARMUP_CALLS):
                        self._evaluate(compute_stress)
                current.wait_stream(side)
                # The warm-up's cached blocks cannot serve the graph's private pool; handing
                # them back first keeps the peak near one evaluation's memory, not two.
                torch.cuda.empty_cache()
                # Each graph gets its own memory pool: with and without stress they may be
                # replayed in any order, which pool sharing does not allow in general.
                graph = torch.cuda.CUDAGraph()
                # "thread_local": a background compilation may still allocate memory.
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    self._evaluate(compute_stress)
        except RuntimeError as err:
            # A failed capture_end skips restoring the stream torch.cuda.graph switched to;
            # everything after (vesin included) must run on the caller's stream again.
            torch.cuda.set_stream(current)
            torch.cuda.synchronize(self.device)
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


def _eager_model_call(model: torch.nn.Module, batch: dict, compute_stress: bool,
                      atomic_stresses: bool = False) -> dict:
    # Fresh leaves sharing the buffers' memory: the models set requires_grad on them.
    batch = dict(batch, positions=batch["positions"].detach(),
                 node_attrs=batch["node_attrs"].detach())
    extra = (dict(compute_edge_forces=True, compute_atomic_stresses=True) if atomic_stresses
             else {})
    with DEVICE_WORK_LOCK, torch.enable_grad(), index_select_gathers():
        return model(batch, compute_stress=compute_stress, training=False, **extra)


#: Outputs per mace calculator ``model_type``, each with its shape (``n``: atoms).
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
_GRAPH_OUTPUTS = frozenset({"energy", "stress", "dipole"})


def _output_layout(model_type: str, n_atoms: int, atomic_stresses: bool) -> dict:
    """Where each output lies in the packed output buffer: name -> (slice, shape)."""
    fields = MODEL_OUTPUTS[model_type] + (_ATOMIC_STRESS_OUTPUTS if atomic_stresses else ())
    layout, offset = {}, 0
    for name, shape in fields:
        shape = tuple(n_atoms if size == "n" else size for size in shape)
        size = int(np.prod(shape))
        layout[name] = (slice(offset, offset + size), shape)
        offset += size
    return layout


def _float_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _cast_floats(batch: dict, dtype: torch.dtype) -> dict:
    return {key: value.to(dtype) if value.is_floating_point() else value
            for key, value in batch.items()}


def _round_up(count: float) -> int:
    return _EDGE_CAPACITY_MULTIPLE * max(1, math.ceil(count / _EDGE_CAPACITY_MULTIPLE))


def _head_index(model: torch.nn.Module, head: str | None) -> int:
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
