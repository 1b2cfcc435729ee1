"""A run's checkpoint file: what resuming needs, written atomically.

A checkpoint (``run.checkpoint.npz`` beside ``run.h5``, :func:`checkpoint_path`) holds the
protocol's name, its settings, the model hash, the step, the positions, momenta, masses,
cell and periodicity, and the integrator's internal state (``state/<key>`` arrays,
random generator included). It is a plain ``.npz`` read without pickle; each save
replaces the previous one through a fsynced temporary file, so a run killed while writing
it leaves the previous checkpoint intact. :class:`~mace_lpcalc.md.base.MDProtocol`
decides when to write one and checks, on resume, that it fits the run.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
from ase import Atoms

CHECKPOINT_FORMAT = "mace_lpcalc.checkpoint"


def checkpoint_path(trajectory_path) -> Path:
    """Where the checkpoint of the run writing ``trajectory_path`` lives."""
    path = Path(trajectory_path)
    return path.with_name(path.stem + ".checkpoint.npz")


@dataclasses.dataclass
class Checkpoint:
    """A run's resumable state at ``step``."""

    protocol: str
    settings: dict
    model_hash: str
    step: int
    atoms: Atoms
    dynamics_state: dict

    def save(self, path) -> None:
        """Write atomically: a fsynced temporary file renamed over ``path``."""
        arrays = {"format": CHECKPOINT_FORMAT, "protocol": self.protocol,
                  "settings": json.dumps(self.settings), "model_hash": self.model_hash,
                  "step": self.step, "numbers": self.atoms.numbers,
                  "positions": self.atoms.positions, "momenta": self.atoms.get_momenta(),
                  "masses": self.atoms.get_masses(), "cell": np.array(self.atoms.cell),
                  "pbc": self.atoms.pbc}
        arrays.update({f"state/{key}": value for key, value in self.dynamics_state.items()})
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        path = Path(path)
        temporary = path.with_name(path.name + ".tmp")
        with open(temporary, "wb") as handle:
            handle.write(buffer.getvalue())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)

    @classmethod
    def load(cls, path) -> Checkpoint:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint {path} to resume from")
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["format"]) != CHECKPOINT_FORMAT:
                    raise ValueError("wrong format marker")
                atoms = Atoms(numbers=data["numbers"], positions=data["positions"],
                              cell=data["cell"], pbc=data["pbc"], masses=data["masses"],
                              momenta=data["momenta"])
                state = {key.removeprefix("state/"): data[key] for key in data.files
                         if key.startswith("state/")}
                return cls(protocol=str(data["protocol"]),
                           settings=json.loads(str(data["settings"])),
                           model_hash=str(data["model_hash"]), step=int(data["step"]),
                           atoms=atoms, dynamics_state=state)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            raise ValueError(f"{path} is not a readable mace_lpcalc checkpoint "
                             f"({type(err).__name__}: {err})") from err


def settings_changes(current: dict, saved: dict, may_change) -> list[str]:
    """The settings (besides those in ``may_change``) whose values differ between
    ``current`` and the ``saved`` ones of a checkpoint, as ``name = value (checkpoint:
    value)``."""
    return [f"{key} = {current.get(key)!r} (checkpoint: {saved.get(key)!r})"
            for key in sorted(set(current) | set(saved))
            if key not in may_change and current.get(key) != saved.get(key)]
