"""MACEEngine against mace's own calculator: padding, skin lists, capacity growth, NVE.

The CUDA test at the end is the GPU self-check (graph vs eager vs mace's calculator,
with per-call timings); it is skipped without a GPU. Run it with
``python -m pytest -s -q tests/test_engine.py -k cuda``.
"""

import time

import mace  # noqa: F401  -- before e3nn
import numpy as np
import pytest
import torch
from ase import units
from ase.calculators.calculator import Calculator, all_changes
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.md.verlet import VelocityVerlet
from ase.stress import voigt_6_to_full_3x3_stress
from mace.calculators import MACECalculator

from mace_lpcalc.fastpath.engine import MACEEngine
from tiny_models import build_tiny_model
from mace_lpcalc.systems import carbon_cluster, diamond, water_box

ELEMENTS = (1, 6, 8)
R_MAX = 4.0


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(ELEMENTS, r_max=R_MAX)


@pytest.fixture(scope="module")
def reference(model):
    return MACECalculator(models=model, device="cpu", default_dtype="float64")


def _engine(model, **kwargs):
    return MACEEngine(model, z_table_atomic_numbers=ELEMENTS, r_max=R_MAX, **kwargs)


def _compute(engine, atoms, stress):
    return engine.compute(atoms.positions, atoms.numbers, atoms.cell.array, atoms.pbc,
                          compute_stress=stress)


def _reference(calculator, atoms, stress):
    atoms = atoms.copy()
    atoms.calc = calculator
    results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces(),
               "node_energy": calculator.results["energies"].copy(),
               "node_energy_minus_e0": calculator.results["node_energy"].copy()}
    if stress:
        results["stress"] = voigt_6_to_full_3x3_stress(atoms.get_stress())
    return results


def _assert_same(ours, theirs, tolerance=1e-10):
    assert abs(ours["energy"] - theirs["energy"]) < tolerance
    np.testing.assert_allclose(ours["forces"], theirs["forces"], rtol=0, atol=tolerance)
    np.testing.assert_allclose(ours["node_energy"], theirs["node_energy"], rtol=0, atol=tolerance)
    if "stress" in theirs:
        np.testing.assert_allclose(ours["stress"], theirs["stress"], rtol=0, atol=tolerance)


def _water():
    atoms = water_box(8)
    atoms.rattle(0.05, seed=1)
    return atoms


def _diamond_small_cell():
    atoms = diamond(1)  # 3.57 Å cube, r_max 4 Å: atoms see their own periodic images
    atoms.set_cell(atoms.cell.array @ np.array([[1.02, 0.03, 0.0], [0.0, 0.98, 0.0],
                                                [0.01, 0.0, 1.0]]), scale_atoms=True)
    atoms.rattle(0.05, seed=2)
    return atoms


def _water_slab():
    atoms = _water()
    atoms.pbc = (True, True, False)
    return atoms


SYSTEMS = {"water": (_water, True), "diamond_small_cell": (_diamond_small_cell, True),
           "water_slab_mixed_pbc": (_water_slab, False),
           "open_cluster": (lambda: carbon_cluster(20), False)}


@pytest.mark.parametrize("skin_A", [0.0, 0.5])
@pytest.mark.parametrize("system", SYSTEMS)
def test_matches_mace_calculator(model, reference, system, skin_A):
    build, periodic = SYSTEMS[system]
    atoms = build()
    engine = _engine(model, skin_A=skin_A)
    ours = _compute(engine, atoms, periodic)
    theirs = _reference(reference, atoms, periodic)
    _assert_same(ours, theirs)
    np.testing.assert_allclose(ours["node_energy"] - ours["node_e0"],
                               theirs["node_energy_minus_e0"], rtol=0, atol=1e-10)
    assert np.abs(theirs["forces"]).max() > 1e-3  # a real comparison, not zeros vs zeros
    assert engine.edge_capacity > engine.n_edges  # padding edges were present
    assert engine.n_edges <= engine.neighbors.n_edges  # the model saw only in-cutoff edges


def test_float32_model_matches_mace_calculator():
    model32 = build_tiny_model(ELEMENTS, r_max=R_MAX, dtype=torch.float32)
    reference32 = MACECalculator(models=model32, device="cpu", default_dtype="float32")
    atoms = _water()
    ours = _compute(_engine(model32, skin_A=0.3), atoms, True)
    _assert_same(ours, _reference(reference32, atoms, True), tolerance=1e-5)


