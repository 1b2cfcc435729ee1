"""The one door to private interfaces: every shim resolves, untested versions are named."""

import subprocess
import sys

import pytest

from mace_lpcalc import compat


@pytest.mark.parametrize("name", sorted(compat.SHIMS))
def test_every_shim_still_resolves(name):
    assert compat.SHIMS[name]()


def test_an_untested_version_is_refused_with_the_tested_range_named(monkeypatch):
    monkeypatch.delenv(compat.UNTESTED_VERSIONS_VARIABLE, raising=False)
    installed = {"torch": "2.13.0+cpu", "mace-torch": "0.3.16", "e3nn": "0.4.4"}
    compat.check_versions(installed)  # local build tags do not count
    with pytest.raises(ImportError, match=r"torch 2\.14\.0 \(tested: 2\.11-2\.13\)"):
        compat.check_versions({**installed, "torch": "2.14.0"})
    with pytest.raises(ImportError, match=r"mace-torch 0\.3\.9 \(tested: 0\.3\.15-0\.3\.16\)"
                                          r".*e3nn 0\.4\.5 \(tested: 0\.4\.4\)"):
        compat.check_versions({"mace-torch": "0.3.9", "e3nn": "0.4.5"})
    monkeypatch.setenv(compat.UNTESTED_VERSIONS_VARIABLE, "1")
    with pytest.warns(RuntimeWarning, match="torch 2.14.0"):
        compat.check_versions({**installed, "torch": "2.14.0"})


def test_the_installed_versions_are_the_tested_ones():
    compat.check_versions()


def test_importing_the_calculator_prints_no_warning():
    """mace's torch.load flag makes e3nn's constants load warn; the door silences only that."""
    result = subprocess.run([sys.executable, "-c",
                             "import mace_lpcalc.calculator"],
                            capture_output=True, text=True, timeout=300, check=True)
    assert result.stderr == ""
