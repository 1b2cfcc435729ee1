"""``python -m mace_lpcalc.bench``: the command line of :mod:`mace_lpcalc.perf.bench`."""

from mace_lpcalc.perf.bench import main
from mace_lpcalc.fastpath.compiled import shorten_switch_interval_of_this_process

if __name__ == "__main__":
    shorten_switch_interval_of_this_process()
    main()
