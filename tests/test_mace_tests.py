"""The plugin that runs mace's calculator tests with our class in place of mace's."""

import importlib

import pytest

from mace_lpcalc import LowPrecisionMACECalculator
from mace_lpcalc import mace_tests
from mace_lpcalc.model_zoo import build_architecture


@pytest.mark.parametrize("variant,fast_path", [("reference", False), ("fast", True)])
def test_plugin_swaps_our_calculator_into_maces_modules(monkeypatch, variant, fast_path):
    modules = [importlib.import_module(name) for name in mace_tests._CALCULATOR_MODULES]
    for module in modules:  # restored after the test
        monkeypatch.setattr(module, "MACECalculator", module.MACECalculator)
    monkeypatch.setenv(mace_tests.VARIANT_VARIABLE, variant)
    mace_tests.pytest_configure(None)
    from mace.calculators.mace import MACECalculator
    assert issubclass(MACECalculator, LowPrecisionMACECalculator)
    calc = MACECalculator(models=build_architecture("L0"), device="cpu")
    # mace's tests leave the dtype to their float64 models: ours then runs fp64.
    assert calc.policy.name == "fp64" and calc.parameters["fast_path"] is fast_path


def test_without_a_variant_mace_keeps_its_calculator(monkeypatch):
    from mace.calculators import mace as mace_module
    original = mace_module.MACECalculator
    monkeypatch.delenv(mace_tests.VARIANT_VARIABLE, raising=False)
    mace_tests.pytest_configure(None)
    assert mace_module.MACECalculator is original


def test_a_folder_without_maces_tests_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        mace_tests.main([str(tmp_path)])