def test_amount_of_padding_changes_nothing(model):
    atoms = _water()
    tight, roomy = _engine(model, edge_headroom=1.0), _engine(model, edge_headroom=4.0)
    tight_results, roomy_results = _compute(tight, atoms, True), _compute(roomy, atoms, True)
    assert roomy.edge_capacity - roomy.n_edges > 2 * tight.n_edges
    _assert_same(roomy_results, tight_results, tolerance=1e-12)


def test_skin_list_gives_the_exact_list_results(model):
    """A stale Verlet list gives the model exactly the edges a fresh list would."""
    atoms = _water()
    skinned, exact = _engine(model, skin_A=1.0), _engine(model, skin_A=0.0)
    _compute(skinned, atoms, True)
    atoms.positions += np.random.default_rng(3).uniform(-0.25, 0.25, size=atoms.positions.shape)
    skinned_results = _compute(skinned, atoms, True)
    assert skinned.neighbors.n_builds == 1  # the stale skin list was used
    exact_results = _compute(exact, atoms, True)
    assert skinned.neighbors.n_edges > 1.3 * exact.neighbors.n_edges
    assert skinned.n_edges == exact.n_edges == exact.neighbors.n_edges
    _assert_same(skinned_results, exact_results, tolerance=1e-12)


def test_edges_entering_the_cutoff_between_rebuilds_grow_the_capacity(model, reference):
    """Squeezing atoms together within the skin adds in-cutoff edges without a rebuild;
    the call that outgrows the capacity is repeated with larger buffers."""
    atoms = _water()
    engine = _engine(model, skin_A=2.0, edge_headroom=1.0)
    _compute(engine, atoms, True)
    capacity = engine.edge_capacity
    center = atoms.positions.mean(axis=0)
    atoms.positions = center + 0.9 * (atoms.positions - center)  # moves < skin/2 = 1 Å
    ours = _compute(engine, atoms, True)
    assert engine.neighbors.n_builds == 1
    assert engine.n_edges > capacity and engine.edge_capacity >= engine.n_edges
    _assert_same(ours, _reference(reference, atoms, True))


def test_compressing_the_box_grows_the_edge_capacity(model, reference):
    atoms = _water()
    engine = _engine(model, skin_A=0.2)
    _compute(engine, atoms, True)
    capacity = engine.edge_capacity
    atoms.set_cell(atoms.cell * 0.8, scale_atoms=True)
    ours = _compute(engine, atoms, True)
    assert engine.n_edges > capacity
    assert engine.edge_capacity >= engine.edge_headroom * engine.n_edges
    _assert_same(ours, _reference(reference, atoms, True))
    atoms.set_cell(atoms.cell / 0.8, scale_atoms=True)  # expanding keeps the larger buffers
    grown = engine.edge_capacity
    _assert_same(_compute(engine, atoms, True), _reference(reference, atoms, True))
    assert engine.edge_capacity == grown


def test_one_engine_follows_changing_systems(model, reference):
    engine = _engine(model, skin_A=0.3)
    water = _water()
    carbonated = water.copy()
    carbonated.numbers[[1, 5, 8]] = 6  # same atom count, new species: updated in place
    for atoms in (water, carbonated, _diamond_small_cell(), water):
        _assert_same(_compute(engine, atoms, True), _reference(reference, atoms, True))


def test_nan_results_are_returned_not_hidden(model):
    atoms = carbon_cluster(8)
    atoms.positions[1] = atoms.positions[0]  # a zero-length edge
    results = _compute(_engine(model), atoms, False)
    assert not np.isfinite(results["energy"]) or not np.isfinite(results["forces"]).all()


def test_bad_input_is_refused(model):
    engine = _engine(model)
    cluster = carbon_cluster(8)
    with pytest.raises(ValueError, match="charges must have shape"):
        engine.compute(cluster.positions, [6] * 8, np.zeros((3, 3)), False, charges=[0.0])
    with pytest.raises(ValueError, match="does not compile dipoles"):
        _engine(model, model_type="EnergyDipoleMACE", compile_model=True)
    with pytest.raises(ValueError, match="not evaluated by MACEEngine"):
        _engine(model, model_type="PolarMACE")
    with pytest.raises(ValueError, match=r"\[14\]"):
        engine.compute(cluster.positions, [14] * 8, np.zeros((3, 3)), False)
    with pytest.raises(ValueError, match="numbers must have shape"):
        engine.compute(cluster.positions, [6] * 7, np.zeros((3, 3)), False)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        _engine(model, use_cuda_graph=True)
    with pytest.raises(ValueError, match="not among the model's heads"):
        _engine(model, head="mp_pbe")


class _EngineCalculator(Calculator):
    def __init__(self, engine):
        super().__init__()
        self.implemented_properties = ["energy", "forces"]
        self.engine = engine

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        results = self.engine.compute(self.atoms.positions, self.atoms.numbers,
                                      self.atoms.cell.array, self.atoms.pbc)
        self.results = {"energy": results["energy"], "forces": results["forces"]}


