"""``python -m mace_lpcalc.train``: the command line of :mod:`mace_lpcalc.training.train`."""

from mace_lpcalc.training.train import main

if __name__ == "__main__":
    main()
