"""``python -m mace_lpcalc.setup_time``: the command line of :mod:`mace_lpcalc.perf.setup_time`."""

from mace_lpcalc.perf.setup_time import main

if __name__ == "__main__":
    main()
