"""Edge-chunked convolutions: the same physics in chunks, and less kept for the backward pass.

Every interaction-block class mace offers is evaluated three ways on the same weights:
as mace built it, with the deferred-weights pair unchunked (the same operations: equal to
rounding), and chunked (sums in another order: equal to fp64 rounding). Memory is measured
as what autograd keeps for the backward pass, which chunking exists to cut. The CUDA test
(fused cuEquivariance convolution, CUDA graph) is skipped without a GPU.
"""

import copy
import gc
import warnings
import weakref

import mace  # noqa: F401  -- before e3nn
import numpy as np
import pytest
import torch
from ase.calculators.calculator import CalculatorSetupError

from mace_lpcalc import LowPrecisionMACECalculator, compat
from mace_lpcalc.fastpath.edge_chunks import (AUTO_CHUNK_FRACTION, AUTO_CHUNK_SHARE,
                                              AUTO_CHUNKING_ABOVE, REST_PER_KEPT_BYTE,
                                              MIN_CHUNK_EDGES, ChunkedConvolution,
                                              DeferredRadialWeights,
                                              EdgeChunking, convolution_chunks,
                                              defer_convolution_weights)
from mace_lpcalc.fastpath import edge_chunks
from mace_lpcalc.fastpath.engine import MACEEngine
from mace_lpcalc.model_zoo import build_architecture
from mace_lpcalc.systems import water_box

ELEMENTS = (1, 6, 8)
R_MAX = 4.0
BLOCK_ARCHITECTURES = ["plain-first", "residual-first", "density", "attention-residual",
                       "nonlinear-residual"]

pytestmark = pytest.mark.usefixtures("single_thread")


def _water():
    atoms = water_box(8, seed=2)
    atoms.rattle(0.05, seed=3)
    return atoms


def _engine(model, **kwargs):
    return MACEEngine(model, z_table_atomic_numbers=ELEMENTS, r_max=R_MAX, **kwargs)


def _evaluate(engine, atoms):
    return engine.compute(atoms.positions, atoms.numbers, atoms.cell.array, atoms.pbc,
                          compute_stress=True)


def test_every_mace_block_class_is_covered_and_its_source_still_fits():
    """The shim reads each listed block's forward; the list names every block with a
    ``conv_tp_weights`` in the installed mace, so no interaction class goes unchunked
    silently."""
    from mace.modules import blocks

    assert compat.SHIMS["mace blocks: conv_tp_weights reach only conv_tp"]()
    with_weights = {name for name, kind in vars(blocks).items() if isinstance(kind, type)
                    and issubclass(kind, blocks.InteractionBlock)
                    and "conv_tp_weights" in getattr(kind, "_setup").__code__.co_names}
    assert with_weights == set(compat.WEIGHTS_TO_CONVOLUTION_BLOCKS)


def _deferred(model, weights_only: bool):
    """``model`` converted, its chunks recomputed whole or (as around the fused kernel) only
    their weights."""
    model = copy.deepcopy(model)
    for convolution in defer_convolution_weights(model):
        convolution.recompute_weights_only = weights_only
    return model


@pytest.mark.parametrize("weights_only", [False, True], ids=["whole-chunk", "weights-only"])
@pytest.mark.parametrize("architecture", BLOCK_ARCHITECTURES)
def test_chunked_convolutions_give_mace_s_energy_forces_and_stress(architecture, weights_only):
    atoms = _water()
    original = build_architecture(architecture, ELEMENTS, r_max=R_MAX)
    reference = _evaluate(_engine(copy.deepcopy(original), edge_chunk_size=None), atoms)
    deferred = copy.deepcopy(original)
    assert len(defer_convolution_weights(deferred)) == len(deferred.interactions)
    unchunked = _evaluate(_engine(deferred, edge_chunk_size=None), atoms)
    chunked_engine = _engine(_deferred(original, weights_only), edge_chunk_size=97)
    chunked = _evaluate(chunked_engine, atoms)
    assert chunked_engine.edge_capacity > 5 * 97  # several chunks, the last one shorter
    assert all(isinstance(block.conv_tp, ChunkedConvolution)
               for block in chunked_engine.model.interactions)
    for key in ("energy", "forces", "stress"):
        np.testing.assert_allclose(unchunked[key], reference[key], rtol=0, atol=1e-12)
        np.testing.assert_allclose(chunked[key], reference[key], rtol=0, atol=1e-10)
    assert np.abs(reference["forces"]).max() > 1e-3  # the comparison is not of zeros


