"""``python -m mace_lpcalc.reference.generate``: the command line of :mod:`mace_lpcalc.training.reference.generate`."""

from mace_lpcalc.training.reference.generate import main

if __name__ == "__main__":
    main()