def _nve_total_energies(engine, n_steps=60):
    atoms = water_box(8)
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(4))
    atoms.calc = _EngineCalculator(engine)
    dynamics = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    energies = []
    dynamics.attach(lambda: energies.append(atoms.get_total_energy()), interval=1)
    dynamics.run(n_steps)
    return np.array(energies)


def test_nve_energy_conservation_is_the_same_with_a_skin(model):
    """Skin and no-skin runs are the same trajectory, so their drifts are equal.

    The skin list's extra edges contribute exactly zero, so at every step both runs get
    the exact forces up to summation order (relative 1e-15). Such a difference grows at
    most like exp(t / t_Lyapunov); with t_Lyapunov of tens of fs for liquids it stays
    below 1e-12 Å over 30 fs, so the total energies must agree far below 1e-8 eV, while
    the energy itself fluctuates by more than 1e-6 eV. (That the skin list never misses
    a pair is tested directly in test_neighbors.py.)
    """
    exact = _engine(model, skin_A=0.0)
    skinned = _engine(model, skin_A=0.3)
    exact_energies = _nve_total_energies(exact)
    skinned_energies = _nve_total_energies(skinned)
    assert exact.neighbors.n_builds == len(exact_energies)
    assert 2 <= skinned.neighbors.n_builds < len(exact_energies) / 3
    assert np.ptp(exact_energies) > 1e-6
    assert np.abs(skinned_energies - exact_energies).max() < 1e-8



# ------------------------------------------------------------------ GPU self-check


def _timed_ms(function, repeats=20):
    function()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats * 1e3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("skin_A", [0.0, 0.5])
def test_cuda_graph_matches_eager_and_mace_calculator(skin_A):
    cuda_model = build_tiny_model(ELEMENTS, r_max=R_MAX).to("cuda")
    cuda_reference = MACECalculator(models=cuda_model, device="cuda", default_dtype="float64")
    graph = _engine(cuda_model, device="cuda", skin_A=skin_A, use_cuda_graph=True)
    eager = _engine(cuda_model, device="cuda", skin_A=skin_A, use_cuda_graph=False)
    atoms = water_box(64)
    atoms.rattle(0.05, seed=5)
    for stress in (False, True):
        graph_results = _compute(graph, atoms, stress)
        eager_results = _compute(eager, atoms, stress)
        assert graph.last_call_replayed_graph, "capture failed: see the logged warning"
        theirs = _reference(cuda_reference, atoms, stress)
        for name in ("energy", "forces", "node_energy") + (("stress",) if stress else ()):
            print(f"skin {skin_A} stress {stress} {name}: |graph - eager| "
                  f"{np.abs(graph_results[name] - eager_results[name]).max():.2e}, "
                  f"|graph - mace| {np.abs(graph_results[name] - theirs[name]).max():.2e}")
        _assert_same(graph_results, eager_results, tolerance=1e-9)
        _assert_same(graph_results, theirs, tolerance=1e-9)
    # Replays follow new positions, with the list kept (skin) or rebuilt (no skin).
    rng = np.random.default_rng(6)
    for _ in range(3):
        atoms.positions += rng.normal(0, 0.02, size=atoms.positions.shape)
        _assert_same(_compute(graph, atoms, True), _reference(cuda_reference, atoms, True), 1e-9)
    # Compression outgrows the edge capacity: re-padding and re-capture stay correct.
    captures = graph.n_graph_captures
    atoms.set_cell(atoms.cell * 0.85, scale_atoms=True)
    _assert_same(_compute(graph, atoms, True), _reference(cuda_reference, atoms, True), 1e-9)
    assert graph.n_graph_captures == captures + 1 and graph.last_call_replayed_graph
    cluster = carbon_cluster(30)
    _assert_same(_compute(graph, cluster, False), _reference(cuda_reference, cluster, False), 1e-9)

    moved = atoms.copy()
    moved.calc = cuda_reference

    def perturb():
        moved.positions += rng.normal(0, 0.002, size=moved.positions.shape)

    timings_ms = {
        "graph": _timed_ms(lambda: (perturb(), _compute(graph, moved, False))),
        "eager": _timed_ms(lambda: (perturb(), _compute(eager, moved, False))),
        "mace's calculator": _timed_ms(lambda: (perturb(), moved.get_forces())),
    }
    print(f"{len(atoms)} atoms, skin {skin_A} Å, ms per call (energy + forces): "
          + ", ".join(f"{name} {ms:.2f}" for name, ms in timings_ms.items()))
