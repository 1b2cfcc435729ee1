"""``python -m mace_lpcalc.protocols.npt STRUCTURE [options]``: :mod:`mace_lpcalc.md.npt`."""

from mace_lpcalc.md.base import main
from mace_lpcalc.md.npt import NPT, NPTSettings

__all__ = ["NPT", "NPTSettings"]

if __name__ == "__main__":
    main(NPT)
