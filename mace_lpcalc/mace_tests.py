"""Run mace-torch's own calculator tests with ``LowPrecisionMACECalculator`` in place of ``MACECalculator``.

    python -m mace_lpcalc.mace_tests /path/to/mace-checkout [-k EXPR] [--json OUT.json]

runs ``tests/test_calculator.py`` of a mace source checkout (the user's; no mace test
code is copied here) three times in subprocesses: with mace's own ``MACECalculator``,
with ours on mace's path (``fast_path=False``) and with ours on the fast path
(``fast_path=True``), then prints each test's outcome side by side and exits non-zero if
a test that passes with mace's calculator does not pass with ours.

The swap is this module used as a pytest plugin (``-p mace_lpcalc.mace_tests``): before
the test modules are imported it replaces ``MACECalculator`` in mace's calculator
modules with a subclass of ours, so ``from mace.calculators.mace import
MACECalculator`` in the tests gets ours. Where mace's tests leave the dtype to the
model (``default_dtype=""``; they train float64 models), ours runs the fp64 policy.
Every variant imports the checkout's mace (the one its tests and training runs use).
Tests that download foundation models fail without a network, with either calculator.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

#: Environment variable the plugin reads: "mace" (no swap), "reference" or "fast".
VARIANT_VARIABLE = "MACE_LPCALC_MACE_TESTS_VARIANT"
VARIANTS = ("mace", "reference", "fast")
_CALCULATOR_MODULES = ("mace.calculators.mace", "mace.calculators",
                       "mace.calculators.foundations_models")


def pytest_configure(config):
    """Swap our calculator in for mace's, as the variable says."""
    import importlib

    # The checkout's mace, as its tests (and the training runs they start) use it, in
    # every variant: imported now, before anything imports another mace.
    checkout = Path(config.rootpath) if config is not None else None
    if checkout is not None and (checkout / "mace" / "__init__.py").is_file():
        sys.path.insert(0, str(checkout))
    for name in _CALCULATOR_MODULES:
        importlib.import_module(name)
    variant = os.environ.get(VARIANT_VARIABLE, "mace")
    if variant == "mace":
        return

    from mace_lpcalc import LowPrecisionMACECalculator

    class SwappedCalculator(LowPrecisionMACECalculator):
        def __init__(self, *args, default_dtype="", **kwargs):
            kwargs.setdefault("fast_path", variant == "fast")
            super().__init__(*args, default_dtype=default_dtype or "float64", **kwargs)

    SwappedCalculator.__name__ = "MACECalculator"
    for name in _CALCULATOR_MODULES:
        module = importlib.import_module(name)
        if hasattr(module, "MACECalculator"):
            module.MACECalculator = SwappedCalculator


def run_variant(checkout: Path, variant: str, extra_args: list[str], report: Path) -> dict:
    """Run the calculator tests once; return test id -> outcome."""
    environment = dict(os.environ, **{VARIANT_VARIABLE: variant})
    command = [sys.executable, "-m", "pytest", "-q", "-p", "mace_lpcalc.mace_tests",
               "-p", "no:cacheprovider", f"--junitxml={report}",
               str(checkout / "tests" / "test_calculator.py"), *extra_args]
    subprocess.run(command, cwd=checkout, env=environment, check=False)
    outcomes = {}
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error"}.get(child.tag, "skipped")
        outcomes[case.get("name")] = outcome
    return outcomes


def checkout_description(checkout: Path) -> dict:
    """The mace version of the checkout and, where it is a git work tree, its commit."""
    version_file = checkout / "mace" / "__version__.py"
    match = re.search(r"__version__\s*=\s*[\"']([^\"']+)", version_file.read_text()) \
        if version_file.is_file() else None
    version = match.group(1) if match else None
    commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip()
    return {"mace_version": version, "commit": commit or None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkout", type=Path, help="a mace-torch source checkout")
    parser.add_argument("-k", default=None, help="pytest -k expression")
    parser.add_argument("--json", type=Path, default=None, help="write the outcomes here")
    args = parser.parse_args(argv)
    test_file = args.checkout / "tests" / "test_calculator.py"
    if not test_file.is_file():
        parser.error(f"{test_file} not found: give the root of a mace source checkout")
    extra = ["-k", args.k] if args.k else []
    with tempfile.TemporaryDirectory() as folder:
        outcomes = {variant: run_variant(args.checkout.resolve(), variant, extra,
                                         Path(folder) / f"{variant}.xml")
                    for variant in VARIANTS}
    tests = sorted(set().union(*outcomes.values()))
    regressions = [test for test in tests if outcomes["mace"].get(test) == "passed"
                   and any(outcomes[v].get(test) != "passed" for v in VARIANTS[1:])]
    print(f"\n{'test':60s} " + " ".join(f"{v:>10s}" for v in VARIANTS))
    for test in tests:
        print(f"{test:60s} " + " ".join(f"{outcomes[v].get(test, '-'):>10s}" for v in VARIANTS))
    print(f"\n{len(regressions)} test(s) pass with mace's calculator but not with ours"
          + (f": {', '.join(regressions)}" if regressions else ""))
    if args.json:
        args.json.write_text(json.dumps({
            "date": datetime.date.today().isoformat(), "checkout": checkout_description(
                args.checkout), "python": sys.version.split()[0],
            "outcomes": outcomes, "regressions": regressions}, indent=2))
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
