"""Command lines of the MD protocols: ``python -m mace_lpcalc.protocols.nvt|npt|nve``.

The protocols themselves live in :mod:`mace_lpcalc.md`; their names are re-exported here
(``from mace_lpcalc.protocols import NPT``) on first access.
"""

import importlib

__all__ = ["MDProtocol", "MDSettings", "build_calculator", "NVT", "NVTSettings", "NPT",
           "NPTSettings", "NVE", "NVESettings"]


def __getattr__(name):
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module("mace_lpcalc.md"), name)
