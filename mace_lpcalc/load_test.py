"""``python -m mace_lpcalc.load_test``: the command line of :mod:`mace_lpcalc.perf.load_test`."""

from mace_lpcalc.perf.load_test import main

if __name__ == "__main__":
    main()
