"""``python -m mace_lpcalc.protocols.nve STRUCTURE [options]``: :mod:`mace_lpcalc.md.nve`."""

from mace_lpcalc.md.base import main
from mace_lpcalc.md.nve import NVE, NVESettings

__all__ = ["NVE", "NVESettings"]

if __name__ == "__main__":
    main(NVE)
