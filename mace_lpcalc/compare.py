"""``python -m mace_lpcalc.compare``: the command line of :mod:`mace_lpcalc.analysis.compare`."""

import sys

from mace_lpcalc.analysis.compare import main

if __name__ == "__main__":
    sys.exit(main())
