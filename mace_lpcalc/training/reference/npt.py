"""The reference engine's own NPT run: SPC/Fw water in OpenMM, logged as a mace_lpcalc trajectory.

``python -m mace_lpcalc.training.reference.npt STRUCTURE --out ref.h5 --steps N --seed S
[--equilibrated-out water_spcfw.xyz]``

The force field is exactly the one the training labels were computed with: the OpenMM
``System`` comes from :meth:`SPCFwCalculator.create_system` (SPC/Fw, PME with the
labels' Ewald splitting and grid, switched Lennard-Jones, dispersion correction, no
constraints). Dynamics: ``LangevinMiddleIntegrator`` (300 K, 1/ps friction, 0.5 fs, which
the flexible O–H bonds need) and an isotropic ``MonteCarloBarostat`` (1.01325 bar, moves
every 25 steps, molecules scaled as rigid units). The integrator, the barostat and the
initial velocities take seeds derived from ``--seed``. The same seed gives the same run,
bit for bit, on the Reference platform and on the CPU platform with ``--threads 1``; with
more CPU threads OpenMM's summation order varies from run to run (even with its
``DeterministicForces``, which is set), so such runs agree only statistically.

Sequence: molecules made whole, energy minimised, velocities drawn, an unlogged
equilibration segment (``--equilibration-ps``), then production, logged every
``--log-every`` steps with step 0 the first production frame. ``--equilibrated-out``
writes the configuration at the end of equilibration as extended XYZ (molecule centres
wrapped into the cell, molecules whole, velocities as momenta with ASE's masses).

Trajectory conventions (see :mod:`mace_lpcalc.md.trajectory`), and where they differ from
a MACE run:

* coordinates are unwrapped. OpenMM's positions are continuous except that every
  accepted barostat move shifts the molecules whose centre left the cell back into it
  by a cell vector; those jumps are removed frame to frame by the unwrapping of von
  Bülow, Bullerjahn & Hummer (J. Chem. Phys. 153, 021101 (2020)), which stays right
  while the cell changes (:func:`unwrap_step`);
* OpenMM reports no virial, so ``stress`` is isotropic, −P on the diagonal and zero off
  it, with P the instantaneous pressure of ``MonteCarloBarostat.computeCurrentPressure``
  (molecular virial plus kinetic term); the ``pressure`` series is therefore P;
* Langevin dynamics has no conserved quantity: ``conserved_energy`` is the total energy;
* masses are OpenMM's (those of the force-field XML), so the density is the engine's own;
* root attributes: ``protocol`` "npt", ``policy`` "reference-openmm-spcfw",
  ``model_hash`` the SHA-256 of the force-field XML, ``backend`` "openmm-<platform>".
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import platform as python_platform
import sys
import time
from importlib import metadata
from pathlib import Path

import ase.io
import numpy as np
import openmm
from ase import Atoms, units
from ase.geometry import find_mic
from openmm import unit

from mace_lpcalc.units import EV_PER_KJ_MOL, density_g_cm3

from mace_lpcalc.md.frames import Frame
from mace_lpcalc.md.trajectory import TrajectoryWriter
from mace_lpcalc.training.reference.spcfw import SPCFwCalculator, check_water_atoms, spcfw_forcefield_xml

POLICY = "reference-openmm-spcfw"
PROTOCOL = "npt"
_FS_PER_PS = 1000.0
_SECONDS_PER_DAY = 86400.0


def forcefield_hash() -> str:
    """SHA-256 of the SPC/Fw force-field XML: the reference's analogue of a model hash."""
    return hashlib.sha256(spcfw_forcefield_xml().encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class ReferenceNPTSettings:
    """Settings of a reference NPT run (units in the names)."""

    steps: int
    seed: int
    equilibration_ps: float = 10.0
    temperature_K: float = 300.0
    pressure_bar: float = 1.01325
    friction_per_ps: float = 1.0
    timestep_fs: float = 0.5
    barostat_interval: int = 25
    log_every: int = 100
    cutoff_A: float = 4.5
    minimize: bool = True
    platform: str = "CPU"
    threads: int | None = None

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be positive, got {self.steps}")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}")
        for name in ("temperature_K", "pressure_bar", "friction_per_ps", "timestep_fs",
                     "barostat_interval", "log_every", "cutoff_A"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.equilibration_ps < 0:
            raise ValueError(f"equilibration_ps must be non-negative, got {self.equilibration_ps}")
        if self.platform not in ("CPU", "Reference"):
            raise ValueError(f"platform must be 'CPU' or 'Reference', got {self.platform!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be positive, got {self.threads}")

    @property
    def equilibration_steps(self) -> int:
        return round(self.equilibration_ps * _FS_PER_PS / self.timestep_fs)

    def openmm_seeds(self) -> dict[str, int]:
        """Seeds for the velocities, the integrator and the barostat, derived from ``seed``.

        OpenMM reads a seed of 0 as "pick one at random", so all are drawn from [1, 2³¹−1).
        """
        drawn = np.random.default_rng(self.seed).integers(1, 2**31 - 1, size=3)
        return dict(zip(("velocities", "integrator", "barostat"), map(int, drawn)))


def whole_molecules(atoms: Atoms) -> Atoms:
    """A copy of water ``atoms`` (O, H, H per molecule) with each H at the minimum image of
    its O, so every molecule is whole in Cartesian space."""
    check_water_atoms(atoms)
    whole = atoms.copy()
    molecules = whole.positions.reshape(-1, 3, 3)
    bonds, _ = find_mic((molecules[:, 1:] - molecules[:, :1]).reshape(-1, 3), whole.cell)
    molecules[:, 1:] = molecules[:, :1] + bonds.reshape(-1, 2, 3)
    whole.positions = molecules.reshape(-1, 3)
    return whole


def unwrap_step(previous_unwrapped_A: np.ndarray, previous_raw_A: np.ndarray,
                raw_A: np.ndarray, cell_A: np.ndarray) -> np.ndarray:
    """Unwrapped positions (Å, shape ``(n_atoms, 3)``) of the next frame.

    The displacement since the previous frame, ``raw − previous_raw``, is reduced to its
    minimum image in the current cell (rows are cell vectors) and added to the previous
    unwrapped positions (von Bülow et al. 2020). Right while no atom moves half a cell
    width between frames.
    """
    displacement = raw_A - previous_raw_A
    fractional = displacement @ np.linalg.inv(cell_A)
    return previous_unwrapped_A + displacement - np.round(fractional) @ cell_A


def degrees_of_freedom(system: openmm.System) -> int:
    """3N minus constraints minus 3 if the centre-of-mass motion is removed."""
    removes_com = any(isinstance(force, openmm.CMMotionRemover) for force in system.getForces())
    return 3 * system.getNumParticles() - system.getNumConstraints() - 3 * removes_com


class ReferenceNPT:
    """SPC/Fw NPT in OpenMM for water ``atoms`` (O, H, H per molecule, 3D-periodic).

    Builds the system, integrator, barostat and context; :meth:`equilibrate` and
    :meth:`run` advance it.
    """

    def __init__(self, atoms: Atoms, settings: ReferenceNPTSettings):
        self.settings = settings
        self.n_molecules = check_water_atoms(atoms)
        # OpenMM wants a lower-triangular (reduced) cell: rotate into ASE's standard form.
        reduced_cell, rotation = atoms.cell.standard_form()
        start = whole_molecules(atoms)
        self.calculator = SPCFwCalculator(cutoff_A=settings.cutoff_A)
        self.system = self.calculator.create_system(self.n_molecules, np.array(reduced_cell))
        self.seeds = settings.openmm_seeds()
        self.barostat = openmm.MonteCarloBarostat(settings.pressure_bar * unit.bar,
                                                  settings.temperature_K * unit.kelvin,
                                                  settings.barostat_interval)
        self.barostat.setRandomNumberSeed(self.seeds["barostat"])
        self.system.addForce(self.barostat)
        self.integrator = openmm.LangevinMiddleIntegrator(
            settings.temperature_K * unit.kelvin, settings.friction_per_ps / unit.picosecond,
            settings.timestep_fs * unit.femtosecond)
        self.integrator.setRandomNumberSeed(self.seeds["integrator"])
        properties = {}
        if settings.platform == "CPU":
            properties["DeterministicForces"] = "true"
            if settings.threads is not None:
                properties["Threads"] = str(settings.threads)
        self.context = openmm.Context(self.system, self.integrator,
                                      openmm.Platform.getPlatformByName(settings.platform),
                                      properties)
        self.context.setPositions(start.positions @ rotation.T * 0.1)
        self.masses_amu = np.array([self.system.getParticleMass(i).value_in_unit(unit.dalton)
                                    for i in range(self.system.getNumParticles())])
        self.n_dof = degrees_of_freedom(self.system)
        self.symbols = atoms.get_chemical_symbols()

    # -- state ---------------------------------------------------------------------------
    def current_atoms(self, wrap: bool) -> Atoms:
        """The current configuration (Å, velocities as momenta, OpenMM's masses).

        ``wrap``: molecule centres folded into the cell (molecules stay whole); else
        OpenMM's raw positions."""
        state = self.context.getState(getPositions=True, getVelocities=True,
                                      enforcePeriodicBox=wrap)
        atoms = Atoms(self.symbols, pbc=True, masses=self.masses_amu,
                      positions=state.getPositions(asNumpy=True).value_in_unit(unit.angstrom),
                      cell=state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.angstrom))
        velocities = state.getVelocities(asNumpy=True).value_in_unit(unit.angstrom / unit.femtosecond)
        atoms.set_velocities(np.asarray(velocities) * units.Angstrom / units.fs)
        return atoms

    def prepare(self) -> None:
        """Minimise (if set) and draw Maxwell–Boltzmann velocities."""
        if self.settings.minimize:
            openmm.LocalEnergyMinimizer.minimize(self.context, 10.0, 1000)
        self.context.setVelocitiesToTemperature(self.settings.temperature_K * unit.kelvin,
                                                self.seeds["velocities"])

    def equilibrate(self) -> None:
        """The unlogged equilibration segment."""
        if self.settings.equilibration_steps:
            self.integrator.step(self.settings.equilibration_steps)

    def _frame(self, step: int, positions_A: np.ndarray, cell_A: np.ndarray,
               seconds_per_step: float) -> Frame:
        state = self.context.getState(getEnergy=True)
        potential = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        kinetic = state.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole)
        temperature = 2 * kinetic * EV_PER_KJ_MOL / (self.n_dof * units.kB)
        pressure_bar = self.barostat.computeCurrentPressure(self.context).value_in_unit(unit.bar)
        isotropic = -pressure_bar * units.bar
        return Frame(step=step, time_ps=step * self.settings.timestep_fs / _FS_PER_PS,
                     positions_A=positions_A, potential_energy_eV=potential * EV_PER_KJ_MOL,
                     kinetic_energy_eV=kinetic * EV_PER_KJ_MOL,
                     conserved_energy_eV=(potential + kinetic) * EV_PER_KJ_MOL,
                     temperature_K=temperature, wall_time_per_step_s=seconds_per_step,
                     cell_A=cell_A, stress_eV_A3=np.array([isotropic] * 3 + [0.0] * 3))

    def metadata(self) -> dict:
        """Root attributes of the trajectory file."""
        nonbonded = next(force for force in self.system.getForces()
                         if isinstance(force, openmm.NonbondedForce))
        alpha, *grid = nonbonded.getPMEParameters()
        settings = dataclasses.asdict(self.settings)
        settings.update(
            openmm_seeds=self.seeds, n_molecules=self.n_molecules,
            forcefield="SPC/Fw (Wu, Tepper & Voth, J. Chem. Phys. 124, 024503 (2006))",
            calculator_parameters=dict(self.calculator.parameters),
            pme_alpha_per_nm=alpha.value_in_unit(unit.nanometer**-1), pme_grid=list(grid),
            lj_switch_distance_A=nonbonded.getSwitchingDistance().value_in_unit(unit.angstrom),
            dispersion_correction=bool(nonbonded.getUseDispersionCorrection()),
            integrator="LangevinMiddleIntegrator",
            barostat="MonteCarloBarostat (isotropic, molecules scaled as rigid units)",
            stress="isotropic -P from MonteCarloBarostat.computeCurrentPressure; "
                   "off-diagonal not computed (written as 0)",
            conserved_energy="total energy (Langevin dynamics conserves nothing)",
            coordinates="unwrapped (von Buelow et al. 2020) from OpenMM's positions")
        versions = {"python": python_platform.python_version(), "openmm": openmm.__version__}
        for package in ("mace_lpcalc", "ase", "numpy", "h5py", "mdtraj"):
            versions[package] = metadata.version(package)
        return {"protocol": PROTOCOL, "policy": POLICY, "model_hash": forcefield_hash(),
                "backend": f"openmm-{self.context.getPlatform().getName()}",
                "seed": self.settings.seed, "settings": settings, "versions": versions,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds")}

    def run(self, out, *, overwrite: bool = False, progress=None) -> dict:
        """Production: log ``steps`` steps to ``out`` every ``log_every`` steps (step 0
        included); return a summary. ``progress(step)`` is called after each frame."""
        settings = self.settings
        raw = self.current_atoms(wrap=False)
        unwrapped = raw.positions.copy()
        with TrajectoryWriter.create(out, raw, self.metadata(), overwrite=overwrite) as writer:
            writer.append(self._frame(0, unwrapped, np.array(raw.cell), float("nan")))
            started = time.perf_counter()
            step = 0
            while step < settings.steps:
                n_steps = min(settings.log_every, settings.steps - step)
                interval_started = time.perf_counter()
                self.integrator.step(n_steps)
                seconds_per_step = (time.perf_counter() - interval_started) / n_steps
                step += n_steps
                current = self.current_atoms(wrap=False)
                cell = np.array(current.cell)
                unwrapped = unwrap_step(unwrapped, raw.positions, current.positions, cell)
                raw = current
                writer.append(self._frame(step, unwrapped, cell, seconds_per_step))
                if progress is not None:
                    progress(step)
            wall_seconds = time.perf_counter() - started
        seconds_per_step = wall_seconds / settings.steps
        return {"path": str(out), "steps": settings.steps,
                "wall_seconds": wall_seconds, "seconds_per_step": seconds_per_step,
                "ns_per_day": settings.timestep_fs * 1e-6 * _SECONDS_PER_DAY / seconds_per_step}


def write_equilibrated(path, atoms: Atoms, info: dict) -> None:
    """Write ``atoms`` as extended XYZ with ASE's default masses (momenta rescaled so the
    velocities are kept) and ``info`` in the comment line."""
    velocities = atoms.get_velocities()
    structure = Atoms(atoms.get_chemical_symbols(), positions=atoms.positions, cell=atoms.cell,
                      pbc=True)
    structure.set_velocities(velocities)
    structure.info.update(info)
    ase.io.write(path, structure, format="extxyz")


def run_reference_npt(structure, out, settings: ReferenceNPTSettings, *,
                      equilibrated_out=None, overwrite: bool = False, log=print) -> dict:
    """Prepare, equilibrate, optionally write the equilibrated structure, run production."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite to replace it")
    atoms = ase.io.read(structure) if not isinstance(structure, Atoms) else structure
    simulation = ReferenceNPT(atoms, settings)
    log(f"platform {simulation.context.getPlatform().getName()}, "
        f"{simulation.n_molecules} molecules, seeds {simulation.seeds}")
    started = time.perf_counter()
    simulation.prepare()
    simulation.equilibrate()
    equilibration_seconds = time.perf_counter() - started
    equilibrated = simulation.current_atoms(wrap=True)
    density = density_g_cm3(simulation.masses_amu.sum(), equilibrated.get_volume())
    log(f"equilibrated {settings.equilibration_ps:g} ps in {equilibration_seconds:.0f} s: "
        f"density {density:.4f} g/cm3")
    if equilibrated_out is not None:
        write_equilibrated(equilibrated_out, equilibrated, {
            "source": "OpenMM SPC/Fw NPT equilibration", "policy": POLICY,
            "forcefield_sha256": forcefield_hash(), "seed": settings.seed,
            "equilibration_ps": settings.equilibration_ps,
            "temperature_K": settings.temperature_K, "pressure_bar": settings.pressure_bar,
            "density_g_cm3": round(density, 6)})
        log(f"wrote {equilibrated_out}")
    report_every = max(1, settings.steps // 20)

    def progress(step):
        if step % report_every < settings.log_every or step == settings.steps:
            log(f"step {step}/{settings.steps} ({time.perf_counter() - started:.0f} s)")

    summary = simulation.run(out, overwrite=overwrite, progress=progress)
    summary.update(equilibration_seconds=equilibration_seconds,
                   equilibrated_density_g_cm3=density)
    return summary


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m mace_lpcalc.training.reference.npt",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("structure", help="water structure (O, H, H per molecule; ase.io.read)")
    parser.add_argument("--out", required=True, help="trajectory file (HDF5)")
    parser.add_argument("--steps", type=int, required=True, help="production steps")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--equilibrated-out", help="extended XYZ of the equilibrated structure")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    defaults = ReferenceNPTSettings(steps=1, seed=0)
    for name in ("equilibration_ps", "temperature_K", "pressure_bar", "friction_per_ps",
                 "timestep_fs", "barostat_interval", "log_every", "cutoff_A"):
        default = getattr(defaults, name)
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default,
                            help=f"default {default}")
    parser.add_argument("--no-minimize", dest="minimize", action="store_false",
                        help="skip the energy minimisation before the velocities are drawn")
    parser.add_argument("--platform", choices=("CPU", "Reference"), default="CPU")
    parser.add_argument("--threads", type=int, help="CPU platform threads (default: OpenMM's)")
    args = vars(parser.parse_args(argv))
    structure, out = args.pop("structure"), args.pop("out")
    equilibrated_out, overwrite = args.pop("equilibrated_out"), args.pop("overwrite")
    try:
        settings = ReferenceNPTSettings(**args)
        summary = run_reference_npt(structure, out, settings, equilibrated_out=equilibrated_out,
                                    overwrite=overwrite,
                                    log=lambda message: print(message, file=sys.stderr,
                                                              flush=True))
    except (FileNotFoundError, FileExistsError, ValueError, openmm.OpenMMException) as err:
        raise SystemExit(f"{parser.prog}: error: {err}") from err
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
