"""The lean MTK integrator is ASE's IsotropicMTKNPT to rounding, and shares its state."""

import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.calculators.calculator import CalculationFailed
from ase.calculators.emt import EMT
from ase.md.nose_hoover_chain import IsotropicMTKNPT

from mace_lpcalc.compat import mtk_state, set_mtk_state
from mace_lpcalc.md.mtk import LeanIsotropicMTKNPT, advance_chain


def _copper(seed=1):
    """A hot, compressed, rattled copper crystal: the barostat and both chains work hard."""
    atoms = bulk("Cu", cubic=True).repeat(3)
    atoms.rattle(0.05, seed=seed)
    atoms.set_momenta(np.random.default_rng(seed).normal(size=(len(atoms), 3)) * 0.5)
    atoms.calc = EMT()
    return atoms


def _dynamics(integrator, atoms, tchain=3, pchain=2, tloop=2, ploop=1):
    return integrator(atoms, 2 * units.fs, temperature_K=500, pressure_au=1e4 * units.bar,
                      tdamp=50 * units.fs, pdamp=200 * units.fs, tchain=tchain,
                      pchain=pchain, tloop=tloop, ploop=ploop)


def _state(dynamics):
    atoms = dynamics.atoms
    return np.concatenate([atoms.positions.ravel(), atoms.get_momenta().ravel(),
                           atoms.cell.array.ravel(), *(np.ravel(v) for v in
                                                       mtk_state(dynamics).values())])


@pytest.mark.parametrize("chains", [dict(), dict(tchain=1, pchain=1, tloop=3, ploop=2)])
def test_lean_integrator_follows_ase_step_for_step(chains):
    ase_run = _dynamics(IsotropicMTKNPT, _copper(), **chains)
    lean_run = _dynamics(LeanIsotropicMTKNPT, _copper(), **chains)
    volumes = []
    for _ in range(100):
        ase_run.run(1)
        lean_run.run(1)
        volumes.append(lean_run.atoms.get_volume())
        np.testing.assert_allclose(_state(lean_run), _state(ase_run), rtol=1e-9, atol=1e-11)
    assert np.ptp(volumes) > 0.01 * volumes[0]  # the cell really moved
    assert lean_run.get_conserved_energy() == pytest.approx(ase_run.get_conserved_energy(),
                                                            abs=1e-9)


@pytest.mark.parametrize("links, loops", [(1, 1), (3, 2), (4, 3)])
def test_a_chain_advances_as_ase_advances_its_barostat_chain(links, loops):
    """One long advance (where a wrong sub-step count shows), against ASE's own."""
    barostat = _dynamics(IsotropicMTKNPT, _copper(), pchain=links, ploop=loops)._barostat
    rng = np.random.default_rng(links)
    barostat._p_xi[:] = rng.normal(size=links) * 0.3
    p_xi, xi, p_eps = barostat._p_xi.tolist(), barostat._xi.tolist(), 2.0
    delta = 400 * units.fs
    expected = barostat.integrate_nhc_baro(p_eps, delta)
    scale = advance_chain(p_xi, xi, barostat._R.tolist(), barostat._kT, p_eps**2 / barostat.W,
                          barostat._kT, delta, loops)
    assert abs(expected / p_eps - 1) > 1e-3  # the chain did act on the cell momentum
    assert scale * p_eps == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(p_xi, barostat._p_xi, rtol=1e-12)
    np.testing.assert_allclose(xi, barostat._xi, rtol=1e-12)


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


def test_a_diverging_chain_fails_the_calculation_by_name():
    atoms = _copper()
    atoms.set_momenta(atoms.get_momenta() * 30)  # ~900 times the target temperature
    run = LeanIsotropicMTKNPT(atoms, 2 * units.fs, temperature_K=500, pressure_au=0.0,
                              tdamp=1 * units.fs, pdamp=200 * units.fs)
    with pytest.raises(CalculationFailed, match="chain diverged"):
        run.run(5)
