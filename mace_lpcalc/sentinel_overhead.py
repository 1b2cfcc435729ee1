"""``python -m mace_lpcalc.sentinel_overhead``: the command line of :mod:`mace_lpcalc.perf.sentinel_overhead`."""

from mace_lpcalc.perf.sentinel_overhead import main

if __name__ == "__main__":
    main()
