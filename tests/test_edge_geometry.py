"""The engine's index_select gathers: mace's values, only for the engine's own calls."""

import concurrent.futures
import time

import mace  # noqa: F401  -- before e3nn
import torch
from e3nn.util import jit
from mace.modules import utils as mace_utils

from mace_lpcalc.fastpath import edge_geometry
from tiny_models import build_tiny_model


def _edges(seed=0):
    generator = torch.Generator().manual_seed(seed)
    positions = torch.randn(12, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    edge_index = torch.randint(0, 12, (2, 40), generator=generator)
    shifts = torch.randn(40, 3, dtype=torch.float64, generator=generator)
    return positions, edge_index, shifts


def test_values_and_gradients_equal_maces():
    positions, edge_index, shifts = _edges()
    for normalize in (False, True):
        expected = edge_geometry._mace_edge_vectors_and_lengths(positions, edge_index, shifts,
                                                                normalize)
        got = edge_geometry.edge_vectors_and_lengths(positions, edge_index, shifts, normalize)
        for value, reference in zip(got, expected):
            torch.testing.assert_close(value, reference, rtol=1e-14, atol=1e-14)
            (gradient,) = torch.autograd.grad(value.pow(3).sum(), positions, retain_graph=True)
            (expected_gradient,) = torch.autograd.grad(reference.pow(3).sum(), positions,
                                                    retain_graph=True)
            torch.testing.assert_close(gradient, expected_gradient, rtol=1e-12, atol=1e-12)


def test_only_the_thread_inside_the_block_gets_index_select(monkeypatch):
    calls = []
    original = edge_geometry.edge_vectors_and_lengths
    monkeypatch.setattr(edge_geometry, "edge_vectors_and_lengths",
                        lambda *args: calls.append(time.monotonic()) or original(*args))
    positions, edge_index, shifts = _edges()

    def mace_call():
        return mace_utils.get_edge_vectors_and_lengths(positions, edge_index, shifts)

    with edge_geometry.index_select_gathers():
        mace_call()
        assert len(calls) == 1
        concurrent.futures.ThreadPoolExecutor(1).submit(mace_call).result()
        assert len(calls) == 1  # the other thread ran mace's own function
    mace_call()
    assert len(calls) == 1  # and so does this one after the block


def test_a_mace_model_still_scripts_with_the_dispatcher_installed(water_batch):
    edge_geometry.install_dispatcher()
    model = build_tiny_model(dtype=torch.float32)
    scripted = jit.compile(model)  # how mace scripts a model (its LAMMPS export)
    expected = model(water_batch(), compute_stress=True)
    got = scripted(water_batch(), compute_stress=True)
    for name in ("energy", "forces", "stress"):
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
