"""Element-dependent skip connections as per-element block matmuls, against the original."""

import concurrent.futures

import mace  # noqa: F401  -- before e3nn
import numpy as np
import pytest
import torch
from e3nn import o3
from mace.calculators import MACECalculator

from mace_lpcalc.installed import _convert_backend
from mace_lpcalc.fastpath.element_skip import ElementSkip, convert_element_skips, elements_in_use
from mace_lpcalc.fastpath.engine import MACEEngine
from tiny_models import build_tiny_model
from mace_lpcalc.systems import water_box

ELEMENTS = (1, 6, 8)
R_MAX = 4.0

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("backend", ["e3nn", "cuequivariance"])
def test_element_skip_reproduces_the_tensor_product_and_its_gradient(backend):
    model = _convert_backend(build_tiny_model(ELEMENTS, r_max=R_MAX), backend, "cpu")
    generator = torch.Generator().manual_seed(0)
    for interaction in model.interactions:
        original = interaction.skip_tp
        skip = ElementSkip(original)
        x = torch.randn(40, o3.Irreps(str(original.irreps_in1)).dim, dtype=torch.float64,
                        generator=generator, requires_grad=True)
        species = torch.tensor([0, 2] * 20)  # H and O only, as in water
        one_hot = torch.nn.functional.one_hot(species, len(ELEMENTS)).double()
        expected = original(x, one_hot)
        (expected_grad,) = torch.autograd.grad(expected.pow(2).sum(), x)
        for elements in (None, (0, 2)):
            with elements_in_use(elements):
                got = skip(x, one_hot)
            (got_grad,) = torch.autograd.grad(got.pow(2).sum(), x)
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(got_grad, expected_grad, rtol=1e-12, atol=1e-12)
        # Restricted to H alone, the oxygen rows lose their skip term: the restriction is
        # real, which is why the engine includes every element it writes.
        with elements_in_use((0,)):
            assert not torch.allclose(skip(x, one_hot)[1::2], expected[1::2])
        # The restriction is this thread's, for the block only.
        with elements_in_use((0,)):
            other_thread = concurrent.futures.ThreadPoolExecutor(1).submit(skip, x, one_hot)
            torch.testing.assert_close(other_thread.result(), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(skip(x, one_hot), expected, rtol=1e-12, atol=1e-12)


def test_a_product_with_a_non_scalar_second_input_is_refused():
    product = o3.FullyConnectedTensorProduct("4x0e+4x1o", "2x1o", "4x0e")
    with pytest.raises(ValueError, match="one-hot scalars"):
        ElementSkip(product)


def test_conversion_is_idempotent_and_covers_every_interaction():
    model = build_tiny_model(ELEMENTS, r_max=R_MAX)
    first = convert_element_skips(model)
    assert len(first) == len(model.interactions)
    assert convert_element_skips(model) == first


def test_engine_follows_a_change_of_elements_at_the_same_atom_count():
    """The engine evaluates the skips for the elements present only; replacing oxygens by
    carbons (same atom count, no re-allocation) must bring carbon's skip weights in."""
    model = build_tiny_model(ELEMENTS, r_max=R_MAX)
    reference = MACECalculator(models=build_tiny_model(ELEMENTS, r_max=R_MAX), device="cpu",
                               default_dtype="float64")
    engine = MACEEngine(model, z_table_atomic_numbers=ELEMENTS, r_max=R_MAX)
    atoms = water_box(8, seed=5)
    for step in range(2):
        got = engine.compute(atoms.positions, atoms.numbers, atoms.cell.array, atoms.pbc)
        reference.calculate(atoms, ["energy", "forces"])
        assert got["energy"] == pytest.approx(reference.results["energy"], rel=1e-10)
        np.testing.assert_allclose(got["forces"], reference.results["forces"], atol=1e-9)
        numbers = atoms.numbers.copy()
        numbers[np.flatnonzero(numbers == 8)[:4]] = 6
        atoms.numbers = numbers
    # The shared model, called outside the engine, evaluates every element (as mace's
    # calculator needs): all-element skips on all-carbon atoms still match the original.
    carbon = torch.nn.functional.one_hot(torch.full((5,), 1), len(ELEMENTS)).double()
    for interaction, original in zip(model.interactions, reference.models[0].interactions):
        assert isinstance(interaction.skip_tp, ElementSkip)
        x = torch.randn(5, o3.Irreps(str(original.skip_tp.irreps_in1)).dim, dtype=torch.float64)
        torch.testing.assert_close(interaction.skip_tp(x, carbon), original.skip_tp(x, carbon))
