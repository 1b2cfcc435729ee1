"""``build_tiny_model`` for the tests: each set of arguments is built once, then copied.

Building a tiny MACE runs e3nn's code generation and TorchScript (about 1.7 s on a CPU);
a deep copy of the built model takes a tenth of that and holds the same weights, since
the builder is seeded. Every call still returns a fresh model, so a test may change it
(apply a policy, convert its backend) without touching any other test's.
"""

import copy
import functools

import torch

from mace_lpcalc.models import build_tiny_model as _build_tiny_model


@functools.lru_cache(maxsize=None)
def _built_once(atomic_numbers, r_max, seed, dtype):
    """The model, and torch's global generator state the seeded build leaves behind."""
    model = _build_tiny_model(atomic_numbers, r_max=r_max, seed=seed, dtype=dtype)
    return model, torch.get_rng_state()


def build_tiny_model(atomic_numbers=(1, 6, 8), *, r_max: float = 4.0, seed: int = 0,
                     dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """A fresh copy of ``mace_lpcalc.models.build_tiny_model`` with these arguments."""
    model, generator_state = _built_once(tuple(int(z) for z in atomic_numbers), float(r_max),
                                         seed, dtype)
    # The builder seeds and draws from torch's global generator; leave it as a build would.
    torch.set_rng_state(generator_state)
    return copy.deepcopy(model)
