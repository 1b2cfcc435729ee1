"""``python -m mace_lpcalc.protocols.nve STRUCTURE [options]``: :mod:`mace_lpcalc.md.nve`."""

from mace_lpcalc.md.cli import main
from mace_lpcalc.md.nve import NVE, NVESettings
from mace_lpcalc.fastpath.compiled import shorten_switch_interval_of_this_process

__all__ = ["NVE", "NVESettings"]

if __name__ == "__main__":
    shorten_switch_interval_of_this_process()
    main(NVE)
