"""``python -m mace_lpcalc.protocols.nvt STRUCTURE [options]``: :mod:`mace_lpcalc.md.nvt`."""

from mace_lpcalc.md.base import main
from mace_lpcalc.md.nvt import NVT, NVTSettings

__all__ = ["NVT", "NVTSettings"]

if __name__ == "__main__":
    main(NVT)
