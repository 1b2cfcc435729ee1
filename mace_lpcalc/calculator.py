"""``LowPrecisionMACECalculator``: mace's ASE calculator with named precision policies.

Swap one line of an ASE script::

    from mace_lpcalc import LowPrecisionMACECalculator
    atoms.calc = LowPrecisionMACECalculator(model_paths="water.model", device="cuda",
                                            policy="fp32-linear-bf16")

Everything else (integrators, optimizers, ``atoms.get_forces()``) is unchanged.
"""

from __future__ import annotations

import glob
import platform
from importlib import metadata
from pathlib import Path

import mace  # noqa: F401  -- before e3nn
import numpy as np
import torch
from ase.calculators.calculator import (CalculationFailed, Calculator, CalculatorSetupError,
                                        all_changes)
from ase.data import chemical_symbols
from ase.stress import full_3x3_to_voigt_6_stress
from mace.calculators.mace import MACECalculator

from .engine import DEFAULT_SKIN_A, MACEEngine

from .models import ModelLoadError, load_model, model_elements, model_hash
from .policies import (apply_policy, check_device_supports, check_single_backend,
                       copy_without_policy, get_policy, model_backend,
                       policy_context)

BACKENDS = ("auto", "e3nn", "cuequivariance")
#: Forces above this (eV/Å) on any atom mean the model has left its domain; MD must stop.
EXPLODING_FORCE_EV_A = 1.0e3


