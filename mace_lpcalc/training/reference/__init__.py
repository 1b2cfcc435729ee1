"""Reference data from an independent engine: SPC/Fw flexible water computed by OpenMM.

OpenMM is an optional dependency (``pip install 'mace_lpcalc[reference]'``); nothing
else in the package imports this subpackage.
"""

from mace_lpcalc.training.reference.spcfw import SPCFW_PARAMETERS, SPCFwCalculator, spcfw_forcefield, spcfw_forcefield_xml

__all__ = ["SPCFW_PARAMETERS", "SPCFwCalculator", "spcfw_forcefield", "spcfw_forcefield_xml"]
