"""Observables and comparisons for validating reduced-precision MD against FP64.

Pure functions over arrays (ASE units: Å, eV, ps, K, bar) plus a reader for run files:

* :mod:`.runs` — :func:`load_run` reads a run file (MDTraj HDF5 + per-frame series).
* :mod:`.structure` — partial RDFs per element pair (MDTraj), coordination numbers.
* :mod:`.dynamics` — windowed MSD (FFT) and Einstein diffusion coefficients with errors.
* :mod:`.thermodynamics` — energy drift, and which protocols conserve an energy.
* :mod:`.statistics` — autocorrelation-aware averages (pymbar), equilibration detection,
  seed averages, differences.
* :mod:`.equivalence` — equivalence tests (TOST) against per-observable margins.
* :mod:`.deviations` — static energy/force/pressure deviations from an FP64 reference.
* :mod:`.screening` — the static screen: density shift predicted from the static pressure
  deviation and FP64's compressibility, and a bound on the drift a force error adds.
* :mod:`.report` / :mod:`.plots` / :mod:`.outputs` — the per-run reduction, plots and
  tables behind ``python -m mace_lpcalc.analysis.compare``.
"""

from mace_lpcalc.analysis.deviations import StaticDeviations, evaluate_static_deviations, static_deviations
from mace_lpcalc.analysis.dynamics import DiffusionCoefficient, diffusion_coefficient, mean_squared_displacement
from mace_lpcalc.analysis.equivalence import (DEFAULT_MARGINS, Equivalence, drift_ratio_test,
                                              equivalence_test, load_margins)
from mace_lpcalc.analysis.runs import Run, load_run
from mace_lpcalc.analysis.statistics import (Difference, SeedAverage, TimeseriesAverage,
                                             difference_of_averages, equilibration_start,
                                             seed_average, statistical_inefficiency,
                                             timeseries_average, welch_difference, z_difference)
from mace_lpcalc.analysis.structure import (RadialDistribution, coordination_number, element_pairs,
                        first_peak, max_rdf_radius_A, radial_distribution)
from mace_lpcalc.analysis.thermodynamics import energy_drift, has_conserved_energy

__all__ = [
    "DEFAULT_MARGINS", "Difference", "DiffusionCoefficient", "Equivalence",
    "RadialDistribution", "Run", "SeedAverage", "StaticDeviations", "TimeseriesAverage",
    "coordination_number", "diffusion_coefficient", "difference_of_averages",
    "drift_ratio_test", "element_pairs", "energy_drift", "equilibration_start",
    "equivalence_test", "evaluate_static_deviations", "first_peak", "has_conserved_energy",
    "load_margins", "load_run", "max_rdf_radius_A", "mean_squared_displacement",
    "radial_distribution", "seed_average", "statistical_inefficiency", "static_deviations",
    "timeseries_average", "welch_difference", "z_difference",
]
