"""``python -m mace_lpcalc.profile``: the command line of :mod:`mace_lpcalc.perf.profile`."""

from mace_lpcalc.perf.profile import main

if __name__ == "__main__":
    main()
