"""mace_lpcalc: fast, reduced-precision MACE molecular dynamics with the physics checked.

Import order matters: ``mace`` must be imported before ``e3nn`` because mace sets the
``torch.load`` flag that e3nn 0.4.4 needs for its constant tables.
"""

import mace  # noqa: F401  -- before e3nn, see above

__version__ = "0.1.0"

from .calculator import LowPrecisionMACECalculator  # noqa: E402
from .policies import POLICIES, PrecisionPolicy, get_policy  # noqa: E402

__all__ = ["LowPrecisionMACECalculator", "POLICIES", "PrecisionPolicy", "get_policy"]
