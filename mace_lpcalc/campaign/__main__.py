"""``python -m mace_lpcalc.campaign CAMPAIGN.toml``: the command line of :mod:`.cli`."""

import sys

from mace_lpcalc.campaign.cli import main

if __name__ == "__main__":
    sys.exit(main())
