"""Two calculators of different policies in one process do not disturb each other.

The sentinel and ``policy="auto"`` keep an fp64 calculator beside a 16-bit one; a user may
run both side by side. Each must return exactly what it returns alone, whether their calls
alternate in one thread or run concurrently in two.
"""

import threading

import numpy as np
import pytest
import torch

from mace_lpcalc import LowPrecisionMACECalculator

POLICIES = ("fp64", "fp32-linear-bf16")
N_CALLS = 4


def _calculator(model_path, policy, fast_path):
    return LowPrecisionMACECalculator(model_paths=str(model_path), policy=policy,
                                      backend="e3nn", fast_path=fast_path)


def _frames(atoms):
    rng = np.random.default_rng(7)
    frames = []
    for _ in range(N_CALLS):
        frame = atoms.copy()
        frame.positions += rng.normal(scale=0.02, size=frame.positions.shape)
        frames.append(frame)
    return frames


def _evaluate(calculator, frame):
    frame = frame.copy()
    frame.calc = calculator
    return frame.get_potential_energy(), frame.get_forces().copy(), frame.get_stress().copy()


def _assert_identical(got, expected):
    for value, reference in zip(got, expected):
        np.testing.assert_array_equal(value, reference)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, tiny_model_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.model"
    torch.save(tiny_model_factory(), path)
    return path


@pytest.mark.parametrize("fast_path", [False, True], ids=["mace-path", "fast-path"])
def test_alternating_and_concurrent_calls_match_each_calculator_alone(
        model_path, water8, single_thread, fast_path):
    frames = _frames(water8)
    alone = {}
    for policy in POLICIES:
        calculator = _calculator(model_path, policy, fast_path)
        alone[policy] = [_evaluate(calculator, frame) for frame in frames]
    # 16-bit results differ from fp64's: the test could tell the calculators apart.
    assert not np.array_equal(alone["fp64"][0][1], alone["fp32-linear-bf16"][0][1])

    calculators = {policy: _calculator(model_path, policy, fast_path) for policy in POLICIES}
    for index, frame in enumerate(frames):
        for policy in POLICIES:
            _assert_identical(_evaluate(calculators[policy], frame), alone[policy][index])

    concurrent = {policy: _calculator(model_path, policy, fast_path) for policy in POLICIES}
    results, failures = {}, []

    def run(policy):
        try:
            results[policy] = [_evaluate(concurrent[policy], frame) for frame in frames]
        except Exception as err:  # noqa: BLE001 -- reported by the main thread
            failures.append(err)

    threads = [threading.Thread(target=run, args=(policy,)) for policy in POLICIES]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not failures, failures
    for policy in POLICIES:
        for got, expected in zip(results[policy], alone[policy]):
            _assert_identical(got, expected)