@pytest.mark.parametrize("weights_only", [False, True], ids=["whole-chunk", "weights-only"])
def test_atomic_stresses_of_chunked_convolutions_are_mace_s(weights_only):
    """mace builds a graph of the first derivative (create_graph) for atomic stresses."""
    atoms = _water()
    original = build_architecture("residual-first", ELEMENTS, r_max=R_MAX)
    results = [_engine(model, edge_chunk_size=setting, compute_atomic_stresses=True).compute(
        atoms.positions, atoms.numbers, atoms.cell.array, atoms.pbc, compute_stress=True)
        for model, setting in ((copy.deepcopy(original), None),
                               (_deferred(original, weights_only), 97))]
    assert np.abs(results[0]["atomic_stresses"]).max() > 1e-4
    for key in ("forces", "stress", "atomic_stresses"):
        np.testing.assert_allclose(results[1][key], results[0][key], rtol=0, atol=1e-10)


def _kept_bytes(model, atoms, chunk_edges):
    """Bytes autograd keeps for the backward pass of one energy evaluation (storages once)."""
    from mace.calculators import MACECalculator

    from mace_lpcalc.fastpath.model_batch import eager_model_call

    batch = MACECalculator(models=copy.deepcopy(model), device="cpu",
                           default_dtype="float64")._atoms_to_batch(atoms).to_dict()
    kept = {}

    def pack(tensor):
        kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
            convolution_chunks(chunk_edges):
        eager_model_call(model, batch, compute_stress=False)
    return sum(kept.values())


def test_chunking_halves_what_the_backward_pass_keeps():
    """MACE-OFF24(M)'s widths and 6 Å cutoff on water (~85 edges an atom). e3nn's products
    keep node-level intermediates that chunking leaves alone (cuEquivariance's fused
    kernels keep none), so on the GPU the cut is larger."""
    atoms = water_box(27, seed=1)
    model = build_architecture("plain-first", ELEMENTS, r_max=6.0, size="off24m")
    model.requires_grad_(False)
    defer_convolution_weights(model)
    whole, chunked = _kept_bytes(model, atoms, None), _kept_bytes(model, atoms, 512)
    assert chunked < 0.6 * whole, (whole, chunked)


class _SavesItsInputs(torch.nn.Module):
    """A convolution that, like cuEquivariance's fused kernel, saves only its inputs."""

    def forward(self, sender_feats, edge_attrs, weights):
        return weights * edge_attrs[:, :1]


