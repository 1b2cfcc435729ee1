"""NVT molecular dynamics with ASE's Langevin integrator.

Run ``python -m mace_lpcalc.protocols.nvt STRUCTURE [options]`` (``--help`` lists them;
``protocols/nvt_langevin.toml`` holds the thesis settings).

Velocities start from a Maxwell-Boltzmann distribution drawn with the run's seed, with
the centre-of-mass momentum removed and, for a non-periodic molecule, the angular
momentum too. The thermostat noise comes from its own ``numpy.random.Generator``
derived from the same seed; its state is saved in every checkpoint, so a resumed run
draws the same numbers an uninterrupted one would. The centre of mass is not pinned
(ASE's ``fixcm`` is off: with it, Langevin does not sample the canonical ensemble
exactly), so it diffuses slowly, as in any Langevin run.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
from ase import units
from ase.md.langevin import Langevin

from mace_lpcalc.md.base import (MDProtocol, MDSettings, setting,
                                        random_generator, timestep)


@dataclasses.dataclass
class NVTSettings(MDSettings):
    friction_per_fs: float = setting(0.01, "Langevin friction coefficient (1/fs)")

    def __post_init__(self):
        super().__post_init__()
        if not self.temperature_K > 0:
            raise ValueError(f"a Langevin thermostat needs temperature_K > 0, got "
                             f"{self.temperature_K} (for a run without a bath use nve)")
        if not self.friction_per_fs > 0:
            raise ValueError(f"friction_per_fs must be positive, got {self.friction_per_fs}")


class NVT(MDProtocol):
    """Canonical MD with ASE's ``Langevin`` (Vanden-Eijnden–Ciccotti integrator)."""

    name = "nvt"
    settings_class = NVTSettings
    conserves_energy = False  # the Langevin bath exchanges heat

    def build_dynamics(self, atoms, state):
        settings = self.settings
        rng = random_generator(settings.seed, stream=1)
        if state is not None:
            rng.bit_generator.state = json.loads(str(state["rng"]))
        return Langevin(atoms, timestep(settings), temperature_K=settings.temperature_K,
                        friction=settings.friction_per_fs / units.fs, fixcm=False, rng=rng)

    def dynamics_state(self, dynamics):
        return {"rng": np.array(json.dumps(dynamics.rng.bit_generator.state))}

