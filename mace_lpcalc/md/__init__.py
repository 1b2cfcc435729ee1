"""The MD floor: protocols NVT (Langevin), NPT (isotropic MTK) and NVE (velocity Verlet),
their trajectory file, checkpoints and progress lines.

Each protocol is a class with a settings dataclass and ``run()``; its command line is
``python -m mace_lpcalc.protocols.nvt`` (and ``.npt``, ``.nve``)::

    python -m mace_lpcalc.protocols.nvt water.xyz --policy fp32-linear-bf16 --steps 10000
    python -m mace_lpcalc.protocols.npt water.xyz --settings protocols/npt_water.toml

Every run writes one trajectory file (:mod:`mace_lpcalc.md.trajectory`) and a checkpoint
beside it, from which ``--resume`` continues a killed run exactly.
"""

import importlib

#: Protocol class name -> defining module. Imported on first access, so that
#: ``python -m mace_lpcalc.protocols.nvt`` does not import the md module twice.
_EXPORTS = {"MDProtocol": "base", "MDSettings": "base", "build_calculator": "inputs",
            "NVT": "nvt", "NVTSettings": "nvt", "NPT": "npt", "NPTSettings": "npt",
            "NVE": "nve", "NVESettings": "nve"}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
