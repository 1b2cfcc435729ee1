"""What every MD protocol shares: settings, the calculator, the trajectory, checkpoints.

An ensemble (:mod:`.nvt`, :mod:`.npt`, :mod:`.nve`) only builds its ASE integrator and
says how to save and restore that integrator's internal state; :class:`MDProtocol`
does the rest:

1. read the structure (or the checkpoint, when resuming) and check it,
2. build the calculator (:func:`build_calculator`) and evaluate the first forces,
   so a bad structure or an unknown element fails before any file is written,
3. log a frame every ``log_every`` steps to the trajectory (:mod:`mace_lpcalc.md.trajectory`),
   stopping with ``CalculationFailed`` at the first non-finite or exploding force,
4. write a checkpoint every ``checkpoint_every`` steps, every ``checkpoint_every_s``
   seconds of wall time, and at the end,
5. report progress (:mod:`.progress`): a bar on a terminal, plain lines in a log file.

A checkpoint (``run.checkpoint.npz`` beside ``run.h5``, replaced atomically) holds the
positions, momenta, cell, step and the integrator's internal state, random generator
included, so a run killed at any moment resumes with ``resume=True`` exactly where an
uninterrupted run would be (bit for bit where the calculator is deterministic, as on
CPU; GPU reductions may differ in the last bits): the trajectory is cut back to the
checkpoint's step and the frames logged after it are simulated again, so the finished
file holds every frame once.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import io
import json
import os
import sys
import time
import zipfile
from pathlib import Path
from typing import ClassVar

import ase.io
import numpy as np
import torch
from ase import Atoms, units
from ase.calculators.calculator import CalculationFailed, CalculatorSetupError
from ase.md.md import MolecularDynamics
from ase.md.velocitydistribution import Stationary, ZeroRotation, thermalize_momenta

from mace_lpcalc.calculator import (BACKENDS, EXPLODING_FORCE_EV_A, LowPrecisionMACECalculator,
                                    package_versions)
from mace_lpcalc.precision.auto import DEFAULT_AUTO_FORCE_BUDGET_EV_A
from mace_lpcalc.models import build_tiny_model, default_model_path
from mace_lpcalc.precision.policies import POLICIES
from mace_lpcalc.md.progress import RunProgress, ns_per_day
from mace_lpcalc.precision.sentinel import SENTINEL_ACTIONS
from mace_lpcalc.md.trajectory import (TrajectoryData, TrajectoryWriter,
                                    frame_from_atoms, is_periodic, read_trajectory)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

CHECKPOINT_FORMAT = "mace_lpcalc.checkpoint"
_FS_PER_PS = 1000.0


def setting(default, help: str, *, flags=(), choices=None):
    return dataclasses.field(default=default, metadata={"help": help, "flags": flags,
                                                         "choices": choices})


@dataclasses.dataclass
class MDSettings:
    """Settings every protocol takes. Protocols subclass this to add their own."""

    structure: str = setting("", "structure file, any format ase.io.read knows")
    model: str | None = setting(None, "MACE .model file (default: the shipped water model "
                                      "if present, else a tiny random-weight model)")
    policy: str = setting("fp32", "precision policy; auto: the fastest within "
                                  "auto_force_budget_eV_A of fp64 on this structure",
                          choices=(*POLICIES, "auto"))
    auto_force_budget_eV_A: float = setting(DEFAULT_AUTO_FORCE_BUDGET_EV_A,
                                            "policy auto's largest acceptable max |ΔF| "
                                            "against fp64 (eV/Å)")
    backend: str = setting("auto", "MACE backend", choices=BACKENDS)
    device: str = setting("cpu", "torch device, e.g. cpu or cuda")
    deterministic: bool = setting(True, "on CPU, run with torch's deterministic algorithms, "
                                        "so that repeated and resumed runs agree bit for bit "
                                        "(with several threads, fp32 sums otherwise differ "
                                        "in the last bits); no effect on a GPU")
    compile_model: bool = setting(False, "fuse the model call with TorchInductor, compiled "
                                         "in the background while MD runs uncompiled; "
                                         "checked against the uncompiled model")
    steps: int = setting(1000, "total number of MD steps")
    timestep_fs: float = setting(1.0, "time step (fs)", flags=("--dt",))
    temperature_K: float = setting(300.0, "target temperature; also sets the Maxwell-"
                                          "Boltzmann initial velocities (K)")
    velocities_from_structure: bool = setting(False, "keep the momenta stored in the "
                                                     "structure file instead of drawing them")
    seed: int = setting(0, "random seed of the initial velocities and thermostat noise")
    log_every: int = setting(10, "steps between logged frames")
    checkpoint_every: int = setting(1000, "steps between checkpoints")
    checkpoint_every_s: float = setting(300.0, "wall-clock seconds between checkpoints, "
                                               "whichever of the two comes first (s)")
    progress_every_s: float = setting(30.0, "wall-clock seconds between progress lines "
                                            "when the output is not a terminal (s)")
    max_force_eV_A: float = setting(EXPLODING_FORCE_EV_A,
                                    "stop when any atom's force exceeds this (eV/Å)")
    sentinel_every: int = setting(1000, "every this many steps, also evaluate the frame at "
                                        "fp64 on mace's path and log the deviations to the "
                                        "trajectory (0: off)")
    sentinel_force_budget_eV_A: float = setting(0.5, "largest acceptable max |ΔF| against "
                                                     "fp64 (eV/Å)")
    sentinel_action: str = setting("warn", "what a deviation over budget does",
                                   choices=SENTINEL_ACTIONS)
    sentinel_fallback_policy: str = setting("fp32", "the policy sentinel_action = fallback "
                                                    "switches to", choices=tuple(POLICIES))
    out: str = setting("run.h5", "trajectory file (the checkpoint goes beside it)")
    overwrite: bool = setting(False, "replace an existing trajectory")
    resume: bool = setting(False, "continue the run from its checkpoint")

    #: Settings that may change when a run is resumed; every other one must match.
    RESUMABLE_CHANGES: ClassVar[frozenset] = frozenset(
        {"structure", "model", "device", "deterministic", "compile_model", "steps",
         "checkpoint_every", "checkpoint_every_s", "progress_every_s", "sentinel_every",
         "sentinel_force_budget_eV_A", "sentinel_action", "sentinel_fallback_policy", "out",
         "overwrite", "resume"})

    def __post_init__(self):
        positive = {"timestep_fs": self.timestep_fs, "log_every": self.log_every,
                    "checkpoint_every": self.checkpoint_every,
                    "checkpoint_every_s": self.checkpoint_every_s,
                    "progress_every_s": self.progress_every_s,
                    "max_force_eV_A": self.max_force_eV_A}
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.sentinel_every < 0:
            raise ValueError(f"sentinel_every must be 0 (off) or positive, got "
                             f"{self.sentinel_every}")
        if not self.sentinel_force_budget_eV_A > 0:
            raise ValueError(f"sentinel_force_budget_eV_A must be positive, got "
                             f"{self.sentinel_force_budget_eV_A}")
        if self.steps < 0:
            raise ValueError(f"steps must be non-negative, got {self.steps}")
        if self.temperature_K < 0:
            raise ValueError(f"temperature_K must be non-negative, got {self.temperature_K}")
        if self.overwrite and self.resume:
            raise ValueError("overwrite and resume exclude each other")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def checkpoint_path(trajectory_path) -> Path:
    """Where the checkpoint of the run writing ``trajectory_path`` lives."""
    path = Path(trajectory_path)
    return path.with_name(path.stem + ".checkpoint.npz")


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


def build_calculator(settings: MDSettings) -> LowPrecisionMACECalculator:
    """The MACE calculator a run uses; prints which model it loaded."""
    common = {"device": settings.device, "policy": settings.policy,
              "backend": settings.backend, "compile_model": settings.compile_model,
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


def _prepare_output_directory(out: Path) -> None:
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


def _versions(calculator) -> dict:
    return getattr(calculator, "parameters", {}).get("versions") or package_versions()


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


class MDProtocol:
    """Base class of the MD protocols; subclasses set ``name`` and ``settings_class``
    and implement :meth:`build_dynamics` (and :meth:`dynamics_state` if their
    integrator has internal state beyond positions and momenta).

    ``calculator`` replaces the MACE calculator :func:`build_calculator` would build
    (for analytic potentials in tests, or a calculator configured by hand).
    """

    name: ClassVar[str]
    settings_class: ClassVar[type[MDSettings]] = MDSettings
    #: Trajectory series :meth:`summarize` reads.
    summary_series: ClassVar[tuple[str, ...]] = ()
    #: Whether the integrator conserves an energy whose change the progress line shows.
    conserves_energy: ClassVar[bool] = True

    def __init__(self, settings: MDSettings, calculator=None):
        if not isinstance(settings, self.settings_class):
            raise TypeError(f"{type(self).__name__} needs {self.settings_class.__name__}, "
                            f"got {type(settings).__name__}")
        self.settings = settings
        self.calculator = calculator

    # -- ensemble hooks ------------------------------------------------------------------
    def check_structure(self, atoms: Atoms) -> None:
        """Refuse structures the ensemble cannot simulate (before anything runs)."""

    def build_dynamics(self, atoms: Atoms, state: dict | None) -> MolecularDynamics:
        """The ASE integrator for ``atoms``; ``state`` is what :meth:`dynamics_state`
        returned when the checkpoint being resumed was written (None for a new run)."""
        raise NotImplementedError

    def dynamics_state(self, dynamics: MolecularDynamics) -> dict[str, np.ndarray]:
        """Integrator state beyond positions and momenta, saved in checkpoints."""
        return {}

    def summarize(self, trajectory: TrajectoryData) -> dict:
        """Protocol-specific results added to the summary :meth:`run` returns."""
        return {}

    # -- the run -------------------------------------------------------------------------
    def run(self) -> dict:
        """Run (or resume) the protocol; return a summary dict (``protocol``, ``path``,
        ``steps_run``, ``final_step``, ``ns_per_day`` and the protocol's own results).

        With ``deterministic`` on a CPU, torch's deterministic algorithms are switched on
        for the run (a process-wide torch setting) and restored when it ends."""
        if not (self.settings.deterministic and str(self.settings.device).startswith("cpu")):
            return self._run()
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            return self._run()
        finally:
            torch.use_deterministic_algorithms(previous)

    def _run(self) -> dict:
        settings = self.settings
        out = Path(settings.out)
        checkpoint = self._load_checkpoint() if settings.resume else None
        if checkpoint is None and out.exists() and not settings.overwrite:
            raise FileExistsError(f"{out} already exists; pass overwrite to replace it or "
                                  "resume to continue it")
        atoms = checkpoint.atoms if checkpoint else read_structure(settings.structure)
        self.check_structure(atoms)
        _prepare_output_directory(out)
        calculator = self.calculator if self.calculator is not None \
            else build_calculator(settings)
        provenance = getattr(calculator, "parameters", {})
        model_hash = str(provenance.get("model_hash", "none"))
        if checkpoint and checkpoint.model_hash != model_hash:
            raise ValueError(f"the model differs from the one the checkpoint was written "
                             f"with (hash {model_hash[:12]} vs {checkpoint.model_hash[:12]})")
        if hasattr(calculator, "check_atoms"):
            calculator.check_atoms(atoms)
        atoms.calc = calculator
        if checkpoint is None and not settings.velocities_from_structure:
            self._draw_velocities(atoms)
        dynamics = self.build_dynamics(atoms, checkpoint.dynamics_state if checkpoint else None)
        start = dynamics.nsteps = checkpoint.step if checkpoint else 0
        problem = self._problem_after(atoms)
        if problem:
            raise CalculationFailed(f"{checkpoint_path(out) if checkpoint else settings.structure}"
                                    f" at step {start}: {problem}")
        if checkpoint and start >= settings.steps:
            print(f"{out}: already at step {start} of {settings.steps}; nothing to run",
                  file=sys.stderr)
            return self._summary(out, 0, float("nan"))

        if checkpoint:
            writer = TrajectoryWriter.reopen(out, keep_through_step=start, n_atoms=len(atoms),
                                             metadata={"settings": settings.as_dict()})
            print(f"{out}: resuming at step {start} from {checkpoint_path(out).name}; "
                  f"{writer.discarded_frames} frame(s) logged after it are simulated again",
                  file=sys.stderr)
        else:
            writer = TrajectoryWriter.create(out, atoms, {
                "protocol": self.name, "settings": settings.as_dict(),
                "model_hash": model_hash, "policy": str(provenance.get("policy", "none")),
                "backend": str(provenance.get("backend", "none")),
                "versions": _versions(calculator), "seed": settings.seed,
                **({"policy_decision": provenance["policy_decision"]}
                   if "policy_decision" in provenance else {}),
            }, overwrite=settings.overwrite)
        self._sentinel_written = 0
        with writer:
            self._write_sentinel_checks(calculator, writer, start)
            if checkpoint is None:
                writer.append(self._frame(atoms, dynamics, 0, float("nan")))
                self._save_checkpoint(atoms, dynamics, 0, model_hash)
            wall_seconds = self._integrate(atoms, dynamics, writer, start, model_hash)
        return self._summary(out, settings.steps - start, wall_seconds)

    def _problem_after(self, atoms, advance=None) -> str | None:
        """Run ``advance`` (an MD step) if given, then check the forces; what went wrong."""
        try:
            if advance is not None:
                advance()
            return self._force_problem(atoms)
        except CalculationFailed as err:
            return str(err)

    def _integrate(self, atoms, dynamics, writer, start: int, model_hash: str) -> float:
        settings = self.settings
        progress = RunProgress(f"{self.name} {Path(settings.out).name}", start, settings.steps,
                               settings.timestep_fs, settings.progress_every_s,
                               show_conserved_energy=self.conserves_energy)
        run_started = interval_started = last_checkpoint = time.perf_counter()
        last_logged = start
        with progress:
            for step in range(start + 1, settings.steps + 1):
                problem = self._problem_after(atoms, dynamics.step)
                self._write_sentinel_checks(atoms.calc, writer, step)
                if problem:
                    raise CalculationFailed(f"step {step}: {problem}; {writer.path} is intact "
                                            f"up to step {writer.last_step}")
                dynamics.nsteps = step
                if step % settings.log_every == 0 or step == settings.steps:
                    now = time.perf_counter()
                    seconds_per_step = (now - interval_started) / (step - last_logged)
                    frame = self._frame(atoms, dynamics, step, seconds_per_step)
                    writer.append(frame)
                    sentinel = getattr(atoms.calc, "sentinel", None)
                    progress.update(frame, atoms, sentinel.records[-1].force_max
                                    if sentinel is not None and sentinel.records else None)
                    interval_started, last_logged = now, step
                checkpoint_due = time.perf_counter() - last_checkpoint >= settings.checkpoint_every_s
                if (step % settings.checkpoint_every == 0 or step == settings.steps
                        or checkpoint_due):
                    self._save_checkpoint(atoms, dynamics, step, model_hash)
                    last_checkpoint = time.perf_counter()
        return time.perf_counter() - run_started

    def _write_sentinel_checks(self, calculator, writer, step: int) -> None:
        """Log the sentinel checks the calculator made since the last call, at ``step``."""
        sentinel = getattr(calculator, "sentinel", None)
        if sentinel is None:
            return
        for record in sentinel.records[self._sentinel_written:]:
            writer.append_sentinel(step, record)
            if record.action == "fallback":
                writer.set_attributes({"sentinel_fallback": {
                    "step": step, **calculator.parameters["sentinel_fallback"]}})
        self._sentinel_written = len(sentinel.records)

    def _frame(self, atoms, dynamics, step: int, seconds_per_step: float):
        conserved = dynamics.get_conserved_energy() if hasattr(
            dynamics, "get_conserved_energy") else atoms.get_total_energy()
        return frame_from_atoms(atoms, step, step * self.settings.timestep_fs / _FS_PER_PS,
                                conserved, seconds_per_step)

    def _force_problem(self, atoms: Atoms) -> str | None:
        """What is wrong with the current forces, if anything."""
        forces = atoms.get_forces()
        if not np.all(np.isfinite(forces)):
            bad = np.flatnonzero(~np.isfinite(forces).all(axis=1))
            return f"non-finite forces on atom(s) {bad[:10].tolist()}"
        largest = float(np.linalg.norm(forces, axis=1).max())
        if largest > self.settings.max_force_eV_A:
            return (f"exploding forces, max |F| = {largest:.3g} eV/Å > "
                    f"{self.settings.max_force_eV_A:g} eV/Å")
        return None

    def _draw_velocities(self, atoms: Atoms) -> None:
        """Maxwell-Boltzmann momenta at ``temperature_K``, then zero total momentum and,
        for a finite molecule, zero angular momentum (both rescaled to keep T)."""
        thermalize_momenta(atoms, self.settings.temperature_K,
                           rng=random_generator(self.settings.seed, stream=0))
        Stationary(atoms)
        if not atoms.pbc.any():
            ZeroRotation(atoms)

    def _load_checkpoint(self) -> Checkpoint:
        checkpoint = Checkpoint.load(checkpoint_path(self.settings.out))
        if checkpoint.protocol != self.name:
            raise ValueError(f"the checkpoint was written by the {checkpoint.protocol} "
                             f"protocol, not {self.name}")
        current = self.settings.as_dict()
        changed = sorted(key for key in set(current) | set(checkpoint.settings)
                         if key not in self.settings.RESUMABLE_CHANGES
                         and current.get(key) != checkpoint.settings.get(key))
        if changed:
            raise ValueError("cannot resume with different settings: " + ", ".join(
                f"{key} = {current.get(key)!r} (checkpoint: {checkpoint.settings.get(key)!r})"
                for key in changed))
        return checkpoint

    def _save_checkpoint(self, atoms, dynamics, step: int, model_hash: str) -> None:
        Checkpoint(protocol=self.name, settings=self.settings.as_dict(),
                   model_hash=model_hash, step=step, atoms=atoms,
                   dynamics_state=self.dynamics_state(dynamics)
                   ).save(checkpoint_path(self.settings.out))

    def _summary(self, out: Path, steps_run: int, wall_seconds: float) -> dict:
        seconds_per_step = wall_seconds / steps_run if steps_run else float("nan")
        trajectory = read_trajectory(out, names=("step", *self.summary_series))
        return {"protocol": self.name, "path": str(out), "steps_run": steps_run,
                "final_step": int(trajectory["step"][-1]),
                "ns_per_day": ns_per_day(self.settings.timestep_fs, seconds_per_step),
                **self.summarize(trajectory)}


def random_generator(seed: int, stream: int) -> np.random.Generator:
    """Independent generator number ``stream`` derived from ``seed`` (0: initial
    velocities, 1: thermostat noise)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream,)))


