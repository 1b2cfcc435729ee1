"""``LowPrecisionMACECalculator``: mace's ASE calculator with named precision policies.

Swap one line of an ASE script::

    from mace_lpcalc import LowPrecisionMACECalculator
    atoms.calc = LowPrecisionMACECalculator(model_paths="water.model", device="cuda",
                                            policy="fp32-linear-bf16")

Everything else (integrators, optimizers, ``atoms.get_forces()``) is unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import glob
import threading
import warnings
from pathlib import Path

from mace_lpcalc import compat  # noqa: F401  -- mace before e3nn; version check
import numpy as np
import torch
from ase.calculators.calculator import (CalculationFailed, Calculator, CalculatorSetupError,
                                        all_changes)
from ase.data import chemical_symbols
from mace.calculators.mace import MACECalculator
from mace.tools import torch_tools

from mace_lpcalc.fastpath.disk_caches import use_disk_caches
from mace_lpcalc.fastpath.edge_chunks import check_edge_chunk_size
from mace_lpcalc.fastpath.engine import DEFAULT_SKIN_A, MACEEngine
from mace_lpcalc.fastpath.mace_layout import (cell_as_mace_sees_it, check_results,
                                              fast_path_tolerance, largest_deviation,
                                              results_like_mace)
from mace_lpcalc.installed import (cuequivariance_kernels_available, models_on_backend,
                                   package_versions, resolve_backend)
from mace_lpcalc.models import ModelLoadError, load_model, model_elements, model_hash
from mace_lpcalc.precision.auto import DEFAULT_AUTO_FORCE_BUDGET_EV_A
from mace_lpcalc.precision.dtype_report import dtype_report
from mace_lpcalc.precision.handover import PolicyHandover
from mace_lpcalc.replica_calls import ReplicaCalls
from mace_lpcalc.system_changes import ExactStateCheck
from mace_lpcalc.precision.policies import (apply_policy, check_device_supports,
                                            copy_without_policy, get_policy, policy_context,
                                            policy_for)

#: Forces above this (eV/Å) on any atom mean the model has left its domain; MD must stop.
EXPLODING_FORCE_EV_A = 1.0e3


#: torch's default dtype (which mace's data pipeline reads) and the CUDA matmul flags a
#: policy needs are process-wide: a calculation sets them for its duration, so two
#: calculators of different policies in two threads calculate one at a time.
_PROCESS_DEFAULTS_LOCK = threading.RLock()


class LowPrecisionMACECalculator(ExactStateCheck, ReplicaCalls, PolicyHandover, MACECalculator):
    """A MACE ASE calculator that runs a named precision policy on e3nn or cuEquivariance.

    Accepts every keyword of mace's ``MACECalculator`` and returns the same result keys,
    dtypes and shapes.

    Args:
        model_paths: path, glob or list of paths of MACE ``.model`` files (a committee if
            several). Loading unpickles the file, which runs code: load only trusted files.
        models: model object(s), instead of ``model_paths``. They are converted in place.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        policy: a name from :data:`mace_lpcalc.precision.policies.POLICIES` or a ``PrecisionPolicy``;
            None: ``default_dtype``'s (``"float64"``: fp64), else fp32. ``"auto"``: at the
            first call, the fastest policy whose forces on that structure (and rattled
            copies) are within ``auto_force_budget_eV_A`` of fp64
            (:mod:`mace_lpcalc.precision.auto`); the evidence is in
            ``parameters["policy_decision"]``.
        backend: ``"e3nn"``, ``"cuequivariance"`` or ``"auto"`` (cuEquivariance on CUDA when
            its kernels are installed; ``enable_cueq=True`` means ``"cuequivariance"``).
        fast_path: evaluate through :class:`mace_lpcalc.fastpath.engine.MACEEngine` (persistent device
            state, GPU neighbour list, CUDA graphs), one engine per committee member.
            ``"auto"``: on CUDA, or with ``compile_model``. ``False`` uses mace's own
            per-call graph construction. A model or output the fast path does not
            evaluate (``DipolePolarizabilityMACE``, ``PolarMACE``, charge/spin embeddings,
            a module layout it cannot read) makes it step aside, with one warning, to
            mace's path; ``parameters["fast_path_status"]`` says which path runs and why.
        verify_fast_path: at the first call, evaluate the structure on mace's path too
            and step aside if the fast path disagrees beyond rounding
            (:data:`mace_lpcalc.fastpath.mace_layout.FAST_PATH_TOLERANCE`); skipped where
            the first call chunked its convolutions (mace's path would not fit).
        skin_A: Verlet skin of the fast path's neighbour list, Å. It does not change the
            results (the model sees only edges inside the cutoff), only how often the
            list is rebuilt.
        use_cuda_graph: ``"auto"`` (on CUDA), True or False; fast path only.
        compile_model: fuse each energy+forces(+stress) call with TorchInductor (fast path
            only; see :mod:`mace_lpcalc.fastpath.compiled`). ``"auto"``: where the fast path
            runs on CUDA. Each new system size compiles (tens of seconds on a cold cache, a
            few on a warm one: the caches are on disk, :mod:`mace_lpcalc.fastpath.disk_caches`);
            results are checked against the eager model, which takes over with a warning if
            compilation or the check fails. mace's ``compile_mode`` (any value) means True.
        compile_in_background: compile while MD runs on the uncompiled fast path (on CUDA
            the code is generated in a child process), and switch when ready
            (``calc.engine.compiled.wait()`` waits for it); False makes the first call at
            each size compile.
        edge_chunk_size: fast path only: ``"auto"`` evaluates each convolution in chunks of
            edges, recomputing their weights in the backward pass, where a system is large
            enough to need the memory (:mod:`mace_lpcalc.fastpath.edge_chunks`; such calls run
            uncompiled); an int chunks above that many edges; None never chunks.
        default_dtype: mace's keyword: ``"float64"`` or ``"float32"`` picks the fp64 or
            fp32 policy; it must agree with ``policy`` if both are given.
        pad_num_edges: mace's keyword; on the fast path the smallest edge capacity.
        max_force_eV_A: a force on any atom above this (eV/Å) raises ``CalculationFailed``
            (atoms too close, or the model out of its domain); ``None`` or ``inf`` turns
            the check off. The protocols pass their ``max_force_eV_A`` setting here.
        sentinel_every: every this many evaluations (0: never), also evaluate the frame
            with the same model at fp64 on mace's path and record the deviations
            (:mod:`mace_lpcalc.precision.sentinel`) in ``calc.sentinel.records``.
        sentinel_force_budget_eV_A: the largest acceptable max |ΔF| against fp64 (None:
            record only); ``sentinel_action`` says what an excess does: ``"warn"``,
            ``"fallback"`` (switch to ``sentinel_fallback_policy`` for the rest of the run,
            recorded in ``parameters["sentinel_fallback"]``) or ``"stop"``
            (``CalculationFailed``).
        **kwargs: passed to mace's ``MACECalculator`` (``head``, ``model_type``,
            ``compute_atomic_stresses``, ``energy_units_to_eV``, ``charges_key``, ...).
    """

    def __init__(self, model_paths=None, models=None, device: str = "cpu",
                 policy=None, backend: str = "auto", fast_path="auto",
                 verify_fast_path: bool = True, skin_A: float = DEFAULT_SKIN_A,
                 use_cuda_graph="auto", compile_model="auto",
                 compile_in_background: bool = True, edge_chunk_size="auto",
                 default_dtype: str = "",
                 enable_cueq: bool = False, compile_mode=None, pad_num_edges: int = 0,
                 max_force_eV_A: float | None = EXPLODING_FORCE_EV_A,
                 sentinel_every: int = 0, sentinel_force_budget_eV_A: float | None = None,
                 sentinel_action: str = "warn", sentinel_fallback_policy: str = "fp32",
                 auto_force_budget_eV_A: float = DEFAULT_AUTO_FORCE_BUDGET_EV_A, **kwargs):
        policy = self._set_up_auto(policy, auto_force_budget_eV_A)
        try:
            self.policy = get_policy(policy_for(policy, default_dtype))
        except ValueError as err:
            raise CalculatorSetupError(str(err)) from None
        if (model_paths is None) == (models is None):
            raise CalculatorSetupError("give exactly one of model_paths or models")
        self.max_force_eV_A = float("inf") if max_force_eV_A is None else float(max_force_eV_A)
        if not self.max_force_eV_A > 0:
            raise CalculatorSetupError(f"max_force_eV_A must be positive, got {max_force_eV_A}")
        self._set_up_sentinel(sentinel_every, sentinel_force_budget_eV_A, sentinel_action,
                              sentinel_fallback_policy)
        self._references: dict[bool, LowPrecisionMACECalculator] = {}  # by chunked
        if enable_cueq:
            if backend not in ("auto", "cuequivariance"):
                raise CalculatorSetupError(f"enable_cueq=True contradicts backend={backend!r}")
            backend = "cuequivariance"
        if compile_model not in ("auto", True, False):
            raise CalculatorSetupError(
                f"compile_model must be 'auto', True or False, got {compile_model!r}")
        if compile_mode is not None:
            compile_model = True
        torch_device = torch.device(device)
        if torch_device.type == "cuda" and not torch.cuda.is_available():
            raise CalculatorSetupError(f"device {device!r} requested but CUDA is not available")
        try:
            check_device_supports(self.policy, torch_device)
            check_edge_chunk_size(edge_chunk_size)
        except (RuntimeError, ValueError) as err:
            raise CalculatorSetupError(str(err)) from None
        self.backend = resolve_backend(backend, torch_device)
        if self.backend == "cuequivariance" and torch_device.type == "cuda" \
                and not cuequivariance_kernels_available():
            raise CalculatorSetupError(
                "backend='cuequivariance' on CUDA needs cuequivariance-ops-torch-cu12 or -cu13 "
                "(pip install 'mace_lpcalc[cuda12]' or '[cuda13]')")

        # Before the first conversion or kernel: the compilers read their cache directories once.
        self._disk_caches = use_disk_caches(torch_device)
        models = self._load(model_paths) if model_paths is not None else (
            list(models) if isinstance(models, (list, tuple)) else [models])
        # Hash the model as given, before any dtype or backend conversion, so every policy
        # reports the same hash for the same model.
        self._hashes = [model_hash(model) for model in models]
        # The sentinel's fp64 reference and a fallback are built from the models as given.
        self._model_sources = [copy.deepcopy(model) for model in models] \
            if self._builds_siblings else None
        self._setup = dict(device=device, mace_kwargs=kwargs)
        prepared, self.backend = models_on_backend(
            models, self.backend, dtype=self.policy.model_dtype, device_type=torch_device.type,
            auto=backend == "auto")
        saved_dtype = torch.get_default_dtype()
        try:
            super().__init__(models=prepared, device=device,
                             default_dtype=self.policy.model_dtype_name, **kwargs)
        except (ValueError, AssertionError) as err:
            raise CalculatorSetupError(f"mace's calculator refused the setup: {err}") from None
        finally:
            torch.set_default_dtype(saved_dtype)
        self.models = [apply_policy(model, self.policy) for model in self.models]
        self.known_numbers = frozenset(model_elements(self.models[0]))
        self._checked_numbers: np.ndarray | None = None
        self._verify_fast_path = bool(verify_fast_path)
        if fast_path == "auto":
            fast_path = torch_device.type == "cuda" or compile_model is True
        compile_required = compile_model is True
        if compile_model == "auto":  # wherever the fast path runs on a GPU and compiles the outputs
            compile_model = (bool(fast_path) and torch_device.type == "cuda"
                             and self.model_type == "MACE" and not self.compute_atomic_stresses)
        self.engines: list[MACEEngine] = []
        status = "off (fast_path=False)"
        if fast_path:
            try:
                self.engines = [self._build_engine(model, torch_device, skin_A, use_cuda_graph,
                                                   compile_model, compile_in_background,
                                                   pad_num_edges, edge_chunk_size)
                                for model in self.models]
                status = "on"
            except ValueError as err:
                if compile_required:
                    raise CalculatorSetupError(f"compile_model=True needs the fast path, "
                                               f"which cannot evaluate this model: {err}") from None
                status = self._step_aside(f"the fast path cannot evaluate this model: {err}")
        if compile_required and not self.engines:
            raise CalculatorSetupError("compile_model=True needs the fast path "
                                       "(fast_path=True or 'auto')")
        self.parameters.update(
            model_hash=self._hashes[0] if len(self._hashes) == 1 else self._hashes,
            policy=self.policy.name,
            policy_details=self.policy.as_dict(),
            backend=self.backend,
            device=str(torch_device),
            model_type=self.model_type,
            fast_path=bool(self.engines),
            fast_path_status=status,
            skin_A=skin_A if self.engines else None,
            compile_model=bool(compile_model),
            compile_in_background=bool(compile_model and compile_in_background),
            edge_chunk_size=edge_chunk_size if self.engines else None,
            compile_caches=self._disk_caches,
            versions=package_versions(),
            sentinel=self._sentinel_settings(),
        )

    @property
    def engine(self) -> MACEEngine | None:
        """The fast path's engine of the first (or only) model; None on mace's path."""
        return self.engines[0] if self.engines else None

    def _build_engine(self, model, device, skin_A, use_cuda_graph, compile_model,
                      compile_in_background, min_edge_capacity, edge_chunk_size) -> MACEEngine:
        # A compiled 16-bit call is checked for accuracy against the model without its
        # 16-bit operands (see mace_lpcalc.fastpath.compiled).
        reference_model = (copy_without_policy(model)
                           if compile_model and self.policy.reduced_dtypes else None)
        return MACEEngine(
            model, z_table_atomic_numbers=self.z_table.zs, r_max=self.r_max,
            device=device, skin_A=skin_A, use_cuda_graph=use_cuda_graph, head=self.head,
            model_type=self.model_type, compute_atomic_stresses=self.compute_atomic_stresses,
            min_edge_capacity=min_edge_capacity, compile_model=compile_model,
            compile_in_background=compile_in_background, reference_model=reference_model,
            edge_chunk_size=edge_chunk_size)

    def _step_aside(self, reason: str) -> str:
        """Stop using the fast path for good: warn once, record why, return the status."""
        self.engines = []
        status = f"off: {reason}; mace's path runs instead"
        warnings.warn(f"LowPrecisionMACECalculator: {status}", RuntimeWarning, stacklevel=3)
        if hasattr(self, "parameters"):
            self.parameters.update(fast_path=False, fast_path_status=status, skin_A=None)
        return status

    @staticmethod
    def _load(model_paths) -> list[torch.nn.Module]:
        if isinstance(model_paths, (str, Path)):
            matches = sorted(glob.glob(str(model_paths)))
            if not matches:
                raise CalculatorSetupError(f"MACE model file not found: {model_paths}")
            model_paths = matches
        try:
            return [load_model(path) for path in model_paths]
        except ModelLoadError as err:
            raise CalculatorSetupError(str(err)) from None

    def check_atoms(self, atoms) -> None:
        """Refuse structures the model cannot evaluate, naming the problem."""
        # MD repeats the same numbers at every step: check the elements only when they change.
        if not np.array_equal(atoms.numbers, self._checked_numbers):
            self._check_elements(atoms.numbers)
            self._checked_numbers = atoms.numbers.copy()
        positions = atoms.positions
        if not np.isfinite(positions).all():
            bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
            raise CalculationFailed(f"non-finite positions for atom(s) {bad[:10].tolist()}")
        periodic_rows = atoms.cell.array[atoms.pbc]
        if len(periodic_rows) and np.linalg.matrix_rank(periodic_rows, tol=1e-8) < len(periodic_rows):
            raise CalculatorSetupError(
                f"the cell vectors of the periodic directions (pbc={atoms.pbc.tolist()}) are "
                f"zero or linearly dependent: cell={atoms.cell.array.tolist()}")

    def _check_elements(self, numbers: np.ndarray) -> None:
        unknown = sorted(set(np.unique(numbers)) - self.known_numbers)
        if unknown:
            raise CalculatorSetupError(
                f"the model does not know element(s) {', '.join(chemical_symbols[z] for z in unknown)}; "
                f"it knows {', '.join(chemical_symbols[z] for z in sorted(self.known_numbers))}")

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        properties = properties or ["energy"]
        if self._auto_budget is not None:
            self._choose_policy(atoms, self._setup["device"])
        if self._delegate is not None:
            Calculator.calculate(self, atoms)
            self._delegate.calculate(self.atoms, properties, all_changes)
            self.results = dict(self._delegate.results)
        else:
            self._calculate_with_policy(atoms, properties, system_changes)
        if self.sentinel is not None:
            self._watch(properties)

    def _calculate_with_policy(self, atoms, properties, system_changes) -> None:
        Calculator.calculate(self, atoms)
        self.check_atoms(self.atoms)
        # mace builds batches and result tensors in torch's default dtype, which its
        # calculator sets process-wide at construction; ours sets it only while it calculates.
        with self._policy_scope():
            if self.engines:
                self._calculate_fast_or_step_aside(properties)
            if not self.engines:
                super().calculate(atoms, properties, system_changes)
        self._check_results()

    @contextlib.contextmanager
    def _policy_scope(self):
        """Hold the process-wide torch settings the policy needs while a calculation runs."""
        with _PROCESS_DEFAULTS_LOCK, policy_context(self.policy), \
                torch_tools.default_dtype(self.policy.model_dtype):
            yield

    def _sibling(self, policy: str, compile_model=None, *, chunked=False):
        """The same model under ``policy``: fp64 is the reference (mace's path and e3nn;
        ``chunked``: the fast path, for boxes mace's path cannot fit), built once; any other
        runs as this one would, compiled if this one is (False: a trial, not compiled)."""
        if policy == "fp64" and chunked in self._references:
            return self._references[chunked]
        mace_path = policy == "fp64" and not chunked
        if compile_model is None:
            compile_model = bool(self.parameters.get("compile_model")) and policy != "fp64"
        sibling = LowPrecisionMACECalculator(  # a chunked reference holds no graph's memory
            models=[copy.deepcopy(model) for model in self._model_sources],
            device=self._setup["device"], policy=policy, use_cuda_graph=not chunked and "auto",
            backend="e3nn" if mace_path else self.backend,
            fast_path=False if mace_path else chunked or "auto", compile_model=compile_model,
            edge_chunk_size=self.parameters["edge_chunk_size"] if self.engines else "auto",
            max_force_eV_A=self.max_force_eV_A, **self._setup["mace_kwargs"])
        if policy == "fp64":
            self._references[chunked] = sibling
        return sibling

    def _atoms_to_batch(self, atoms):
        # For mace's other entry points (get_descriptors, get_hessian), which build their
        # batch here, in torch's default dtype, as calculate does.
        with _PROCESS_DEFAULTS_LOCK, torch_tools.default_dtype(self.policy.model_dtype):
            return super()._atoms_to_batch(atoms)

    def _calculate_fast_or_step_aside(self, properties) -> None:
        try:
            self._calculate_fast(properties)
        except torch.cuda.OutOfMemoryError:
            raise  # mace's path would not fit either
        except Exception as err:  # noqa: BLE001 -- a valid model must not crash the calculator
            self._step_aside(f"the fast path failed ({type(err).__name__}: {err})")
            return
        if self._verify_fast_path:
            self._verify_fast_path = False
            if any(engine.edge_chunking.last_chunk_edges for engine in self.engines):
                self.parameters["fast_path_status"] = ("on; not checked against mace's path, "
                                                       "whose unchunked call would not fit")
                return
            fast = self.results
            MACECalculator.calculate(self, self.atoms.copy(), properties)
            deviation = largest_deviation(fast, self.results)
            tolerance = fast_path_tolerance(self.policy)
            if not deviation <= tolerance:  # NaN too
                self._step_aside(f"at the first call it differed from mace's path by "
                                 f"{deviation:.2e} (relative; tolerance {tolerance:g})")
                return
            self.results = fast
            self.parameters["fast_path_status"] = (
                f"on; at the first call within {deviation:.1e} (relative) of mace's path")

    def _calculate_fast(self, properties) -> None:
        """Fill ``self.results`` from the engines, with mace's calculator's keys, units and dtypes."""
        atoms = self.atoms
        # A barostat asks for the stress right after the forces of every step; computing it
        # whenever the previous call wanted it avoids a second evaluation per step, while
        # NVT/NVE runs that log the stress now and then pay for it only near those steps.
        wanted = "stress" in properties or getattr(self, "_stress_asked_last_call", False)
        self._stress_asked_last_call = "stress" in properties
        # The fixed charges of the dipole models' baseline, read as mace's calculator reads
        # them: the "charges" entry of its arrays_keys names the atoms array (with mace's
        # defaults there is none, and the charges are zero).
        charges_array = self.arrays_keys.get("charges")
        charges = atoms.arrays.get(charges_array) if charges_array else None
        cell = cell_as_mace_sees_it(atoms.cell.array, atoms.pbc, atoms.positions, self.r_max)
        outs = [engine.compute(atoms.positions, atoms.numbers, cell, atoms.pbc,
                               compute_stress=wanted, charges=charges)
                for engine in self.engines]
        self.results = results_like_mace(outs, self.energy_units_to_eV, self.length_units_to_A)

    def _check_results(self, results: dict | None = None) -> None:
        check_results(self.results if results is None else results, self.policy.name,
                      self.max_force_eV_A)

    def precision_report(self, atoms=None) -> list[dict]:
        """Which dtype each module actually ran in, measured by forward hooks on a real call.

        Returns one row per leaf-level computation that ran: module name, type, the dtypes
        of its floating-point inputs, outputs and parameters. Rows ``output:energy`` and
        ``output:forces`` give the dtypes of the energy sum and of the autograd reduction.
        """
        atoms = atoms if atoms is not None else self.atoms
        if atoms is None:
            raise ValueError("precision_report needs atoms (none given and none calculated yet)")
        return dtype_report(self.models[0], lambda: self.calculate(
            atoms.copy(), ["energy", "forces"], all_changes))
