"""Reading and checking a campaign file, every problem named before anything runs.

A campaign file has a ``[campaign]`` table, one or more ``[[ensemble]]`` tables and,
for the batch-system schedulers, a ``[cluster]`` table::

    [campaign]
    name = "npt-certificate"          # default: the file's name
    out_dir = "campaigns/npt"         # default: the name
    structure = "systems/water_648.xyz"
    model = "systems/water_mace.model"
    device = "cuda"
    runs_per_task = 3                 # grid points one task runs (default 1)
    policies = ["fp64", "fp32"]       # for every ensemble that names none
    seeds = [0, 1, 2]

    [[ensemble]]
    name = "npt"                      # its folder under out_dir (default: the protocol)
    protocol = "npt"                  # nvt, npt or nve
    settings = "protocols/npt_water.toml"
    steps = 20000                     # any other key overrides a setting of the protocol

Relative paths are relative to the working directory the campaign starts from (as for
the protocols' command lines); they are stored absolute, so that workers elsewhere find
them. A run's settings are the protocol's defaults, overridden by its settings file, by
the ``[campaign]`` structure, model and device, by the ensemble's keys, and finally by
the grid (policy, seed, output file), which the ensemble may not set itself.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from mace_lpcalc.md.base import MDSettings
from mace_lpcalc.md.cli import read_settings_file
from mace_lpcalc.md.inputs import read_structure
from mace_lpcalc.md.npt import NPT
from mace_lpcalc.md.nve import NVE
from mace_lpcalc.md.nvt import NVT
from mace_lpcalc.precision.policies import POLICIES
from mace_lpcalc.toml_files import read_toml

#: Protocol name -> class; the ``protocol`` of an ensemble is one of these names.
PROTOCOLS = {protocol.name: protocol for protocol in (NVT, NPT, NVE)}

_ROOT_KEYS = ("campaign", "ensemble", "cluster", "policies", "seeds")
_CAMPAIGN_KEYS = ("name", "out_dir", "structure", "model", "device", "runs_per_task",
                  "policies", "seeds")
_ENSEMBLE_KEYS = ("name", "protocol", "settings", "policies", "seeds")
#: Settings the grid sets for each run; an ensemble setting them would be overruled.
_GRID_KEYS = ("policy", "seed", "out", "resume", "overwrite")
#: Settings that name files, resolved to absolute paths and checked to exist.
_FILE_SETTINGS = ("structure", "model")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class CampaignError(ValueError):
    """A campaign file that cannot run; the message names the table and the problem."""


@dataclasses.dataclass(frozen=True)
class Ensemble:
    """One ``[[ensemble]]`` table, checked: the settings every run of it shares (policy,
    seed and output file left out) and the policies and seeds it runs."""

    name: str
    protocol: str
    settings: dict
    policies: tuple[str, ...]
    seeds: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Campaign:
    """A checked campaign file."""

    name: str
    path: Path
    out_dir: Path
    runs_per_task: int
    ensembles: tuple[Ensemble, ...]
    #: The ``[cluster]`` table, as written (checked when a batch scheduler starts).
    cluster: dict


def load_campaign(path) -> Campaign:
    """Read and check the campaign file ``path``; raises :class:`CampaignError` (or
    FileNotFoundError for the file itself) naming the problem."""
    path = Path(path)
    document = read_toml(path, "campaign", CampaignError)
    _refuse_unknown(document, _ROOT_KEYS, f"{path}: top level")
    table = document.get("campaign")
    if not isinstance(table, dict):
        raise CampaignError(f"{path} has no [campaign] table")
    _refuse_unknown(table, _CAMPAIGN_KEYS, "[campaign]")
    for key in ("policies", "seeds"):
        if key in document and key in table:
            raise CampaignError(f"{key} is set both at the top level and in [campaign]")
    name = table.get("name", path.stem)
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
        raise CampaignError(f"[campaign] name must be a plain file name, got {name!r}")
    runs_per_task = table.get("runs_per_task", 1)
    if isinstance(runs_per_task, bool) or not isinstance(runs_per_task, int) \
            or runs_per_task < 1:
        raise CampaignError(f"[campaign] runs_per_task must be a positive integer, got "
                            f"{runs_per_task!r}")
    if "structure" not in table:
        raise CampaignError("[campaign] names no structure")
    common = {key: table[key] for key in ("structure", "model", "device") if key in table}
    grid_defaults = {key: table.get(key, document.get(key)) for key in ("policies", "seeds")}

    tables = document.get("ensemble", [])
    if not isinstance(tables, list) or not tables:
        raise CampaignError(f"{path} defines no [[ensemble]] table")
    ensembles = tuple(_ensemble(index, entry, common, grid_defaults)
                      for index, entry in enumerate(tables))
    names = [ensemble.name for ensemble in ensembles]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise CampaignError(f"ensemble name(s) {', '.join(duplicates)} used more than once; "
                            "give each [[ensemble]] its own name")
    cluster = document.get("cluster", {})
    if not isinstance(cluster, dict):
        raise CampaignError("[cluster] must be a table")
    out_dir = Path(table.get("out_dir", name)).absolute()
    return Campaign(name=name, path=path.absolute(), out_dir=out_dir,
                    runs_per_task=runs_per_task, ensembles=ensembles, cluster=cluster)


def _ensemble(index: int, table, common: dict, grid_defaults: dict) -> Ensemble:
    if not isinstance(table, dict):
        raise CampaignError(f"[[ensemble]] number {index + 1} is not a table")
    protocol = table.get("protocol")
    where = f"ensemble {table.get('name', protocol)!r}"
    if protocol not in PROTOCOLS:
        raise CampaignError(f"{where}: unknown protocol {protocol!r}; known: "
                            f"{', '.join(PROTOCOLS)}")
    name = table.get("name", protocol)
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
        raise CampaignError(f"{where}: name must be a plain folder name, got {name!r}")
    settings_class = PROTOCOLS[protocol].settings_class
    overrides = {key: value for key, value in table.items() if key not in _ENSEMBLE_KEYS}
    _check_overrides(where, overrides, settings_class)

    values = {}
    if "settings" in table:
        settings_file = Path(table["settings"])
        try:
            values = read_settings_file(settings_file, settings_class)
        except (FileNotFoundError, ValueError) as err:
            raise CampaignError(f"{where}: {err}") from None
    values.update(common)
    values.update(overrides)
    for key in _GRID_KEYS:
        values.pop(key, None)  # a settings file's seed or policy: the grid sets them
    for key in _FILE_SETTINGS:
        if values.get(key):
            values[key] = _existing_file(where, key, values[key])

    policies = _grid_values(where, "policies", table.get("policies",
                                                         grid_defaults["policies"]))
    seeds = _grid_values(where, "seeds", table.get("seeds", grid_defaults["seeds"]))
    unknown = [policy for policy in policies if policy not in POLICIES]
    if unknown:
        raise CampaignError(f"{where}: unknown policy {', '.join(map(repr, unknown))}; "
                            f"known: {', '.join(POLICIES)}")
    bad_seeds = [seed for seed in seeds
                 if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0]
    if bad_seeds:
        raise CampaignError(f"{where}: seeds must be non-negative integers, got {bad_seeds}")
    _check_settings(where, PROTOCOLS[protocol], values, policies, seeds)
    return Ensemble(name=name, protocol=protocol, settings=values, policies=tuple(policies),
                    seeds=tuple(seeds))


def _check_overrides(where: str, overrides: dict, settings_class: type[MDSettings]) -> None:
    """Unknown keys, grid keys and values of the wrong type, as ``read_settings_file``
    refuses them in a settings file."""
    fields = {field.name: field for field in dataclasses.fields(settings_class)}
    grid = sorted(set(overrides) & set(_GRID_KEYS))
    if grid:
        raise CampaignError(f"{where}: {', '.join(grid)} cannot be set in an ensemble: the "
                            "campaign sets them for each run (policies, seeds and its "
                            "output layout)")
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise CampaignError(f"{where}: unknown setting(s) {', '.join(unknown)} for "
                            f"{settings_class.__name__}; known: "
                            f"{', '.join([*_ENSEMBLE_KEYS, *fields])}")
    for key, value in overrides.items():
        default = fields[key].default
        expected = str if default is None else type(default)
        accepted = (int, float) if expected is float else (expected,)
        if isinstance(value, bool) != (expected is bool) or not isinstance(value, accepted):
            raise CampaignError(f"{where}: {key} must be {expected.__name__}, got {value!r}")


def _check_settings(where: str, protocol_class, values: dict, policies, seeds) -> None:
    """Build every policy's settings once (the dataclass checks its values) and check the
    structure fits the protocol, so that a bad value fails now rather than on a worker."""
    if not values.get("structure"):
        raise CampaignError(f"{where}: no structure (set it in [campaign])")
    try:
        for policy in policies:
            settings = protocol_class.settings_class(**values, policy=policy, seed=seeds[0])
        protocol_class(settings).check_structure(read_structure(values["structure"]))
    except (TypeError, ValueError, OSError) as err:
        raise CampaignError(f"{where}: {err}") from None


def _grid_values(where: str, key: str, values) -> list:
    if values is None:
        raise CampaignError(f"{where}: no {key} (set {key} in the ensemble or in "
                            "[campaign])")
    if not isinstance(values, list):
        raise CampaignError(f"{where}: {key} must be a list, got {values!r}")
    if not values:
        raise CampaignError(f"{where}: empty grid: {key} is an empty list")
    repeated = sorted({str(value) for value in values if values.count(value) > 1})
    if repeated:
        raise CampaignError(f"{where}: {key} lists {', '.join(repeated)} more than once")
    return values


def _existing_file(where: str, key: str, value: str) -> str:
    path = Path(value).absolute()
    if not path.is_file():
        raise CampaignError(f"{where}: {key} file not found: {value}")
    return str(path)


def _refuse_unknown(table: dict, known, where: str) -> None:
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise CampaignError(f"{where}: unknown key(s) {', '.join(unknown)}; known: "
                            f"{', '.join(known)}")
