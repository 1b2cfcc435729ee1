"""The protocols' command line: settings from a TOML file and options, errors in one line.

Every field of a protocol's settings dataclass is an option (``--field-name``; the
structure file is positional). Defaults are overridden by ``--settings FILE.toml``, which
is overridden by explicit options. :func:`main` is what
``python -m mace_lpcalc.protocols.nvt|npt|nve`` runs: it prints the run's summary as JSON,
and reports a refused or failed run in one line (``--debug`` shows the traceback).
``--replicas N`` runs seeds ``seed ... seed + N - 1`` side by side, their force
evaluations batched into one model call per step (:mod:`.replicas`), each into
``OUT_seed<k>.h5``; the sentinel, which checks one structure at a time, is then off
unless ``--sentinel-every`` is given (and refused). SIGTERM, which a batch scheduler
sends before it kills a job, makes the run write a checkpoint after its current step and
stop (exit status 143); ``--resume`` continues it.
"""

from __future__ import annotations

import argparse
import dataclasses
import contextlib
import json
import signal
import sys
import threading
from pathlib import Path

from ase.calculators.calculator import CalculationFailed, CalculatorSetupError

from mace_lpcalc.md.base import STOP_REQUESTED, MDProtocol, MDSettings
from mace_lpcalc.md.replicas import run_replicas
from mace_lpcalc.toml_files import read_toml


def read_settings_file(path, settings_class: type[MDSettings]) -> dict:
    """Settings from a TOML file whose keys are field names of ``settings_class``."""
    path = Path(path)
    values = read_toml(path, "settings")
    fields = {field.name: field for field in dataclasses.fields(settings_class)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"settings file {path}: unknown setting(s) {', '.join(unknown)} for "
                         f"{settings_class.__name__}; known: {', '.join(fields)}")
    for key, value in values.items():
        expected = _value_type(fields[key])
        accepted = (int, float) if expected is float else (expected,)
        if isinstance(value, bool) != (expected is bool) or not isinstance(value, accepted):
            raise ValueError(f"settings file {path}: {key} must be {expected.__name__}, "
                             f"got {value!r}")
    return values


def _value_type(field: dataclasses.Field) -> type:
    return str if field.default is None else type(field.default)


def build_parser(settings_class: type[MDSettings], prog: str) -> argparse.ArgumentParser:
    """One option per settings field (``--field-name``); ``structure`` is positional."""
    parser = argparse.ArgumentParser(
        prog=prog, description=(sys.modules[settings_class.__module__].__doc__ or "")
        .split("\n\n")[0])
    parser.add_argument("structure", nargs="?", help="structure file (ase.io.read)")
    parser.add_argument("--settings", metavar="FILE.toml",
                        help="TOML file of settings; command-line options override it")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of one line")
    parser.add_argument("--replicas", type=int, default=1, metavar="N",
                        help="run N seeds (seed, seed + 1, ...) side by side with batched "
                             "force evaluations, into OUT_seed<k>.h5 (default: 1)")
    for field in dataclasses.fields(settings_class):
        if field.name == "structure":
            continue
        flags = (*field.metadata["flags"], "--" + field.name.replace("_", "-"))
        value_type = _value_type(field)
        help_text = field.metadata["help"] + (
            "" if field.default is None else f" (default: {field.default})")
        # Every default is None here, so that only explicit options override the file.
        if value_type is bool:
            parser.add_argument(*flags, dest=field.name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        else:
            parser.add_argument(*flags, dest=field.name, type=value_type, default=None,
                                choices=field.metadata["choices"], help=help_text)
    return parser


def settings_from_command_line(settings_class: type[MDSettings], argv, prog: str):
    """Defaults, overridden by ``--settings FILE.toml``, overridden by explicit options."""
    parser = build_parser(settings_class, prog)
    arguments = vars(parser.parse_args(argv))
    arguments.pop("debug")
    arguments.pop("replicas")
    return _settings_from(arguments, settings_class, parser)


def _settings_from(arguments: dict, settings_class: type[MDSettings], parser) -> MDSettings:
    values = read_settings_file(arguments["settings"], settings_class) \
        if arguments["settings"] else {}
    values.update({key: value for key, value in arguments.items()
                   if value is not None and key != "settings"})
    if not values.get("structure"):
        parser.error("a structure file is required (argument or 'structure' in --settings)")
    return settings_class(**values)


#: What a run refuses or stops with: bad files and settings, models the calculator
#: cannot set up, failed calculations, and the operating system's refusals (an
#: unwritable directory, a full disk). Reported in one line; ``--debug`` shows the traceback.
_REPORTED_ERRORS = (OSError, ValueError, CalculatorSetupError, CalculationFailed)


def main(protocol_class: type[MDProtocol], argv=None) -> dict:
    """Command-line entry point shared by the protocol modules."""
    prog = f"python -m mace_lpcalc.protocols.{protocol_class.name}"
    parser = build_parser(protocol_class.settings_class, prog)
    arguments = vars(parser.parse_args(argv))
    debug = arguments.pop("debug")
    n_replicas = arguments.pop("replicas")
    if n_replicas < 1:
        parser.error(f"--replicas must be at least 1, got {n_replicas}")
    if n_replicas > 1 and arguments["sentinel_every"] is None:
        arguments["sentinel_every"] = 0
    try:
        settings = _settings_from(arguments, protocol_class.settings_class, parser)
        with _stop_on_sigterm() as terminated:
            if n_replicas == 1:
                summary = protocol_class(settings).run()
            else:
                summary = run_replicas(protocol_class, replica_settings(settings, n_replicas))
    except _REPORTED_ERRORS as err:
        if debug:
            raise
        raise SystemExit(f"{prog}: error: {_one_line(err)}") from None
    print(json.dumps(summary, indent=2))
    stopped = [each.get("stopped") for each in (summary if isinstance(summary, list)
                                                 else [summary])]
    if terminated.is_set() and any(stopped):  # a SIGTERM during the last step changed nothing
        raise SystemExit(128 + signal.SIGTERM)
    return summary


@contextlib.contextmanager
def _stop_on_sigterm():
    """While the run lasts, SIGTERM sets :data:`STOP_REQUESTED` instead of killing the
    process; yields an event telling whether it came."""
    terminated = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # signals need it
        yield terminated
        return

    def request_stop(signum, frame):
        terminated.set()
        STOP_REQUESTED.set()

    previous = signal.signal(signal.SIGTERM, request_stop)
    try:
        yield terminated
    finally:
        signal.signal(signal.SIGTERM, previous)
        STOP_REQUESTED.clear()


def replica_settings(settings: MDSettings, n_replicas: int) -> list[MDSettings]:
    """Seeds ``seed ... seed + n_replicas - 1`` of ``settings``, each into ``OUT_seed<k>.h5``."""
    out = Path(settings.out)
    return [dataclasses.replace(settings, seed=seed,
                                out=str(out.with_name(f"{out.stem}_seed{seed}{out.suffix}")))
            for seed in range(settings.seed, settings.seed + n_replicas)]


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:  # no "[Errno N]" prefix
        text = error.strerror
        if error.filename and str(error.filename) not in text:
            text = f"{error.filename}: {text}"
    else:
        text = str(error)
    return " ".join(text.split())
