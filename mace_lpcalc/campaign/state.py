"""A campaign's runs carried from one machine to the next, in parts a job slot can return.

    python -m mace_lpcalc.campaign.state pack OUT_DIR STATE_DIR [--part-mib 15 --max-parts 8]
    python -m mace_lpcalc.campaign.state unpack STATE_DIR OUT_DIR

Runs resume from their checkpoints, but only where their files still are. A GPU slot whose
machine is wiped when it ends (a short cloud or cluster allocation) keeps nothing, and a
slot's returned files are often limited in size and number. ``pack`` writes every run file
under OUT_DIR (trajectories ``*.h5``, checkpoints ``*.checkpoint.npz``, run logs ``*.log``,
paths kept relative) into one xz-compressed tar cut into parts ``state.tar.xz.000``, ...
plus ``state.json`` (the files, their sizes, the parts and the archive's SHA-256). It
refuses, naming the size, an archive that needs more than ``--max-parts`` parts.
``unpack`` checks the parts against ``state.json`` and restores the files, refusing to
replace any that exists (those runs would be newer, or another campaign's). The
campaign then continues where it stopped, with ``--resume`` or by starting it again.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import tarfile
from pathlib import Path

#: Which files of a run directory make up its state.
RUN_FILE_PATTERNS = ("*.h5", "*.checkpoint.npz", "*.log")
STATE_RECORD, PART_PREFIX = "state.json", "state.tar.xz."


class StateError(ValueError):
    """A state that cannot be packed or restored, with the reason."""


def run_files(run_dir: Path) -> list[Path]:
    """The run files under ``run_dir``, relative to it, sorted."""
    found = {path.relative_to(run_dir) for pattern in RUN_FILE_PATTERNS
             for path in run_dir.rglob(pattern) if path.is_file()}
    return sorted(found)


def pack(run_dir, state_dir, *, part_bytes: int = 15 * 2**20, max_parts: int = 8) -> dict:
    """Write ``run_dir``'s run files as parts of at most ``part_bytes`` into ``state_dir``
    (emptied of earlier parts first); return the record written to ``state.json``."""
    run_dir, state_dir = Path(run_dir), Path(state_dir)
    files = run_files(run_dir)
    if not files:
        raise StateError(f"{run_dir} holds no run files ({', '.join(RUN_FILE_PATTERNS)})")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as archive:
        for relative in files:
            archive.add(run_dir / relative, arcname=str(relative))
    data = buffer.getvalue()
    n_parts = -(-len(data) // part_bytes)
    if n_parts > max_parts:
        raise StateError(f"the runs under {run_dir} pack into {len(data) / 2**20:.1f} MiB, "
                         f"{n_parts} parts of {part_bytes / 2**20:g} MiB where at most "
                         f"{max_parts} may be: log fewer frames, or carry fewer runs")
    state_dir.mkdir(parents=True, exist_ok=True)
    for stale in state_dir.glob(PART_PREFIX + "*"):
        stale.unlink()
    parts = []
    for index in range(n_parts):
        name = f"{PART_PREFIX}{index:03d}"
        (state_dir / name).write_bytes(data[index * part_bytes:(index + 1) * part_bytes])
        parts.append(name)
    record = {"files": {str(relative): (run_dir / relative).stat().st_size
                        for relative in files},
              "parts": parts, "archive_bytes": len(data),
              "archive_sha256": hashlib.sha256(data).hexdigest()}
    (state_dir / STATE_RECORD).write_text(json.dumps(record, indent=1))
    return record


def unpack(state_dir, run_dir) -> list[str]:
    """Restore the files ``pack`` wrote to ``state_dir`` under ``run_dir``; return them."""
    state_dir, run_dir = Path(state_dir), Path(run_dir)
    try:
        record = json.loads((state_dir / STATE_RECORD).read_text())
    except FileNotFoundError:
        raise StateError(f"{state_dir} holds no {STATE_RECORD}: not a packed state") from None
    missing = [name for name in record["parts"] if not (state_dir / name).is_file()]
    if missing:
        raise StateError(f"{state_dir} lacks part(s) {', '.join(missing)}")
    data = b"".join((state_dir / name).read_bytes() for name in record["parts"])
    if hashlib.sha256(data).hexdigest() != record["archive_sha256"]:
        raise StateError(f"the parts in {state_dir} do not make the archive {STATE_RECORD} "
                         f"describes (a part truncated or from another state)")
    existing = [name for name in record["files"] if (run_dir / name).exists()]
    if existing:
        raise StateError(f"{run_dir} already holds {', '.join(existing[:5])}"
                         f"{' ...' if len(existing) > 5 else ''}: not replaced")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:xz") as archive:
        archive.extractall(run_dir, filter="data")  # no paths outside run_dir, no links out
    return sorted(record["files"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    packer = commands.add_parser("pack", help="run directory -> parts")
    packer.add_argument("run_dir", type=Path)
    packer.add_argument("state_dir", type=Path)
    packer.add_argument("--part-mib", type=float, default=15.0)
    packer.add_argument("--max-parts", type=int, default=8)
    unpacker = commands.add_parser("unpack", help="parts -> run directory")
    unpacker.add_argument("state_dir", type=Path)
    unpacker.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "pack":
            record = pack(args.run_dir, args.state_dir, part_bytes=int(args.part_mib * 2**20),
                          max_parts=args.max_parts)
            print(f"packed {len(record['files'])} files into {len(record['parts'])} part(s), "
                  f"{record['archive_bytes'] / 2**20:.1f} MiB, in {args.state_dir}")
        else:
            restored = unpack(args.state_dir, args.run_dir)
            print(f"restored {len(restored)} files under {args.run_dir}")
    except StateError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