def test_recomputing_only_the_weights_keeps_none_of_them(monkeypatch):
    """Around a convolution that saves only its inputs, autograd keeps none of a chunk's
    weights nor the radial MLP's activations (everything it keeps is counted), where the
    unchunked call keeps them for every edge."""
    mlp = build_architecture("plain-first", ELEMENTS, r_max=R_MAX).interactions[0].conv_tp_weights
    mlp.requires_grad_(False)
    deferred = DeferredRadialWeights(mlp)
    convolution = ChunkedConvolution(_SavesItsInputs(), deferred)
    convolution.recompute_weights_only = True
    features = torch.rand(300, mlp.hs[0], dtype=torch.float64, requires_grad=True)
    attrs = torch.rand(300, 9, dtype=torch.float64, requires_grad=True)  # as positions make them
    per_edge = set(mlp.hs[1:])  # the MLP's hidden widths and its output, the weights
    kept = {}
    for chunk_edges in (None, 50):
        sizes = []
        _count_what_recipes_keep(monkeypatch, sizes)
        with torch.autograd.graph.saved_tensors_hooks(
                lambda tensor: sizes.append(tensor.numel()) or tensor, lambda tensor: tensor), \
                convolution_chunks(chunk_edges):
            deferred(features)
            messages = convolution(attrs, attrs, torch.ones(300, 1, dtype=torch.float64))
        kept[chunk_edges] = {size // edges for size in sizes for edges in (300, 50)
                             if size % edges == 0 and size // edges in per_edge}
        (gradient,) = torch.autograd.grad(messages.sum(), features)
        assert gradient.abs().max() > 0
    assert kept[None] == per_edge and not kept[50]


def _count_what_recipes_keep(monkeypatch, sizes):
    """Only the innermost saved-tensor hooks run: count what recipes keep as it is."""
    pack = edge_chunks._RecomputedWeights._pack

    def counting(recipe, tensor):
        packed = pack(recipe, tensor)
        if isinstance(packed, torch.Tensor):
            sizes.append(tensor.numel())
        return packed

    monkeypatch.setattr(edge_chunks._RecomputedWeights, "_pack", counting)


def test_the_backward_pass_holds_one_chunk_s_recomputed_weights_at_a_time(monkeypatch):
    """One chunk's recomputation alive at a time, and none after the call: not the recipes,
    nor any tensor a recomputation made. (Kept with their autograd history, the MLP's
    recomputed activations once formed a cycle through autograd's C++ nodes that Python's
    collector cannot see: ~1.6 kB per edge leaked by every call, 16 GiB in three calls at
    41 472 atoms on an H100, where weights-only recompute measured 20.1 GiB.)"""
    live, most, recomputed, made = weakref.WeakSet(), [0], [0], []
    recompute = edge_chunks._RecomputedWeights._recompute

    def counting(recipe, attached):
        live.add(recipe)
        recomputed[0] += 1
        most[0] = max(most[0], 1 + sum(other.recomputed is not None for other in live))
        saved, weights = recompute(recipe, attached)
        made.extend(weakref.ref(tensor) for tensor in (*saved, weights))
        return saved, weights

    monkeypatch.setattr(edge_chunks._RecomputedWeights, "_recompute", counting)
    engine = _engine(_deferred(build_architecture("plain-first", ELEMENTS, r_max=R_MAX),
                               weights_only=True), edge_chunk_size=97)
    _evaluate(engine, _water())
    gc.collect()
    assert recomputed[0] >= 10 and most[0] == 1  # every chunk of both interactions, in turn
    assert not live  # and nothing of them is left after the call
    assert len(made) > recomputed[0] and not [ref for ref in made if ref() is not None]


def test_auto_chunks_only_where_the_memory_is_needed():
    model = build_architecture("plain-first", ELEMENTS, r_max=R_MAX)
    chunking = EdgeChunking(model, "auto", "cpu")
    weight_numel = sum(block.conv_tp.weight_numel for block in model.interactions)
    assert chunking.kept_bytes_per_edge == 2 * 8 * weight_numel
    chunking.memory_bytes = memory = 10**9
    below = int(AUTO_CHUNKING_ABOVE * memory) // chunking.kept_bytes_per_edge
    assert chunking.chunk_edges(below) is None
    assert not isinstance(model.interactions[0].conv_tp, ChunkedConvolution)  # untouched
    # Just above the threshold: chunks take a share of what the rest of the call leaves,
    # so few of them (each writes node-sized arrays) and, with the rest, within memory.
    kept = chunking.kept_bytes_per_edge
    just_above = chunking.chunk_edges(below + 1)
    rest = REST_PER_KEPT_BYTE * kept * (below + 1)
    assert just_above == int(AUTO_CHUNK_SHARE * (memory - rest)) // kept
    assert -(-(below + 1) // just_above) <= 3 and rest + just_above * kept < memory
    # Far beyond memory, chunks shrink to the floor (a fraction of the memory) ...
    assert chunking.chunk_edges(100 * below) == max(
        MIN_CHUNK_EDGES, int(AUTO_CHUNK_FRACTION * memory) // kept)
    # ... and in between they shrink as the rest of the call grows.
    assert just_above > chunking.chunk_edges(4 * below) > chunking.chunk_edges(100 * below)
    assert all(isinstance(block.conv_tp, ChunkedConvolution) for block in model.interactions)
    assert EdgeChunking(copy.deepcopy(model), 100).chunk_edges(101) == 100
    assert EdgeChunking(copy.deepcopy(model), 100).chunk_edges(100) is None
    untouched = build_architecture("plain-first", ELEMENTS, r_max=R_MAX)
    assert EdgeChunking(untouched, None).chunk_edges(10**12) is None
    assert not any(isinstance(block.conv_tp, ChunkedConvolution)
                   for block in untouched.interactions)


@pytest.mark.parametrize("setting", [0, -5, 2.5, True, "always"])
def test_bad_chunk_sizes_are_refused_by_name(setting, tiny_model_factory):
    with pytest.raises(CalculatorSetupError, match="edge_chunk_size must be"):
        LowPrecisionMACECalculator(models=tiny_model_factory(), device="cpu",
                                   fast_path=True, edge_chunk_size=setting)


def test_a_convolution_without_its_own_weights_call_is_refused():
    model = build_architecture("plain-first", ELEMENTS, r_max=R_MAX)
    first, second = defer_convolution_weights(model)
    with pytest.raises(RuntimeError, match="right after its block's DeferredRadialWeights"):
        first(torch.zeros(3, 4), torch.zeros(5, 9), torch.ones(5, 1))
    model.interactions[1].conv_tp_weights(torch.zeros(5, 8))  # the other block's weights
    with pytest.raises(RuntimeError, match="right after its block's DeferredRadialWeights"):
        first(torch.zeros(3, 4), torch.zeros(5, 9), torch.ones(5, 1))
    assert copy.deepcopy(model).interactions[1].conv_tp.partner is not second.partner


@pytest.mark.parametrize("policy, tolerance", [("fp64", 1e-10), ("fp32-linear-bf16", 1e-4),
                                               ("bf16", 1e-2)])
def test_calculator_chunks_large_calls_under_every_kind_of_policy(tiny_model_factory, policy,
                                                                  tolerance):
    """16-bit Linear wrappers and the bf16 policy's autocast regions are chunked too; the
    tolerance is each policy's rounding (the chunks sum in another order)."""
    atoms = _water()
    plain = LowPrecisionMACECalculator(models=tiny_model_factory(), device="cpu",
                                       policy=policy, fast_path=True, edge_chunk_size=None)
    chunked = LowPrecisionMACECalculator(models=tiny_model_factory(), device="cpu",
                                         policy=policy, fast_path=True, edge_chunk_size=64)
    assert chunked.parameters["edge_chunk_size"] == 64
    forces = [calc.get_forces(atoms.copy()) for calc in (plain, chunked)]
    assert chunked.engine.edge_chunking.last_chunk_edges == 64
    assert sum(isinstance(module, ChunkedConvolution)
               for module in chunked.engine.model.modules()) == 2
    # mace's unchunked path would not fit a box that needs chunks: the check is skipped.
    assert "not checked against mace's path" in chunked.parameters["fast_path_status"]
    np.testing.assert_allclose(forces[1], forces[0], rtol=0,
                               atol=tolerance * np.abs(forces[0]).max())


def _first_interaction_messages(weights_only: bool, chunk_edges):
    """The first interaction's edge messages for random inputs, and the radial features."""
    model = _deferred(build_architecture("plain-first", ELEMENTS, r_max=R_MAX), weights_only)
    model.requires_grad_(False)
    interaction = model.interactions[0]
    generator = torch.Generator().manual_seed(0)
    features = torch.rand(50, model.radial_embedding.out_dim, dtype=torch.float64,
                          generator=generator).requires_grad_()
    attrs = torch.rand(50, 9, dtype=torch.float64, generator=generator)
    sender_feats = torch.rand(50, interaction.conv_tp.convolution.irreps_in1.dim,
                              dtype=torch.float64, generator=generator)
    with convolution_chunks(chunk_edges):
        interaction.conv_tp_weights(features)
        return interaction.conv_tp(sender_feats, attrs, torch.ones(50, 1)), features


def _second_derivative(messages, features):
    (gradient,) = torch.autograd.grad(messages.square().sum(), features, create_graph=True)
    return torch.autograd.grad(gradient.sin().sum(), features)[0]


def test_a_second_derivative_through_whole_chunks_raises_instead_of_being_wrong():
    messages, features = _first_interaction_messages(weights_only=False, chunk_edges=16)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate"):
        _second_derivative(messages, features)


def test_a_second_derivative_through_recomputed_weights_is_right():
    """The weights recomputed while a graph of the gradient is built are attached to it."""
    expected = _second_derivative(*_first_interaction_messages(True, None))
    messages, features = _first_interaction_messages(True, 16)
    (gradient,) = torch.autograd.grad(messages.square().sum(), features, retain_graph=True)
    (again,) = torch.autograd.grad(messages.square().sum(), features, retain_graph=True)
    assert torch.equal(again, gradient)  # the weights recomputed a second time
    second = _second_derivative(messages, features)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(second, expected, rtol=0, atol=1e-12)


def test_a_mace_whose_blocks_no_longer_fit_is_not_chunked(monkeypatch):
    monkeypatch.setattr(compat, "weights_reach_only_the_convolution", lambda: False)
    model = build_architecture("plain-first", ELEMENTS, r_max=R_MAX)
    chunking = EdgeChunking(model, 8)
    with pytest.warns(RuntimeWarning, match="convolutions are not chunked"):
        assert chunking.chunk_edges(100) is None
    assert chunking.last_chunk_edges is None  # the call ran unchunked
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tried once, not at every call
        assert chunking.chunk_edges(100) is None
    assert not any(isinstance(module, ChunkedConvolution) for module in model.modules())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("weights_only", [False, True], ids=["whole-chunk", "weights-only"])
@pytest.mark.parametrize("policy, atol", [("fp32", 2e-4), ("fp32-linear-fp16", 2e-3)])
def test_cuda_fused_convolution_chunked_in_a_graph_matches_unchunked(policy, atol,
                                                                     weights_only, monkeypatch):
    """The fused kernel in chunks, in a CUDA graph, recomputing whole chunks or only the
    weights, with 16-bit radial weights fed to the kernel where the policy does so."""
    monkeypatch.setattr(ChunkedConvolution, "weights_only_where_fused", weights_only)
    atoms = water_box(64, seed=4)
    atoms.rattle(0.02, seed=5)
    results = {}
    for setting in (None, 2000):
        calc = LowPrecisionMACECalculator(
            models=build_architecture("plain-first", (1, 8), r_max=5.0, size="off24m",
                                      dtype=torch.float32),
            device="cuda", policy=policy, compile_model=False, edge_chunk_size=setting)
        results[setting] = (calc.get_potential_energy(atoms.copy()), calc.get_forces(),
                            calc.get_stress(), calc.engine.last_call_replayed_graph)
        convolutions = [block.conv_tp for block in calc.engine.model.interactions]
    assert all(isinstance(conv, ChunkedConvolution)
               and conv.recompute_weights_only == weights_only
               and hasattr(conv.convolution, compat.CUEQ_FUSION_MARKER)
               for conv in convolutions) and results[2000][3]
    assert abs(results[2000][0] - results[None][0]) < 1e-4 * len(atoms)
    np.testing.assert_allclose(results[2000][1], results[None][1], rtol=0, atol=atol)
    np.testing.assert_allclose(results[2000][2], results[None][2], rtol=0, atol=atol / 100)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_recomputing_only_the_weights_keeps_no_more_than_whole_chunks(monkeypatch):
    """Peak memory of a fresh calculator's first chunked calls (warm-up and CUDA graph
    capture included, as the scaling benchmark counts it), each way. (On an H100 before the
    recomputation's leak was fixed: 20.1 GiB against 7.6 at 41 472 atoms,
    bench/results/h100_weights_only_recompute.json.) The message says where the bytes may
    go: storages the kernel saved that recipes keep as they are, and how many recipes held
    recomputed weights at once."""
    kept_as_is, live, most = {}, weakref.WeakSet(), [0]
    recipe_class = edge_chunks._RecomputedWeights
    pack, recompute = recipe_class._pack, recipe_class._recompute

    def counting_pack(recipe, tensor):
        packed = pack(recipe, tensor)
        if isinstance(packed, torch.Tensor) and recipe.weights_storage is not None:
            kept_as_is[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return packed

    def counting_recompute(recipe, attached):
        live.add(recipe)
        most[0] = max(most[0], 1 + sum(other.recomputed is not None for other in live))
        return recompute(recipe, attached)

    atoms = water_box(512, seed=4)
    peaks = {}
    for weights_only in (False, True):
        monkeypatch.setattr(ChunkedConvolution, "weights_only_where_fused", weights_only)
        monkeypatch.setattr(edge_chunks._RecomputedWeights, "_pack", counting_pack)
        monkeypatch.setattr(edge_chunks._RecomputedWeights, "_recompute", counting_recompute)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        calc = LowPrecisionMACECalculator(
            models=build_architecture("plain-first", (1, 8), r_max=5.0, size="off24m",
                                      dtype=torch.float32),
            device="cuda", policy="fp32", compile_model=False, edge_chunk_size=4000)
        for shift in (0.0, 0.001):
            atoms.positions[0] += shift
            calc.get_forces(atoms.copy())
        assert calc.engine.edge_chunking.last_chunk_edges == 4000
        peaks[weights_only] = torch.cuda.max_memory_allocated() - baseline
        del calc
    assert peaks[True] <= 1.05 * peaks[False], (
        f"peaks {peaks} B; kept as saved by the kernel: {sum(kept_as_is.values())} B in "
        f"{len(kept_as_is)} storages; most recipes holding recomputed weights at once: {most[0]}")


def test_a_compiled_engine_runs_its_chunked_calls_uncompiled():
    """Compiling would need about the memory chunking saves: chunked calls bypass it."""
    atoms = _water()
    original = build_architecture("plain-first", ELEMENTS, r_max=R_MAX)
    reference = _evaluate(_engine(copy.deepcopy(original), edge_chunk_size=None), atoms)
    engine = _engine(copy.deepcopy(original), edge_chunk_size=64, compile_model=True,
                     compile_in_background=False)
    chunked = _evaluate(engine, atoms)
    assert engine.edge_chunking.last_chunk_edges == 64
    assert engine.compiled.n_compilations == 0
    np.testing.assert_allclose(chunked["forces"], reference["forces"], rtol=0, atol=1e-10)
