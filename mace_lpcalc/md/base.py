"""What every MD protocol shares: its settings and the one MD loop, which writes the
trajectory and the checkpoints.

An ensemble (:mod:`.nvt`, :mod:`.npt`, :mod:`.nve`) only builds its ASE integrator and
says how to save and restore that integrator's internal state; :class:`MDProtocol`
does the rest:

1. read the structure (or the checkpoint, when resuming) and check it (:mod:`.inputs`),
2. build the calculator (:func:`~.inputs.build_calculator`) and evaluate the first forces,
   so a bad structure or an unknown element fails before any file is written,
3. log a frame every ``log_every`` steps to the trajectory (:mod:`mace_lpcalc.md.trajectory`),
   stopping with ``CalculationFailed`` at the first non-finite or exploding force,
4. write a checkpoint every ``checkpoint_every`` steps, every ``checkpoint_every_s``
   seconds of wall time, and at the end; stop early, checkpoint first, after
   ``max_wall_s`` seconds or when :data:`STOP_REQUESTED` is set (the command line sets it
   on SIGTERM, which a batch scheduler sends before it kills a job),
5. report progress (:mod:`.progress`): a bar on a terminal, plain lines in a log file.

The command line that builds settings and runs a protocol is :mod:`.cli`.

A checkpoint (:mod:`.checkpoint`, ``run.checkpoint.npz`` beside ``run.h5``) holds the
positions, momenta, cell, step and the integrator's internal state, random generator
included, so a run killed at any moment resumes with ``resume=True`` exactly where an
uninterrupted run would be (bit for bit where the calculator is deterministic, as on
CPU; GPU reductions may differ in the last bits): the trajectory is cut back to the
checkpoint's step and the frames logged after it are simulated again, so the finished
file holds every frame once.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from ase import Atoms, units
from ase.calculators.calculator import CalculationFailed
from ase.md.md import MolecularDynamics
from ase.md.velocitydistribution import Stationary, ZeroRotation, thermalize_momenta

from mace_lpcalc.calculator import EXPLODING_FORCE_EV_A
from mace_lpcalc.installed import BACKENDS, package_versions
from mace_lpcalc.precision.auto import DEFAULT_AUTO_FORCE_BUDGET_EV_A
from mace_lpcalc.precision.policies import POLICIES
from mace_lpcalc.md.checkpoint import Checkpoint, checkpoint_path, settings_changes
from mace_lpcalc.md.inputs import COMPILE_MODEL_VALUES, build_calculator, prepare_output_directory, read_structure
from mace_lpcalc.md.progress import RunProgress, ns_per_day
from mace_lpcalc.precision.sentinel import SENTINEL_ACTIONS
from mace_lpcalc.md.frames import TrajectoryData, frame_from_atoms, is_periodic
from mace_lpcalc.md.trajectory import TrajectoryWriter, read_trajectory

_FS_PER_PS = 1000.0

#: Set (e.g. by a signal handler) to make every running protocol write a checkpoint and
#: stop after its current step; a batch job's end then loses no simulated time.
STOP_REQUESTED = threading.Event()


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
    compile_model: str = setting("auto", "fuse the model call with TorchInductor while MD "
                                         "runs uncompiled, checked against it; auto: on CUDA",
                                 choices=tuple(COMPILE_MODEL_VALUES))
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
    max_wall_s: float = setting(0.0, "stop after this many wall-clock seconds, with a "
                                     "checkpoint to resume from, e.g. before a job slot "
                                     "ends (s; 0: no limit)")
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
    RESUMABLE_CHANGES: ClassVar[frozenset] = frozenset({
        "structure", "model", "device", "deterministic", "compile_model", "steps",
        "checkpoint_every", "checkpoint_every_s", "max_wall_s", "progress_every_s",
        "sentinel_every", "sentinel_force_budget_eV_A", "sentinel_action",
        "sentinel_fallback_policy", "out", "overwrite", "resume"})

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
            raise ValueError(f"sentinel_every must be 0 (off) or positive, got {self.sentinel_every}")
        if not self.sentinel_force_budget_eV_A > 0:
            raise ValueError(f"sentinel_force_budget_eV_A must be positive, got {self.sentinel_force_budget_eV_A}")
        if self.steps < 0:
            raise ValueError(f"steps must be non-negative, got {self.steps}")
        if self.max_wall_s < 0:
            raise ValueError(f"max_wall_s must be 0 (no limit) or positive, got {self.max_wall_s}")
        if self.temperature_K < 0:
            raise ValueError(f"temperature_K must be non-negative, got {self.temperature_K}")
        if isinstance(self.compile_model, bool):  # as runs before "auto" recorded it
            self.compile_model = "on" if self.compile_model else "off"
        if self.compile_model not in COMPILE_MODEL_VALUES:
            raise ValueError(f"compile_model must be auto, on or off, got {self.compile_model!r}")
        if self.overwrite and self.resume:
            raise ValueError("overwrite and resume exclude each other")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _versions(calculator) -> dict:
    return getattr(calculator, "parameters", {}).get("versions") or package_versions()


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
        ``steps_run``, ``final_step``, ``ns_per_day``, ``stopped`` -- why the run ended
        before ``steps`` with a checkpoint to resume from, or None -- and the protocol's
        own results).

        With ``deterministic`` on a CPU, torch's deterministic algorithms are switched on
        for the run (a process-wide torch setting) and restored when it ends; where they
        are on already (:func:`~.replicas.run_replicas` sets them once for all its replicas)
        they are left as they are."""
        if not (self.settings.deterministic and str(self.settings.device).startswith("cpu")) \
                or torch.are_deterministic_algorithms_enabled():
            return self._run()
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            return self._run()
        finally:
            torch.use_deterministic_algorithms(previous)

    def _run(self) -> dict:
        started = time.perf_counter()
        settings = self.settings
        out = Path(settings.out)
        checkpoint = self._load_checkpoint() if settings.resume else None
        if checkpoint is None and out.exists() and not settings.overwrite:
            raise FileExistsError(f"{out} already exists; pass overwrite to replace it or "
                                  "resume to continue it")
        atoms = checkpoint.atoms if checkpoint else read_structure(settings.structure)
        self.check_structure(atoms)
        prepare_output_directory(out)
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
            return self._summary(out, 0, float("nan"), stopped=None)

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
            end, wall_seconds, stopped = self._integrate(atoms, dynamics, writer, start,
                                                         model_hash, started)
        return self._summary(out, end - start, wall_seconds, stopped)

    def _problem_after(self, atoms, advance=None) -> str | None:
        """Run ``advance`` (an MD step) if given, then check the forces; what went wrong."""
        try:
            if advance is not None:
                advance()
            return self._force_problem(atoms)
        except CalculationFailed as err:
            return str(err)

    def _integrate(self, atoms, dynamics, writer, start: int, model_hash: str,
                   started: float) -> tuple[int, float, str | None]:
        """Steps from ``start`` to ``settings.steps``, or until a stop; return the last
        step, the wall time of the loop (s) and why it stopped early (None: it did not)."""
        settings = self.settings
        progress = RunProgress(f"{self.name} {Path(settings.out).name}", start, settings.steps,
                               settings.timestep_fs, settings.progress_every_s,
                               show_conserved_energy=self.conserves_energy)
        run_started = interval_started = last_checkpoint = time.perf_counter()
        last_logged = step = start
        stopped = None
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
                now = time.perf_counter()
                stopped = self._stop_reason(now - started) if step < settings.steps else None
                if (step % settings.checkpoint_every == 0 or step == settings.steps
                        or now - last_checkpoint >= settings.checkpoint_every_s or stopped):
                    self._save_checkpoint(atoms, dynamics, step, model_hash)
                    last_checkpoint = time.perf_counter()
                if stopped:
                    print(f"{settings.out}: stopped at step {step} of {settings.steps} "
                          f"({stopped}); resume continues from its checkpoint",
                          file=sys.stderr)
                    break
        return step, time.perf_counter() - run_started, stopped

    def _stop_reason(self, elapsed_s: float) -> str | None:
        limit_s = self.settings.max_wall_s
        return "stop requested" if STOP_REQUESTED.is_set() else (
            f"max_wall_s = {limit_s:g} s reached" if limit_s and elapsed_s >= limit_s else None)

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
        changed = settings_changes(self.settings.as_dict(), checkpoint.settings,
                                   self.settings.RESUMABLE_CHANGES)
        if changed:
            raise ValueError("cannot resume with different settings: " + ", ".join(changed))
        return checkpoint

    def _save_checkpoint(self, atoms, dynamics, step: int, model_hash: str) -> None:
        Checkpoint(protocol=self.name, settings=self.settings.as_dict(),
                   model_hash=model_hash, step=step, atoms=atoms,
                   dynamics_state=self.dynamics_state(dynamics)
                   ).save(checkpoint_path(self.settings.out))

    def _summary(self, out: Path, steps_run: int, wall_seconds: float,
                 stopped: str | None) -> dict:
        seconds_per_step = wall_seconds / steps_run if steps_run else float("nan")
        trajectory = read_trajectory(out, names=("step", *self.summary_series))
        return {"protocol": self.name, "path": str(out), "steps_run": steps_run,
                "final_step": int(trajectory["step"][-1]), "stopped": stopped,
                "ns_per_day": ns_per_day(self.settings.timestep_fs, seconds_per_step),
                **self.summarize(trajectory)}


def random_generator(seed: int, stream: int) -> np.random.Generator:
    """Independent generator number ``stream`` derived from ``seed`` (0: initial
    velocities, 1: thermostat noise)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream,)))


def timestep(settings: MDSettings) -> float:
    """The time step in ASE time units."""
    return settings.timestep_fs * units.fs


def periodic_cell_required(atoms: Atoms, protocol: str) -> None:
    """Raise ValueError unless ``atoms`` has a 3D cell periodic in all directions."""
    if not is_periodic(atoms):
        raise ValueError(f"{protocol} needs a structure periodic in three dimensions with a "
                         f"3D cell; got pbc={atoms.pbc.tolist()}, cell volume "
                         f"{abs(atoms.cell.volume):.3g} Å^3")
