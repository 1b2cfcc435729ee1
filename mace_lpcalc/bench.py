"""``python -m mace_lpcalc.bench``: the command line of :mod:`mace_lpcalc.perf.bench`."""

from mace_lpcalc.perf.bench import main

if __name__ == "__main__":
    main()
