"""Observables and comparisons for validating reduced-precision MD against FP64.

Pure functions over arrays (ASE units: Å, eV, ps, K, bar) plus a reader for run files:

* :mod:`.runs` — :func:`load_run` reads a run file (MDTraj HDF5 + per-frame series).
* :mod:`.structure` — partial RDFs per element pair (MDTraj), coordination numbers.
* :mod:`.dynamics` — windowed MSD (FFT) and Einstein diffusion coefficients with errors.
* :mod:`.thermodynamics` — energy drift.
* :mod:`.statistics` — blocking averages, seed averages, significance of differences.
* :mod:`.deviations` — static energy/force deviations from an FP64 reference.
* :mod:`.report` / :mod:`.plots` — the per-run reduction and plots behind
  ``python -m mace_lpcalc.analysis.compare``.
"""

from mace_lpcalc.analysis.deviations import StaticDeviations, evaluate_static_deviations, static_deviations
from mace_lpcalc.analysis.dynamics import DiffusionCoefficient, diffusion_coefficient, mean_squared_displacement
from mace_lpcalc.analysis.runs import Run, load_run
from mace_lpcalc.analysis.statistics import (BlockAverage, Difference, SeedAverage, block_average,
                         difference_of_averages, seed_average, welch_difference, z_difference)
from mace_lpcalc.analysis.structure import (RadialDistribution, coordination_number, element_pairs,
                        max_rdf_radius_A, radial_distribution)
from mace_lpcalc.analysis.thermodynamics import energy_drift

__all__ = [
    "BlockAverage", "Difference", "DiffusionCoefficient", "RadialDistribution", "Run",
    "SeedAverage", "StaticDeviations", "block_average",
    "coordination_number", "diffusion_coefficient", "difference_of_averages",
    "element_pairs", "energy_drift", "evaluate_static_deviations", "load_run",
    "max_rdf_radius_A", "mean_squared_displacement", "radial_distribution",
    "seed_average", "static_deviations", "welch_difference", "z_difference",
]
