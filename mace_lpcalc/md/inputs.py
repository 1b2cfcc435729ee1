"""What a run starts from, each checked before the MD loop starts: the structure file,
the MACE calculator its settings name, and a writable output directory.

Every refusal names the file or directory it concerns, so the command line can report it
in one line (:mod:`.cli`).
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import ase.io
from ase import Atoms

from mace_lpcalc.calculator import LowPrecisionMACECalculator
from mace_lpcalc.models import build_tiny_model, default_model_path

if TYPE_CHECKING:  # base imports this module, so a run-time import would be circular
    from mace_lpcalc.md.base import MDSettings


def read_structure(path) -> Atoms:
    """Read the last image of a structure file, naming the file in every error."""
    path = Path(path)
    if not str(path) or not path.is_file():
        raise FileNotFoundError(f"structure file not found: {path}")
    try:
        atoms = ase.io.read(path)
    except Exception as err:  # noqa: BLE001 -- ase.io raises many types for bad files
        raise ValueError(f"cannot read structure file {path}: "
                         f"{type(err).__name__}: {err}") from err
    if not isinstance(atoms, Atoms) or len(atoms) == 0:
        raise ValueError(f"structure file {path} holds no atoms")
    if atoms.constraints:
        raise ValueError(f"structure file {path} carries constraints, which the protocols "
                         "do not support")
    return atoms


#: The protocols' compile_model setting's values, and the calculator's ``compile_model``
#: for each.
COMPILE_MODEL_VALUES = {"auto": "auto", "on": True, "off": False}


def build_calculator(settings: MDSettings) -> LowPrecisionMACECalculator:
    """The MACE calculator a run uses; prints which model it loaded."""
    common = {"device": settings.device, "policy": settings.policy,
              "backend": settings.backend, "compile_model": COMPILE_MODEL_VALUES[settings.compile_model],
              "max_force_eV_A": settings.max_force_eV_A,
              "auto_force_budget_eV_A": settings.auto_force_budget_eV_A,
              "sentinel_every": settings.sentinel_every,
              "sentinel_force_budget_eV_A": settings.sentinel_force_budget_eV_A,
              "sentinel_action": settings.sentinel_action,
              "sentinel_fallback_policy": settings.sentinel_fallback_policy}
    model_path = settings.model or default_model_path()
    if model_path is not None:
        print(f"model: {model_path}", file=sys.stderr)
        return LowPrecisionMACECalculator(model_paths=str(model_path), **common)
    print("model: tiny random-weight MACE built in code (no shipped model found; "
          "its forces have no physical meaning)", file=sys.stderr)
    return LowPrecisionMACECalculator(models=build_tiny_model(), **common)


def prepare_output_directory(out: Path) -> None:
    """Create the directory of ``out`` if needed; refuse one that cannot be written to,
    before any expensive set-up."""
    blocking = next((folder for folder in (out.parent, *out.parent.parents)
                     if folder.exists() and not folder.is_dir()), None)
    if blocking is not None:
        raise NotADirectoryError(errno.ENOTDIR, f"cannot write {out}: {blocking} is a file, "
                                                "not a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(err.errno, f"cannot create the output directory of {out}: "
                                 f"{err.strerror}") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, f"the output directory {out.parent} is not "
                                            "writable")
