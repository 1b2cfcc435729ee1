"""Thermodynamic series: energy drift, and which protocols conserve an energy.

Only an integrator with a conserved quantity has a drift worth reporting: velocity
Verlet (NVE, the total energy) and isotropic MTK (NPT, its extended-system energy). ASE's
Langevin integrator (NVT) exchanges heat with its bath and exposes no conserved quantity,
so its runs log the plain total energy as ``conserved_energy``
(:mod:`mace_lpcalc.md.trajectory`); a slope of that says nothing about the integration.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from mace_lpcalc.analysis.statistics import statistical_inefficiency

#: Protocols (the trajectory's ``protocol`` attribute) whose ``conserved_energy`` series is
#: not conserved: the ``conserves_energy = False`` protocols of :mod:`mace_lpcalc.md`
#: (listed here because the analysis floor does not import the MD floor, which loads
#: torch; a test checks that the two agree).
PROTOCOLS_WITHOUT_CONSERVED_ENERGY = frozenset({"nvt"})


def has_conserved_energy(protocol: str) -> bool:
    """Whether runs of ``protocol`` log a truly conserved energy (so a drift means something)."""
    return protocol not in PROTOCOLS_WITHOUT_CONSERVED_ENERGY


def energy_drift(time_ps, total_energy_eV, n_atoms: int) -> tuple[float, float]:
    """Linear drift of an energy that should be conserved, meV/atom/ps.

    ``time_ps`` and ``total_energy_eV`` have shape ``(n_frames,)``. Returns the
    least-squares slope (``scipy.stats.linregress``) divided by ``n_atoms``, and its
    standard error: the regression's, which treats the fluctuations about the line as
    independent, times √g of those fluctuations (their statistical inefficiency,
    :func:`~mace_lpcalc.analysis.statistics.statistical_inefficiency`), so that
    correlated fluctuations widen it as they widen the error of a mean.
    """
    time_ps = np.asarray(time_ps, dtype=float)
    energy = np.asarray(total_energy_eV, dtype=float)
    if time_ps.ndim != 1 or time_ps.shape != energy.shape:
        raise ValueError(f"time_ps {time_ps.shape} and total_energy_eV {energy.shape} must be "
                         "one-dimensional and of equal length")
    if len(time_ps) < 3:
        raise ValueError("an energy drift needs at least three frames")
    if n_atoms < 1:
        raise ValueError(f"n_atoms must be positive, got {n_atoms}")
    if not (np.all(np.isfinite(time_ps)) and np.all(np.isfinite(energy))):
        raise ValueError("time_ps and total_energy_eV must be finite")
    if np.ptp(time_ps) == 0:
        raise ValueError("time_ps must span a non-zero interval")
    fit = stats.linregress(time_ps, energy)
    residuals = energy - (fit.intercept + fit.slope * time_ps)
    to_meV_per_atom = 1000.0 / n_atoms
    stderr = fit.stderr * np.sqrt(statistical_inefficiency(residuals))
    return float(fit.slope * to_meV_per_atom), float(stderr * to_meV_per_atom)

