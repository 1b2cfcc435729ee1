"""``python -m mace_lpcalc.protocols.npt STRUCTURE [options]``: :mod:`mace_lpcalc.md.npt`."""

from mace_lpcalc.md.cli import main
from mace_lpcalc.md.npt import NPT, NPTSettings
from mace_lpcalc.fastpath.compiled import shorten_switch_interval_of_this_process

__all__ = ["NPT", "NPTSettings"]

if __name__ == "__main__":
    shorten_switch_interval_of_this_process()
    main(NPT)
