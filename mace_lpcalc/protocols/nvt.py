"""``python -m mace_lpcalc.protocols.nvt STRUCTURE [options]``: :mod:`mace_lpcalc.md.nvt`."""

from mace_lpcalc.md.cli import main
from mace_lpcalc.md.nvt import NVT, NVTSettings
from mace_lpcalc.fastpath.compiled import shorten_switch_interval_of_this_process

__all__ = ["NVT", "NVTSettings"]

if __name__ == "__main__":
    shorten_switch_interval_of_this_process()
    main(NVT)