def timestep(settings: MDSettings) -> float:
    """The time step in ASE time units."""
    return settings.timestep_fs * units.fs


# -- command line -------------------------------------------------------------------------
def read_settings_file(path, settings_class: type[MDSettings]) -> dict:
    """Settings from a TOML file whose keys are field names of ``settings_class``."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            values = tomllib.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"settings file not found: {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"settings file {path} is not valid TOML: {err}") from err
    fields = {field.name: field for field in dataclasses.fields(settings_class)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"settings file {path}: unknown setting(s) {', '.join(unknown)} for "
                         f"{settings_class.__name__}; known: {', '.join(fields)}")
    for key, value in values.items():
        expected = _value_type(fields[key])
        accepted = (int, float) if expected is float else (expected,)
        if isinstance(value, bool) != (expected is bool) or not isinstance(value, accepted):
            raise ValueError(f"settings file {path}: {key} must be {expected.__name__}, "
                             f"got {value!r}")
    return values


def _value_type(field: dataclasses.Field) -> type:
    return str if field.default is None else type(field.default)


def build_parser(settings_class: type[MDSettings], prog: str) -> argparse.ArgumentParser:
    """One option per settings field (``--field-name``); ``structure`` is positional."""
    parser = argparse.ArgumentParser(
        prog=prog, description=(sys.modules[settings_class.__module__].__doc__ or "")
        .split("\n\n")[0])
    parser.add_argument("structure", nargs="?", help="structure file (ase.io.read)")
    parser.add_argument("--settings", metavar="FILE.toml",
                        help="TOML file of settings; command-line options override it")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of one line")
    for field in dataclasses.fields(settings_class):
        if field.name == "structure":
            continue
        flags = (*field.metadata["flags"], "--" + field.name.replace("_", "-"))
        value_type = _value_type(field)
        help_text = field.metadata["help"] + (
            "" if field.default is None else f" (default: {field.default})")
        # Every default is None here, so that only explicit options override the file.
        if value_type is bool:
            parser.add_argument(*flags, dest=field.name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        else:
            parser.add_argument(*flags, dest=field.name, type=value_type, default=None,
                                choices=field.metadata["choices"], help=help_text)
    return parser


def settings_from_command_line(settings_class: type[MDSettings], argv, prog: str):
    """Defaults, overridden by ``--settings FILE.toml``, overridden by explicit options."""
    parser = build_parser(settings_class, prog)
    arguments = vars(parser.parse_args(argv))
    arguments.pop("debug")
    return _settings_from(arguments, settings_class, parser)


def _settings_from(arguments: dict, settings_class: type[MDSettings], parser) -> MDSettings:
    values = read_settings_file(arguments["settings"], settings_class) \
        if arguments["settings"] else {}
    values.update({key: value for key, value in arguments.items()
                   if value is not None and key != "settings"})
    if not values.get("structure"):
        parser.error("a structure file is required (argument or 'structure' in --settings)")
    return settings_class(**values)


#: What a run refuses or stops with: bad files and settings, models the calculator
#: cannot set up, failed calculations, and the operating system's refusals (an
#: unwritable directory, a full disk). Reported in one line; ``--debug`` shows the traceback.
_REPORTED_ERRORS = (OSError, ValueError, CalculatorSetupError, CalculationFailed)


def main(protocol_class: type[MDProtocol], argv=None) -> dict:
    """Command-line entry point shared by the protocol modules."""
    prog = f"python -m mace_lpcalc.protocols.{protocol_class.name}"
    parser = build_parser(protocol_class.settings_class, prog)
    arguments = vars(parser.parse_args(argv))
    debug = arguments.pop("debug")
    try:
        settings = _settings_from(arguments, protocol_class.settings_class, parser)
        summary = protocol_class(settings).run()
    except _REPORTED_ERRORS as err:
        if debug:
            raise
        raise SystemExit(f"{prog}: error: {_one_line(err)}") from None
    print(json.dumps(summary, indent=2))
    return summary


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:  # no "[Errno N]" prefix
        text = error.strerror
        if error.filename and str(error.filename) not in text:
            text = f"{error.filename}: {text}"
    else:
        text = str(error)
    return " ".join(text.split())


def periodic_cell_required(atoms: Atoms, protocol: str) -> None:
    """Raise ValueError unless ``atoms`` has a 3D cell periodic in all directions."""
    if not is_periodic(atoms):
        raise ValueError(f"{protocol} needs a structure periodic in three dimensions with a "
                         f"3D cell; got pbc={atoms.pbc.tolist()}, cell volume "
                         f"{abs(atoms.cell.volume):.3g} Å^3")
