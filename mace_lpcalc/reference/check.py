"""``python -m mace_lpcalc.reference.check``: the command line of :mod:`mace_lpcalc.training.reference.check`."""

from mace_lpcalc.training.reference.check import main

if __name__ == "__main__":
    main()
