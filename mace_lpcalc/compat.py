"""The one door to other packages' private and version-specific interfaces.

Everything the package uses that its authors did not publish as stable — torch's
compiler internals, e3nn's dense layer, mace's edge geometry, its fused-convolution
marker and batch construction, cuEquivariance's kernel dtype table, ASE's MTK state —
is reached through a name here, and :data:`SHIMS` lists them so a test can check each
still resolves. Importing this module checks the installed versions against
:data:`TESTED_VERSIONS` and fails with a message naming them; set
``MACE_LPCALC_UNTESTED_VERSIONS=1`` to run anyway (a warning instead).

It also fixes the import order the other modules rely on: mace before e3nn.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from importlib import metadata

from packaging.version import Version

#: Oldest and newest release tested, per distribution, compared on the given components.
TESTED_VERSIONS = {
    "torch": ("2.11", "2.13"),
    "mace-torch": ("0.3.15", "0.3.16"),
    "e3nn": ("0.4.4", "0.4.4"),
    "ase": ("3.29", "3.29"),
    "cuequivariance-torch": ("0.13", "0.13"),
}
UNTESTED_VERSIONS_VARIABLE = "MACE_LPCALC_UNTESTED_VERSIONS"


def untested_versions(installed: dict[str, str]) -> list[str]:
    """``"name X (tested: A-B)"`` for each installed distribution outside its tested range."""
    problems = []
    for name, (oldest, newest) in TESTED_VERSIONS.items():
        if installed.get(name) is None:
            continue
        width = len(Version(oldest).release)
        release = Version(installed[name]).release[:width]
        if not Version(oldest).release <= release <= Version(newest).release:
            span = oldest if oldest == newest else f"{oldest}-{newest}"
            problems.append(f"{name} {installed[name]} (tested: {span})")
    return problems


def check_versions(installed: dict[str, str] | None = None) -> None:
    """Raise ImportError naming every distribution outside its tested range."""
    if installed is None:
        installed = {}
        for name in TESTED_VERSIONS:
            try:
                installed[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                pass
    problems = untested_versions(installed)
    if not problems:
        return
    message = ("mace_lpcalc reads internals of its dependencies and has not been tested "
               f"with {', '.join(problems)}; install tested versions, or set "
               f"{UNTESTED_VERSIONS_VARIABLE}=1 to run anyway")
    if os.environ.get(UNTESTED_VERSIONS_VARIABLE) == "1":
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    else:
        raise ImportError(message)


check_versions()

with warnings.catch_warnings():
    # mace sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD at import (its model files are full
    # pickles); e3nn 0.4.4 then loads its own constants (e3nn/o3/_wigner.py) with a bare
    # torch.load, and torch >= 2.4 warns about the variable. Only that one warning, at
    # that one load, is silenced; it goes once e3nn passes weights_only there.
    warnings.filterwarnings("ignore", message="Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY",
                            category=UserWarning, module=r"e3nn\.o3\._wigner")
    import mace  # noqa: F401  -- must precede e3nn: it sets the torch.load flag e3nn needs
    import e3nn.o3  # noqa: F401

import numpy as np  # noqa: E402
import torch  # noqa: E402
from e3nn.nn._fc import _Layer as E3nnDenseLayer  # noqa: E402
from mace.calculators.mace import MACECalculator  # noqa: E402
from mace.modules import utils as mace_modules_utils  # noqa: E402
from mace.modules.wrapper_ops import with_cueq_conv_fusion  # noqa: E402
from torch._guards import TracingContext, tracing  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402
from torch.fx.experimental.symbolic_shapes import ShapeEnv  # noqa: E402

#: mace's edge geometry, which its ``prepare_graph`` looks up in its module each call.
MACE_EDGE_GEOMETRY = (mace_modules_utils, "get_edge_vectors_and_lengths")
#: The attribute mace's ``with_cueq_conv_fusion`` leaves on a fused convolution.
CUEQ_FUSION_MARKER = "original_forward"
#: cuEquivariance kernel attributes the 16-bit radial hand-over rewrites or reads.
CUEQ_KERNEL_DTYPE_FIELDS = ("dtypes", "math_dtype", "num_inputs", "num_outputs")
#: mace's interaction blocks whose forward hands ``conv_tp_weights``' output, times the
#: cutoff where there is one, to ``conv_tp`` and nowhere else: the edge-chunked
#: convolution (:mod:`mace_lpcalc.fastpath.edge_chunks`) relies on that.
MACE_BLOCKS_MODULE = "mace.modules.blocks"
WEIGHTS_TO_CONVOLUTION_BLOCKS = (
    "RealAgnosticInteractionBlock", "RealAgnosticResidualInteractionBlock",
    "RealAgnosticDensityInteractionBlock", "RealAgnosticDensityResidualInteractionBlock",
    "RealAgnosticAttResidualInteractionBlock", "RealAgnosticResidualNonLinearInteractionBlock")
#: The pure-Python group theory behind a cuEquivariance symmetric contraction, as (module,
#: function) looked up at each call: its descriptor (cuEquivariance's, run by a cuEquivariance
#: model's constructor) and the projection from e3nn's weights (mace's, run by its converter).
SYMMETRIC_CONTRACTION_DESCRIPTORS = (
    ("cuequivariance.group_theory.experimental.mace.symmetric_contractions",
     "_symmetric_contraction_cached"),
    ("mace.tools.cg_cueq_tools", "symmetric_contraction_cached"))
#: ASE's IsotropicMTKNPT state: (owner path, attribute) pairs, owner "" = the dynamics.
MTK_STATE = (("", "_cell0"), ("", "_volume0"), ("", "_eps"), ("", "_p_eps"),
             ("_thermostat", "_eta"), ("_thermostat", "_p_eta"),
             ("_barostat", "_xi"), ("_barostat", "_p_xi"))


def _inductor():
    import torch._inductor  # its import is slow and only compilation needs it

    return torch._inductor


def inductor_compile(graph: torch.fx.GraphModule, example_inputs: list):
    """TorchInductor on an already flat ATen graph (no TorchDynamo)."""
    return _inductor().compile(graph, example_inputs)


def inductor_cache_hits() -> int:
    """Compilations inductor has served from its on-disk FX graph cache in this process."""
    from torch._dynamo.utils import counters  # replaced now and then: looked up each time

    return counters["inductor"]["fxgraph_cache_hit"]


def inductor_cache_dir() -> str:
    """The directory inductor caches in now (resolving, and recording, its default)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()


