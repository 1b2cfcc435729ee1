"""mace_lpcalc: fast, reduced-precision MACE molecular dynamics with the physics checked.

Import order matters: ``mace`` must be imported before ``e3nn`` because mace sets the
``torch.load`` flag (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``) that e3nn 0.4.4 needs for its
constant tables, which hold Python slices. torch then warns, at e3nn's import, that the
flag forced ``weights_only=False``: that one warning, from that one load, is silenced here.
"""

import warnings

import mace  # noqa: F401  -- before e3nn, see above

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY",
                            category=UserWarning, module=r"e3nn\.o3\._wigner")
    import e3nn.o3  # noqa: F401

__version__ = "0.1.0"

from .calculator import LowPrecisionMACECalculator  # noqa: E402
from .policies import POLICIES, PrecisionPolicy, get_policy  # noqa: E402

__all__ = ["LowPrecisionMACECalculator", "POLICIES", "PrecisionPolicy", "get_policy"]
