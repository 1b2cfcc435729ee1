"""mace_lpcalc: fast, reduced-precision MACE molecular dynamics with the physics checked.

The calculator and the policy registry are imported on first access, so that reading and
analysing a trajectory (:mod:`mace_lpcalc.md.trajectory`, :mod:`mace_lpcalc.analysis`)
loads neither torch nor mace.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {"LowPrecisionMACECalculator": "mace_lpcalc.calculator",
            "POLICIES": "mace_lpcalc.precision.policies",
            "PrecisionPolicy": "mace_lpcalc.precision.policies",
            "get_policy": "mace_lpcalc.precision.policies"}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