def inductor_default_cache_dir() -> str:
    """The temporary directory inductor caches in when no variable names one."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return default_cache_dir()


def mace_batch(calculator: MACECalculator, atoms):
    """mace's own graph construction for ``atoms`` (its calculator's ``_atoms_to_batch``)."""
    return calculator._atoms_to_batch(atoms)


def mtk_state(dynamics) -> dict:
    """IsotropicMTKNPT's internal variables by their public-looking names (``eta``, ...)."""
    return {attribute.lstrip("_"): getattr(_owner(dynamics, path), attribute)
            for path, attribute in MTK_STATE}


def set_mtk_state(dynamics, state: dict) -> None:
    """Restore what :func:`mtk_state` returned (floats stay floats, arrays arrays)."""
    for path, attribute in MTK_STATE:
        owner, value = _owner(dynamics, path), np.array(state[attribute.lstrip("_")])
        setattr(owner, attribute, float(value) if value.ndim == 0 else value)


def _owner(dynamics, path: str):
    return getattr(dynamics, path) if path else dynamics


def _resolves_mtk_state() -> bool:
    from ase import Atoms
    from ase.md.nose_hoover_chain import IsotropicMTKNPT

    atoms = Atoms("H", cell=np.eye(3) * 5.0, pbc=True)
    dynamics = IsotropicMTKNPT(atoms, 1.0, temperature_K=300.0, pressure_au=0.0,
                               tdamp=100.0, pdamp=1000.0)
    return len(mtk_state(dynamics)) == len(MTK_STATE)


