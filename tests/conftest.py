"""Shared fixtures: tiny models and small structures, all built in code."""

import ase.io
import mace  # noqa: F401  -- before e3nn
import numpy as np
import pytest
import torch

from tiny_models import build_tiny_model
from mace_lpcalc.systems import water_box

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def own_cache_root(tmp_path_factory):
    """The package's on-disk caches (and the child processes' the tests start) go to a
    directory of the test session's, not the user's home."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MACE_LPCALC_CACHE_DIR", str(tmp_path_factory.mktemp("cache_root")))
        yield


@pytest.fixture(scope="session")
def tiny_model_factory():
    """Fresh copies of one seeded tiny model (H, C, O), float64."""
    return lambda: build_tiny_model()


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models gain nothing from threads, and threads on a busy machine thrash; exact
    equality between processes also needs the same thread count in each."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def water8():
    """8 water molecules (24 atoms), periodic, 1 g/cm³, slightly distorted from rigid geometry."""
    atoms = water_box(8, seed=1)
    atoms.positions += np.random.default_rng(0).normal(scale=0.03, size=atoms.positions.shape)
    return atoms


@pytest.fixture
def water_batch():
    """A function returning mace's batch dictionary for a 4-molecule box (tiny model, fp32)."""
    from mace import data as mace_data
    from mace.tools import torch_geometric, utils

    atoms = water_box(4, seed=3)
    z_table = utils.AtomicNumberTable([1, 6, 8])

    def make():
        config = mace_data.config_from_atoms(atoms)
        graph = mace_data.AtomicData.from_config(config, z_table=z_table, cutoff=4.0)
        batch = torch_geometric.Batch.from_data_list([graph]).to_dict()
        return {key: value.float() if torch.is_tensor(value) and value.is_floating_point()
                else value for key, value in batch.items()}
    return make


@pytest.fixture(scope="module")
def water_files(tmp_path_factory):
    """A 24-atom water box and a tiny fp64-capable MACE model (H, O) on disk."""
    folder = tmp_path_factory.mktemp("water")
    ase.io.write(folder / "water.xyz", water_box(8))
    torch.save(build_tiny_model(atomic_numbers=(1, 8)), folder / "tiny.model")
    return folder / "water.xyz", folder / "tiny.model"
