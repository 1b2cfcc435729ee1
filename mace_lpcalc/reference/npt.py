"""``python -m mace_lpcalc.reference.npt``: the command line of :mod:`mace_lpcalc.training.reference.npt`."""

from mace_lpcalc.training.reference.npt import main

if __name__ == "__main__":
    main()