#: The operator sequence of ASE's ``IsotropicMTKNPT.step``, which
#: :class:`mace_lpcalc.md.mtk.LeanIsotropicMTKNPT` follows with its own operators.
MTK_STEP_SEQUENCE = (
    "_barostat.integrate_nhc_baro", "_thermostat.integrate_nhc", "_integrate_p_cell",
    "_integrate_p", "_integrate_q", "_integrate_q_cell", "_integrate_p", "_integrate_p_cell",
    "_thermostat.integrate_nhc", "_barostat.integrate_nhc_baro", "_update_atoms")


def _mtk_step_unchanged() -> bool:
    import inspect
    import re

    from ase.md.nose_hoover_chain import IsotropicMTKNPT

    calls = re.findall(r"self\.(_[\w.]+)\(", inspect.getsource(IsotropicMTKNPT.step))
    return tuple(calls) == MTK_STEP_SEQUENCE


def _resolves_cueq_kernel_fields() -> bool:
    """cuEquivariance's uniform_1d kernel still sets the dtype table in its constructor.

    Read from its source: building one needs the CUDA ops library.
    """
    import inspect
    import re

    from cuequivariance_torch.primitives.segmented_polynomial_uniform_1d import (
        SegmentedPolynomialFromUniform1dJit)

    source = inspect.getsource(SegmentedPolynomialFromUniform1dJit.__init__)
    assigned = set(re.findall(r"self\.(\w+)\s*=", source))
    return set(CUEQ_KERNEL_DTYPE_FIELDS) <= assigned


@functools.cache
def weights_reach_only_the_convolution() -> bool:
    """Every line of those blocks' forwards that names ``tp_weights`` is one of the three
    the edge-chunked convolution expects (made, scaled by the cutoff, convolved)."""
    import importlib
    import inspect
    import re

    expected = re.compile(r"tp_weights = self\.conv_tp_weights\(\w+\)"
                          r"|tp_weights = tp_weights \* cutoff"
                          r"|.*self\.conv_tp\(\w+, edge_attrs, tp_weights, edge_index\)"
                          r"|\w+\[edge_index\[0\]\], edge_attrs, tp_weights")
    blocks = importlib.import_module(MACE_BLOCKS_MODULE)
    for name in WEIGHTS_TO_CONVOLUTION_BLOCKS:
        lines = [line.strip() for line in inspect.getsource(getattr(blocks, name).forward)
                 .splitlines() if re.search(r"\btp_weights\b", line)]
        if len(lines) != 4 or not all(expected.fullmatch(line) for line in lines):
            return False
    return True


#: Every shim, by name, with a check that it still resolves in the installed versions.
SHIMS = {
    "torch._inductor.compile": lambda: callable(_inductor().compile),
    "torch._dynamo.utils.counters (inductor cache hits)": lambda: inductor_cache_hits() >= 0,
    "torch._inductor cache_dir_utils.default_cache_dir": lambda: bool(inductor_default_cache_dir()),
    "torch._guards.TracingContext/tracing": lambda: callable(tracing) and TracingContext,
    "torch._subclasses.fake_tensor.FakeTensorMode": lambda: FakeTensorMode is not None,
    "torch.fx.experimental make_fx/ShapeEnv": lambda: callable(make_fx) and ShapeEnv,
    "e3nn.nn._fc._Layer": lambda: issubclass(E3nnDenseLayer, torch.nn.Module),
    "mace.modules.utils.get_edge_vectors_and_lengths":
        lambda: callable(getattr(*MACE_EDGE_GEOMETRY)),
    "mace with_cueq_conv_fusion": lambda: callable(with_cueq_conv_fusion),
    "mace MACECalculator._atoms_to_batch": lambda: callable(MACECalculator._atoms_to_batch),
    "cuequivariance kernel dtype fields": _resolves_cueq_kernel_fields,
    "mace blocks: conv_tp_weights reach only conv_tp": weights_reach_only_the_convolution,
    "cuequivariance/mace symmetric-contraction descriptors": lambda: all(
        callable(getattr(importlib.import_module(module), name))
        for module, name in SYMMETRIC_CONTRACTION_DESCRIPTORS),
    "ase IsotropicMTKNPT state": _resolves_mtk_state,
    "ase IsotropicMTKNPT.step sequence (the lean MTK integrator)": _mtk_step_unchanged,
}
