"""ASE's isotropic MTK barostat with less Python per step, for batched replicas.

Batched replicas share one model call per step, so what remains per replica is the
integrator's Python: ASE's ``IsotropicMTKNPT`` spends ~0.6 ms a step on 648 atoms
(bench/results/cpu_replica_python_648.json), most of it advancing its Nosé–Hoover chains
one numpy scalar at a time, rebuilding the kinetic stress from the atoms, and setting
positions, momenta and cell on the atoms before each of its four property reads.
:class:`LeanIsotropicMTKNPT` integrates the same equations with the same splitting and
keeps the same state in the same attributes (so checkpoints of either resume in the
other), and differs only in how it computes them:

* the chains advance as Python floats, and the particle thermostat rescales the momenta
  once per half step, tracking their kinetic energy through the rescalings instead of
  summing it again after each;
* the ideal-gas part of the pressure, ``Σ p²/m / 3V``, comes from the momenta it holds,
  summed twice a step (the thermostat's rescaling carries it forward);
* the atoms are updated three times a step (at its start, before the force call and at
  its end), not before each of four property reads.

Results agree with ASE's to rounding (``tests/test_mtk.py``).
"""

from __future__ import annotations

import math

import numpy as np
from ase.calculators.calculator import CalculationFailed
from ase.md.nose_hoover_chain import FOURTH_ORDER_COEFFS, IsotropicMTKNPT
from scipy.special import exprel


def advance_chain(p_chain: list, q_chain: list, masses: list, kT: float, twice_kinetic: float,
                  driving_kT: float, delta: float, loops: int) -> float:
    """Advance a Nosé–Hoover chain by ``delta`` (fourth-order Suzuki–Yoshida, ``loops``
    sub-steps), in place, as ASE's thermostat and barostat chains do.

    Args:
        p_chain, q_chain, masses: the chain's momenta, positions and masses (lists).
        kT: thermal energy (eV) of each chain link.
        twice_kinetic: twice the kinetic energy of the variable the chain thermostats
            (``Σ p²/m`` of the atoms, ``p_ε²/W`` of the cell).
        driving_kT: what that term is driven towards (3N kT for the atoms, kT for the cell).

    Returns:
        The factor by which the thermostatted momenta are to be scaled.
    """
    n, scale = len(p_chain), 1.0

    def kick(j: int, delta2: float, delta4: float) -> None:
        damping = math.exp(-delta4 * p_chain[j + 1] / masses[j + 1]) if j < n - 1 else 1.0
        force = (twice_kinetic - driving_kT if j == 0
                 else p_chain[j - 1] ** 2 / masses[j - 1] - kT)
        p_chain[j] = (p_chain[j] * damping + delta2 * force) * damping

    for _ in range(loops):
        for coefficient in FOURTH_ORDER_COEFFS:
            sub = coefficient * delta / loops
            for j in reversed(range(n)):
                kick(j, sub / 2, sub / 4)
            for j in range(n):
                q_chain[j] += sub * p_chain[j] / masses[j]
            factor = math.exp(-sub * p_chain[0] / masses[0])
            scale *= factor
            twice_kinetic *= factor * factor
            for j in range(n):
                kick(j, sub / 2, sub / 4)
    return scale


class LeanIsotropicMTKNPT(IsotropicMTKNPT):
    """``IsotropicMTKNPT`` with the per-step Python of a batched replica cut down (same
    constructor, state, conserved energy and checkpoints)."""

    def step(self) -> None:
        try:
            self._step()
        except OverflowError as err:  # ASE's numpy would carry on with inf
            raise CalculationFailed(
                f"the MTK thermostat or barostat chain diverged ({err}): the timestep is too "
                "long for the damping times, or the system is far from the target "
                "temperature and pressure") from err

    def _step(self) -> None:
        dt2 = self.dt / 2
        self._update_atoms()  # the state, not whatever was done to the atoms since, is the truth
        self._advance_barostat_chain(dt2)
        twice_kinetic = self._advance_thermostat_chain(dt2, self._twice_kinetic())
        forces, virial_pressure = self._forces_and_virial_pressure()
        self._kick_cell(dt2, virial_pressure, twice_kinetic)
        self._kick_atoms(dt2, forces)
        self._integrate_q(self.dt)
        self._integrate_q_cell(self.dt)
        self._update_atoms()
        forces, virial_pressure = self._forces_and_virial_pressure()
        self._kick_atoms(dt2, forces)
        twice_kinetic = self._twice_kinetic()
        self._kick_cell(dt2, virial_pressure, twice_kinetic)
        self._advance_thermostat_chain(dt2, twice_kinetic)
        self._advance_barostat_chain(dt2)
        self._update_atoms()

    def _forces_and_virial_pressure(self) -> tuple[np.ndarray, float]:
        forces = self.atoms.get_forces(md=True)
        stress = self.atoms.get_stress(voigt=True, include_ideal_gas=False)
        return forces, -float(stress[:3].sum()) / 3

    def _twice_kinetic(self) -> float:
        return float(np.sum(self._p**2 / self.masses))

    def _advance_thermostat_chain(self, delta: float, twice_kinetic: float) -> float:
        """Advance the particle thermostat, given ``Σ p²/m`` of the momenta now; return it
        for the rescaled momenta."""
        chain = self._thermostat
        p_eta, eta = chain._p_eta.tolist(), chain._eta.tolist()
        scale = advance_chain(p_eta, eta, chain._Q.tolist(), chain._kT, twice_kinetic,
                              3 * self._num_atoms_global * chain._kT, delta, chain._tloop)
        chain._p_eta[:], chain._eta[:] = p_eta, eta
        self._p *= scale
        return twice_kinetic * scale * scale

    def _advance_barostat_chain(self, delta: float) -> None:
        chain = self._barostat
        p_xi, xi = chain._p_xi.tolist(), chain._xi.tolist()
        scale = advance_chain(p_xi, xi, chain._R.tolist(), chain._kT,
                              self._p_eps**2 / chain.W, chain._kT, delta, chain._ploop)
        chain._p_xi[:], chain._xi[:] = p_xi, xi
        self._p_eps *= scale

    def _kick_cell(self, delta: float, virial_pressure: float, twice_kinetic: float) -> None:
        """exp(i L_(ε,2) δ): the cell momentum from the pressure excess, ideal gas (from
        ``twice_kinetic``, Σ p²/m) included."""
        volume = self._get_volume()
        self._p_eps += delta * (3 * volume * (virial_pressure - self._pressure_au)
                                + twice_kinetic * (1 + 1 / self._num_atoms_global))

    def _kick_atoms(self, delta: float, forces: np.ndarray) -> None:
        """exp(i L_2 δ): the momenta from the forces, damped by the cell's motion."""
        x = (1 + 1 / self._num_atoms_global) * self._p_eps * delta / self._barostat.W
        self._p = self._p * np.exp(-x) + delta * forces * exprel(-x)
