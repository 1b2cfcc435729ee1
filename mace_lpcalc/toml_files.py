"""Reading the project's TOML files (protocol settings, equivalence margins, campaigns),
with errors that name the file and what kind of file it was meant to be."""

from __future__ import annotations

from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def read_toml(path, kind: str, error: type[ValueError] = ValueError) -> dict:
    """The document in TOML file ``path``. A missing file is a ``FileNotFoundError`` and
    invalid TOML an ``error``, each naming the ``kind`` of file (e.g. "settings")."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"{kind} file not found: {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise error(f"{kind} file {path} is not valid TOML: {err}") from err