def cuequivariance_kernels_available() -> bool:
    """True when cuEquivariance's compiled CUDA kernels are importable."""
    try:
        import cuequivariance_ops_torch  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn ``"auto"`` into a concrete backend: cuEquivariance on CUDA when its kernels import."""
    if backend not in BACKENDS:
        raise CalculatorSetupError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    if backend == "auto":
        use_cueq = device.type == "cuda" and cuequivariance_kernels_available()
        return "cuequivariance" if use_cueq else "e3nn"
    return backend


def _convert_backend(model: torch.nn.Module, backend: str, device: str) -> torch.nn.Module:
    """Convert a whole model between e3nn and cuEquivariance (mace's own converters)."""
    if model_backend(model) == backend:
        return model
    saved_dtype = torch.get_default_dtype()  # mace's converters change the global default
    try:
        if backend == "cuequivariance":
            from mace.cli.convert_e3nn_cueq import run as convert
        else:
            from mace.cli.convert_cueq_e3nn import run as convert
        return convert(model, device=device).to(device)
    finally:
        torch.set_default_dtype(saved_dtype)


def package_versions() -> dict[str, str]:
    """Versions of Python and of every package a result depends on, for provenance."""
    from mace_lpcalc import __version__
    versions = {"python": platform.python_version(), "mace_lpcalc": __version__}
    for package in ("mace-torch", "torch", "e3nn", "cuequivariance-torch",
                    "cuequivariance-ops-torch-cu12", "cuequivariance-ops-torch-cu13", "ase",
                    "numpy", "h5py", "mdtraj", "vesin-torch"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


class LowPrecisionMACECalculator(MACECalculator):
    """A MACE ASE calculator that runs a named precision policy on e3nn or cuEquivariance.

    Args:
        model_paths: path, glob or list of paths of MACE ``.model`` files (a committee if
            several). Loading unpickles the file, which runs code: load only trusted files.
        models: model object(s), instead of ``model_paths``. They are converted in place.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        policy: a name from :data:`mace_lpcalc.policies.POLICIES` or a ``PrecisionPolicy``.
        backend: ``"e3nn"``, ``"cuequivariance"`` or ``"auto"`` (cuEquivariance on CUDA when
            its kernels are installed).
        fast_path: evaluate through :class:`mace_lpcalc.engine.MACEEngine` (persistent device
            state, GPU neighbour list, CUDA graphs). ``"auto"``: on CUDA, or with
            ``compile_model``, for a single model.
            ``False`` uses mace's own per-call graph construction.
        skin_A: Verlet skin of the fast path's neighbour list, Å. It does not change the
            results (the model sees only edges inside the cutoff), only how often the
            list is rebuilt.
        use_cuda_graph: ``"auto"`` (on CUDA), True or False; fast path only.
        compile_model: fuse each energy+forces(+stress) call with TorchInductor (fast path
            only; see :mod:`mace_lpcalc.compiled`). Each new system size compiles (tens of
            seconds on a cold cache, a few on a warm one); results are checked against the
            eager model, which takes over with a warning if compilation or the check fails.
        compile_in_background: compile while MD runs on the uncompiled fast path, and
            switch when ready (``calc.engine.compiled.wait()`` waits for it); False makes
            the first call at each size compile.
        **kwargs: passed to mace's ``MACECalculator`` (``head``, ``energy_units_to_eV``, ...).
    """

    def __init__(self, model_paths=None, models=None, device: str = "cpu",
                 policy="fp32", backend: str = "auto", fast_path="auto", skin_A: float = DEFAULT_SKIN_A,
                 use_cuda_graph="auto", compile_model: bool = False,
                 compile_in_background: bool = True, **kwargs):
        try:
            self.policy = get_policy(policy)
        except ValueError as err:
            raise CalculatorSetupError(str(err)) from None
        if (model_paths is None) == (models is None):
            raise CalculatorSetupError("give exactly one of model_paths or models")
        torch_device = torch.device(device)
        if torch_device.type == "cuda" and not torch.cuda.is_available():
            raise CalculatorSetupError(f"device {device!r} requested but CUDA is not available")
        try:
            check_device_supports(self.policy, torch_device)
        except RuntimeError as err:
            raise CalculatorSetupError(str(err)) from None
        self.backend = resolve_backend(backend, torch_device)
        if self.backend == "cuequivariance" and torch_device.type == "cuda" \
                and not cuequivariance_kernels_available():
            raise CalculatorSetupError(
                "backend='cuequivariance' on CUDA needs cuequivariance-ops-torch-cu12 or -cu13 "
                "(pip install 'mace_lpcalc[cuda12]' or '[cuda13]')")

        models = self._load(model_paths) if model_paths is not None else (
            list(models) if isinstance(models, (list, tuple)) else [models])
        # Hash the model as given, before any dtype or backend conversion, so every policy
        # reports the same hash for the same model.
        self._hashes = [model_hash(model) for model in models]
        prepared = []
        for model in models:
            try:
                check_single_backend(model)
            except ValueError as err:
                raise CalculatorSetupError(str(err)) from None
            prepared.append(_convert_backend(model.to(self.policy.model_dtype), self.backend,
                                             torch_device.type))
        saved_dtype = torch.get_default_dtype()
        try:
            super().__init__(models=prepared, device=device,
                             default_dtype=self.policy.model_dtype_name, **kwargs)
        finally:
            torch.set_default_dtype(saved_dtype)
        self.models = [apply_policy(model, self.policy) for model in self.models]
        self.known_numbers = frozenset(model_elements(self.models[0]))
        self._checked_numbers: np.ndarray | None = None
        if fast_path == "auto":
            fast_path = (torch_device.type == "cuda" or compile_model) and len(self.models) == 1
        if fast_path and len(self.models) > 1:
            raise CalculatorSetupError("the fast path evaluates one model; committees need "
                                       "fast_path=False")
        # A compiled 16-bit call is checked for accuracy against the model without its
        # 16-bit operands (see mace_lpcalc.compiled).
        reference_model = (copy_without_policy(self.models[0])
                           if compile_model and fast_path and self.policy.reduced_dtypes
                           else None)
        self.engine = MACEEngine(
            self.models[0], z_table_atomic_numbers=self.z_table.zs, r_max=self.r_max,
            device=torch_device, skin_A=skin_A, use_cuda_graph=use_cuda_graph,
            head=self.head, compile_model=compile_model,
            compile_in_background=compile_in_background,
            reference_model=reference_model) if fast_path else None
        if compile_model and self.engine is None:
            raise CalculatorSetupError("compile_model=True needs the fast path "
                                       "(fast_path=True or 'auto', and a single model)")
        self.parameters.update(
            model_hash=self._hashes[0] if len(self._hashes) == 1 else self._hashes,
            policy=self.policy.name,
            policy_details=self.policy.as_dict(),
            backend=self.backend,
            device=str(torch_device),
            fast_path=self.engine is not None,
            skin_A=skin_A if self.engine is not None else None,
            compile_model=bool(compile_model),
            compile_in_background=bool(compile_model and compile_in_background),
            versions=package_versions(),
        )

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
        if atoms.pbc.any() and abs(atoms.cell.volume) < 1e-9:
            raise CalculatorSetupError("periodic structure with a zero-volume cell")

    def _check_elements(self, numbers: np.ndarray) -> None:
        unknown = sorted(set(np.unique(numbers)) - self.known_numbers)
        if unknown:
            raise CalculatorSetupError(
                f"the model does not know element(s) {', '.join(chemical_symbols[z] for z in unknown)}; "
                f"it knows {', '.join(chemical_symbols[z] for z in sorted(self.known_numbers))}")

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        Calculator.calculate(self, atoms)
        self.check_atoms(self.atoms)
        with policy_context(self.policy):
            if self.engine is None:
                super().calculate(atoms, properties, system_changes)
            else:
                self._calculate_fast(properties or ["energy"])
        self._check_results()

    def _calculate_fast(self, properties) -> None:
        """Fill ``self.results`` from the engine, with mace's calculator's keys and units."""
        atoms = self.atoms
        # A barostat asks for the stress right after the forces of every step; computing it
        # whenever the previous call wanted it avoids a second evaluation per step, while
        # NVT/NVE runs that log the stress now and then pay for it only near those steps.
        wanted = "stress" in properties or getattr(self, "_stress_asked_last_call", False)
        self._stress_asked_last_call = "stress" in properties
        compute_stress = wanted and atoms.pbc.all()
        out = self.engine.compute(atoms.positions, atoms.numbers, atoms.cell.array, atoms.pbc,
                                  compute_stress=compute_stress)
        energy_unit = self.energy_units_to_eV
        force_unit = energy_unit / self.length_units_to_A
        self.results = {
            "energy": out["energy"] * energy_unit,
            "free_energy": out["energy"] * energy_unit,
            "forces": out["forces"] * force_unit,
            "energies": out["node_energy"] * energy_unit,
            "node_energy": (out["node_energy"] - out["node_e0"]) * energy_unit,
        }
        if compute_stress:
            self.results["stress"] = full_3x3_to_voigt_6_stress(
                out["stress"] * energy_unit / self.length_units_to_A ** 3)

    def _check_results(self) -> None:
        energy, forces = self.results.get("energy"), self.results.get("forces")
        if energy is not None and not np.isfinite(energy):
            raise CalculationFailed(f"MACE returned a non-finite energy ({energy}) "
                                    f"under policy {self.policy.name!r}")
        if forces is not None:
            if not np.isfinite(forces).all():
                bad = np.flatnonzero(~np.isfinite(forces).all(axis=1))
                raise CalculationFailed(f"MACE returned non-finite forces on atom(s) "
                                        f"{bad[:10].tolist()} under policy {self.policy.name!r}")
            largest = float(np.sqrt(np.einsum("ij,ij->i", forces, forces).max(initial=0.0)))
            if largest > EXPLODING_FORCE_EV_A:
                raise CalculationFailed(
                    f"exploding forces: max |F| = {largest:.3g} eV/Å exceeds "
                    f"{EXPLODING_FORCE_EV_A:g} eV/Å (atoms too close or the model is out of domain)")

    def precision_report(self, atoms=None) -> list[dict]:
        """Which dtype each module actually ran in, measured by forward hooks on a real call.

        Returns one row per leaf-level computation that ran: module name, type, the dtypes
        of its floating-point inputs, outputs and parameters. Rows ``output:energy`` and
        ``output:forces`` give the dtypes of the energy sum and of the autograd reduction.
        """
        atoms = atoms if atoms is not None else self.atoms
        if atoms is None:
            raise ValueError("precision_report needs atoms (none given and none calculated yet)")
        model = self.models[0]
        rows: dict[str, dict] = {}
        handles = []

        def floating_dtypes(values):
            found = []
            for value in values if isinstance(values, (tuple, list)) else (values,):
                if torch.is_tensor(value) and value.is_floating_point():
                    found.append(str(value.dtype).replace("torch.", ""))
            return sorted(set(found))

        def record(name):
            def hook(module, inputs, output):
                rows.setdefault(name, {
                    "module": name,
                    "type": type(module).__name__,
                    "input_dtypes": floating_dtypes(inputs),
                    "output_dtypes": floating_dtypes(output),
                    "parameter_dtypes": sorted({str(p.dtype).replace("torch.", "")
                                                for p in module.parameters(recurse=False)}),
                })
            return hook

        def record_outputs(module, inputs, output):
            for quantity in ("energy", "forces", "stress"):
                if torch.is_tensor(output.get(quantity)):
                    rows[f"output:{quantity}"] = {
                        "module": f"output:{quantity}", "type": "model output",
                        "input_dtypes": [], "parameter_dtypes": [],
                        "output_dtypes": floating_dtypes(output[quantity])}

        for name, module in model.named_modules():
            if name and not isinstance(module, (torch.nn.ModuleList, torch.jit.ScriptModule)):
                handles.append(module.register_forward_hook(record(name)))
        handles.append(model.register_forward_hook(record_outputs))
        try:
            self.calculate(atoms.copy(), ["energy", "forces"], all_changes)
        finally:
            for handle in handles:
                handle.remove()
        return list(rows.values())
