"""Isothermal-isobaric MD of a periodic system (isotropic cell fluctuations).

Run ``python -m mace_lpcalc.protocols.npt STRUCTURE [options]`` (``--help`` lists them;
``protocols/npt_water.toml`` holds the thesis settings for water).

Integrator: ASE's ``IsotropicMTKNPT`` (``ase.md.nose_hoover_chain``), the
Martyna–Tobias–Klein equations with Nosé–Hoover chains on the particles and on the
volume, integrated by a time-reversible Liouville-operator splitting; run as
:class:`~mace_lpcalc.md.mtk.LeanIsotropicMTKNPT`, the same integrator with less Python a
step (it matters for batched replicas). Why this one among ASE 3.29's barostats:

* MTK samples the isothermal-isobaric ensemble exactly (volume fluctuations included);
  Berendsen (``NPTBerendsen``) rescales toward the target and gives wrong fluctuations;
  ASE's ``NPT`` (Melchionna) lacks the MTK correction terms, so its volume distribution
  is biased (worst for small boxes), needs an upper-triangular cell, and is deprecated
  under that name;
* it is deterministic and exposes a conserved quantity (logged as ``conserved_energy``),
  which checks the integration like NVE's total energy does — unlike the stochastic
  ``LangevinBAOAB``.

The thesis ran Melchionna NPT with a 100 fs thermostat time and a barostat set by
``pfactor = ptime² B`` (B = 2.2 GPa for water). Here the thermostat damping time is that
100 fs, and the barostat damping time is chosen so the MTK volume oscillation has the
frequency Melchionna's ``pfactor`` gives (:func:`mtk_barostat_damping_fs`). MTK scales the
cell isotropically, so it needs no upper-triangular cell; the cell is used as given.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from ase import Atoms, units

from mace_lpcalc.compat import mtk_state, set_mtk_state
from mace_lpcalc.md.base import (MDProtocol, MDSettings, periodic_cell_required,
                                        setting, timestep)
from mace_lpcalc.md.mtk import LeanIsotropicMTKNPT


@dataclasses.dataclass
class NPTSettings(MDSettings):
    pressure_bar: float = setting(1.01325, "external pressure (bar)")
    thermostat_time_fs: float = setting(100.0, "Nosé-Hoover thermostat damping time (fs)")
    barostat_time_fs: float = setting(75.0, "barostat time scale ptime of pfactor = "
                                            "ptime² B (fs)")
    bulk_modulus_GPa: float = setting(2.2, "bulk modulus B that sets the barostat mass "
                                           "(GPa; 2.2 for water)")

    def __post_init__(self):
        super().__post_init__()
        for name in ("thermostat_time_fs", "barostat_time_fs", "bulk_modulus_GPa",
                     "temperature_K"):
            if not getattr(self, name) > 0:
                raise ValueError(f"NPT needs a positive {name}, got {getattr(self, name)}")


def mtk_barostat_damping_fs(barostat_time_fs: float, bulk_modulus_GPa: float,
                            volume_A3: float, n_atoms: int, temperature_K: float) -> float:
    """MTK barostat damping time (fs) giving the volume oscillation of Melchionna's
    ``pfactor = ptime² B``.

    Linearising both barostats about equilibrium (δP = −3B δε for a log-strain ε):
    Melchionna's ε̈ = −(3B / pfactor) ε has ω² = 3 / ptime²; MTK's, with barostat mass
    W = (3N + 3) kT τ², has ω² = 9 V B / W. Equal frequencies give
    τ = ptime √(3 V B / ((3N + 3) kT)).
    """
    bulk_modulus = bulk_modulus_GPa * units.GPa
    kT = units.kB * temperature_K
    return barostat_time_fs * float(np.sqrt(3 * volume_A3 * bulk_modulus
                                            / ((3 * n_atoms + 3) * kT)))


class NPT(MDProtocol):
    """Isotropic NPT with ASE's ``IsotropicMTKNPT`` (as :class:`LeanIsotropicMTKNPT`)."""

    name = "npt"
    settings_class = NPTSettings
    #: ASE's ``IsotropicMTKNPT`` or a subclass (benchmarks time both).
    integrator = LeanIsotropicMTKNPT

    def check_structure(self, atoms: Atoms) -> None:
        periodic_cell_required(atoms, "NPT")

    def build_dynamics(self, atoms, state):
        settings = self.settings
        if state is None:
            barostat_damping_fs = mtk_barostat_damping_fs(
                settings.barostat_time_fs, settings.bulk_modulus_GPa, atoms.get_volume(),
                len(atoms), settings.temperature_K)
        else:
            barostat_damping_fs = float(state["barostat_damping_fs"])
        dynamics = self.integrator(
            atoms, timestep(settings), temperature_K=settings.temperature_K,
            pressure_au=settings.pressure_bar * units.bar,
            tdamp=settings.thermostat_time_fs * units.fs,
            pdamp=barostat_damping_fs * units.fs)
        dynamics.barostat_damping_fs = barostat_damping_fs
        if state is not None:
            # The reference cell and log-volume strain, not the current cell, define
            # the cell MTK rebuilds each step: restore them exactly.
            set_mtk_state(dynamics, state)
        return dynamics

    def dynamics_state(self, dynamics):
        """MTK's internal variables and the damping they were built with."""
        return {"barostat_damping_fs": np.array(dynamics.barostat_damping_fs),
                **{name: np.array(value) for name, value in mtk_state(dynamics).items()}}

