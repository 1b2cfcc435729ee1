"""NVE molecular dynamics (velocity Verlet) and its energy-conservation report.

Run ``python -m mace_lpcalc.protocols.nve STRUCTURE [options]`` (``--help`` lists them;
``protocols/nve_drift.toml`` holds the drift-test settings). The initial velocities are
Maxwell-Boltzmann at ``temperature_K`` unless ``velocities_from_structure`` is set.

The summary reports how well the run conserved energy, in numbers that compare across
runs of different length and size:

* ``energy_drift_meV_atom_ps`` ± ``energy_drift_stderr_meV_atom_ps``: least-squares
  slope of the total energy against time, per atom, its error scaled by √g of the
  residuals' statistical inefficiency (:func:`mace_lpcalc.analysis.thermodynamics.energy_drift`);
* ``total_energy_fluctuation_meV_atom``: standard deviation of the total energy per atom;
* ``fluctuation_ratio``: std(total energy) / std(kinetic energy), the classic
  integration-quality ratio (independent of size and length; below ~0.05 is good);
* ``drift_to_kinetic_fluctuation``: |slope| × run length / std(kinetic energy), how many
  kinetic-energy standard deviations the total energy drifted over the whole run.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from ase.md.verlet import VelocityVerlet

from mace_lpcalc.analysis.thermodynamics import energy_drift
from mace_lpcalc.md.base import MDProtocol, MDSettings, timestep
from mace_lpcalc.md.frames import TrajectoryData

_MEV_PER_EV = 1000.0


@dataclasses.dataclass
class NVESettings(MDSettings):
    """NVE needs no settings beyond the common ones; ``temperature_K`` only sets the
    initial velocities."""


class NVE(MDProtocol):
    """Microcanonical MD with ASE's ``VelocityVerlet``."""

    name = "nve"
    settings_class = NVESettings
    summary_series = ("time", "total_energy", "kinetic_energy")

    def build_dynamics(self, atoms, state):
        return VelocityVerlet(atoms, timestep=timestep(self.settings))

    def summarize(self, trajectory: TrajectoryData) -> dict:
        if trajectory.n_frames < 3:
            return {}
        n_atoms = trajectory.n_atoms
        time_ps, total, kinetic = (trajectory[name] for name in self.summary_series)
        slope, stderr = energy_drift(time_ps, total, n_atoms)
        kinetic_std_eV = float(np.std(kinetic))
        drift_eV = abs(slope) * n_atoms / _MEV_PER_EV * float(np.ptp(time_ps))
        return {
            "energy_drift_meV_atom_ps": slope,
            "energy_drift_stderr_meV_atom_ps": stderr,
            "total_energy_fluctuation_meV_atom": float(np.std(total)) * _MEV_PER_EV / n_atoms,
            "fluctuation_ratio": float(np.std(total)) / kinetic_std_eV,
            "drift_to_kinetic_fluctuation": drift_eV / kinetic_std_eV,
        }

