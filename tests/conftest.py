"""Shared fixtures: tiny models and small structures, all built in code."""

import mace  # noqa: F401  -- before e3nn
import numpy as np
import pytest
import torch

from mace_lpcalc.models import build_tiny_model
from mace_lpcalc.systems import water_box

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model_factory():
    """Fresh copies of one seeded tiny model (H, C, O), float64."""
    return lambda: build_tiny_model()


@pytest.fixture
def water8():
    """8 water molecules (24 atoms), periodic, 1 g/cm³, slightly distorted from rigid geometry."""
    atoms = water_box(8, seed=1)
    atoms.positions += np.random.default_rng(0).normal(scale=0.03, size=atoms.positions.shape)
    return atoms
