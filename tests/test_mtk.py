"""The lean MTK integrator is ASE's IsotropicMTKNPT to rounding, and shares its state."""

import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.md.nose_hoover_chain import IsotropicMTKNPT

from mace_lpcalc.compat import mtk_state, set_mtk_state
from mace_lpcalc.md.mtk import LeanIsotropicMTKNPT


def _copper(seed=1):
    """A hot, compressed, rattled copper crystal: the barostat and both chains work hard."""
    atoms = bulk("Cu", cubic=True).repeat(3)
    atoms.rattle(0.05, seed=seed)
    atoms.set_momenta(np.random.default_rng(seed).normal(size=(len(atoms), 3)) * 0.5)
    atoms.calc = EMT()
    return atoms


def _dynamics(integrator, atoms):
    return integrator(atoms, 2 * units.fs, temperature_K=500, pressure_au=1e4 * units.bar,
                      tdamp=50 * units.fs, pdamp=200 * units.fs, tchain=3, pchain=2, tloop=2)


def _state(dynamics):
    atoms = dynamics.atoms
    return np.concatenate([atoms.positions.ravel(), atoms.get_momenta().ravel(),
                           atoms.cell.array.ravel(), *(np.ravel(v) for v in
                                                       mtk_state(dynamics).values())])


def test_lean_integrator_follows_ase_step_for_step():
    ase_run = _dynamics(IsotropicMTKNPT, _copper())
    lean_run = _dynamics(LeanIsotropicMTKNPT, _copper())
    volumes = []
    for _ in range(100):
        ase_run.run(1)
        lean_run.run(1)
        volumes.append(lean_run.atoms.get_volume())
        np.testing.assert_allclose(_state(lean_run), _state(ase_run), rtol=1e-9, atol=1e-11)
    assert np.ptp(volumes) > 0.01 * volumes[0]  # the cell really moved
    assert lean_run.get_conserved_energy() == pytest.approx(ase_run.get_conserved_energy(),
                                                            abs=1e-9)


def test_conserved_energy_is_conserved():
    lean_run = _dynamics(LeanIsotropicMTKNPT, _copper(seed=3))
    start = lean_run.get_conserved_energy()
    kinetic = []
    for _ in range(200):
        lean_run.run(1)
        kinetic.append(lean_run.atoms.get_kinetic_energy())
    drift = abs(lean_run.get_conserved_energy() - start) / len(lean_run.atoms)
    assert drift < 2e-4  # eV/atom over 400 fs, against kinetic swings of:
    assert np.ptp(kinetic) / len(lean_run.atoms) > 50 * drift


@pytest.mark.parametrize("first, second", [(LeanIsotropicMTKNPT, IsotropicMTKNPT),
                                           (IsotropicMTKNPT, LeanIsotropicMTKNPT)])
def test_a_checkpoint_of_either_continues_in_the_other(first, second):
    run = _dynamics(first, _copper())
    run.run(30)
    continued = _copper()
    continued.set_positions(run.atoms.positions)
    continued.set_momenta(run.atoms.get_momenta())
    continued.set_cell(run.atoms.cell)
    resumed = _dynamics(second, continued)
    set_mtk_state(resumed, mtk_state(run))
    run.run(20)
    resumed.run(20)
    np.testing.assert_allclose(_state(resumed), _state(run), rtol=1e-9, atol=1e-11)
