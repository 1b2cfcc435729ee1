"""Bad input on the protocols' command line: one line naming the problem, nothing damaged.

Each case runs ``main`` in-process and checks the message of the ``SystemExit`` (a
non-zero status with a one-line text); one case runs a real subprocess to check that no
traceback reaches the user unless ``--debug`` is given.
"""

import errno
import hashlib
import subprocess
import sys

import ase.io
import h5py
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule

from mace_lpcalc.md import cli
from mace_lpcalc.md.checkpoint import checkpoint_path
from mace_lpcalc.md.npt import NPT
from mace_lpcalc.md.nvt import NVT
from mace_lpcalc.md.trajectory import TrajectoryWriter, read_trajectory

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def files(water_files):
    """The folder of ``water_files`` (water.xyz, tiny.model) with a finished 4-step NVT run
    of them (done.h5)."""
    folder = water_files[0].parent
    run = folder / "done.h5"
    cli.main(NVT, [str(folder / "water.xyz"), "--model", str(folder / "tiny.model"),
                    "--steps", "4", "--log-every", "2", "--out", str(run)])
    return folder


def _error_of(protocol, argv) -> str:
    with pytest.raises(SystemExit) as raised:
        cli.main(protocol, [str(arg) for arg in argv])
    message = str(raised.value.code)
    assert message.startswith(f"python -m mace_lpcalc.protocols.{protocol.name}: error: ")
    assert "\n" not in message and "Traceback" not in message
    return message


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run_args(files, **options):
    args = [files / "water.xyz", "--model", files / "tiny.model", "--steps", "4"]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}"] + ([] if value is True else [value])
    return args


@pytest.mark.parametrize("toml, expected", [
    ("frictions = 0.02\n", r"bad.toml: unknown setting\(s\) frictions"),
    ("steps = 'many'\n", r"bad.toml: steps must be int, got 'many'"),
    ("steps = 10\nsteps = 20\n", r"bad.toml is not valid TOML"),
])
def test_a_bad_settings_file_names_the_file_and_key(files, tmp_path, toml, expected):
    (tmp_path / "bad.toml").write_text(toml)
    message = _error_of(NVT, _run_args(files, settings=tmp_path / "bad.toml",
                                       out=tmp_path / "run.h5"))
    assert __import__("re").search(expected, message), message
    assert not (tmp_path / "run.h5").exists()


@pytest.mark.parametrize("option, value, expected", [
    ("dt", "-1", "timestep_fs must be positive, got -1.0"),
    ("temperature-K", "0", "a Langevin thermostat needs temperature_K > 0, got 0.0"),
    ("log-every", "0", "log_every must be positive, got 0"),
])
def test_a_bad_setting_value_is_named(files, tmp_path, option, value, expected):
    message = _error_of(NVT, _run_args(files, out=tmp_path / "run.h5") + [f"--{option}", value])
    assert expected in message


def test_missing_and_non_mace_model_files(files, tmp_path):
    missing = tmp_path / "absent.model"
    assert f"MACE model file not found: {missing}" in _error_of(
        NVT, [files / "water.xyz", "--model", missing, "--out", tmp_path / "a.h5"])
    (tmp_path / "notes.model").write_text("not a model\n")
    assert "notes.model is not a loadable MACE model" in _error_of(
        NVT, [files / "water.xyz", "--model", tmp_path / "notes.model",
              "--out", tmp_path / "b.h5"])
    torch.save({"weights": torch.zeros(3)}, tmp_path / "dict.model")
    assert "dict.model" in _error_of(NVT, [files / "water.xyz", "--model", tmp_path / "dict.model",
                                           "--out", tmp_path / "c.h5"])
    assert not any(tmp_path.glob("*.h5"))


def test_structure_problems(files, tmp_path):
    assert "structure file not found" in _error_of(
        NVT, [tmp_path / "absent.xyz", "--model", files / "tiny.model"])
    ase.io.write(tmp_path / "nacl.xyz", Atoms("NaCl", positions=[[0, 0, 0], [2.8, 0, 0]]))
    assert "does not know element" in _error_of(
        NVT, [tmp_path / "nacl.xyz", "--model", files / "tiny.model",
              "--out", tmp_path / "a.h5"])
    ase.io.write(tmp_path / "h2o.xyz", molecule("H2O"))
    assert "NPT needs a structure periodic in three dimensions" in _error_of(
        NPT, [tmp_path / "h2o.xyz", "--model", files / "tiny.model",
              "--out", tmp_path / "b.h5"])
    assert not any(tmp_path.glob("*.h5"))


def test_an_output_directory_that_cannot_be_made_is_named_before_any_setup(files, tmp_path):
    (tmp_path / "taken").write_text("a file where the output directory should be")
    message = _error_of(NVT, _run_args(files, out=tmp_path / "taken" / "run.h5"))
    assert "taken is a file, not a directory" in message
    made = tmp_path / "new" / "folder" / "run.h5"
    cli.main(NVT, [str(arg) for arg in _run_args(files, out=made)])
    assert read_trajectory(made)["step"][-1] == 4


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_checkpoint_is_named_and_the_trajectory_kept(files, tmp_path, damage):
    out = tmp_path / "run.h5"
    out.write_bytes((files / "done.h5").read_bytes())
    whole = checkpoint_path(files / "done.h5").read_bytes()
    checkpoint_path(out).write_bytes(b"" if damage == "empty" else whole[:len(whole) // 2])
    before = _digest(out)
    message = _error_of(NVT, _run_args(files, out=out, steps=8, log_every=2, resume=True))
    assert f"{checkpoint_path(out)} is not a readable mace_lpcalc checkpoint" in message
    assert _digest(out) == before


@pytest.mark.parametrize("damage", ["foreign", "truncated"])
def test_a_foreign_or_truncated_trajectory_is_named_on_resume(files, tmp_path, damage):
    out = tmp_path / "run.h5"
    checkpoint_path(out).write_bytes(checkpoint_path(files / "done.h5").read_bytes())
    if damage == "foreign":
        with h5py.File(out, "w") as handle:
            handle["data"] = np.arange(3)
    else:
        whole = (files / "done.h5").read_bytes()
        out.write_bytes(whole[:len(whole) // 3])
    before = _digest(out)
    message = _error_of(NVT, _run_args(files, out=out, steps=8, log_every=2, resume=True))
    expected = "not a mace_lpcalc trajectory" if damage == "foreign" else "corrupt HDF5 file"
    assert expected in message, message
    assert _digest(out) == before


def test_a_full_disk_stops_the_run_in_one_line_keeping_the_frames_written(
        files, tmp_path, monkeypatch):
    append = TrajectoryWriter.append

    def append_until_the_disk_fills(writer, frame):
        if frame.step >= 6:
            raise OSError(errno.ENOSPC, "No space left on device", str(writer.path))
        append(writer, frame)

    monkeypatch.setattr(TrajectoryWriter, "append", append_until_the_disk_fills)
    out = tmp_path / "run.h5"
    message = _error_of(NVT, _run_args(files, out=out, steps=10, log_every=2))
    assert f"{out}: No space left on device" in message
    np.testing.assert_array_equal(read_trajectory(out)["step"], [0, 2, 4])


def test_no_traceback_reaches_the_user_unless_asked(files, tmp_path):
    command = [sys.executable, "-m", "mace_lpcalc.protocols.nvt", str(files / "water.xyz"),
               "--model", str(files / "tiny.model"), "--dt", "-1",
               "--out", str(tmp_path / "run.h5")]
    # Both start at once, so their slow imports overlap.
    plain, debug = (subprocess.Popen(arguments, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True) for arguments in (command, command + ["--debug"]))
    plain_stderr, debug_stderr = (process.communicate(timeout=300)[1]
                                  for process in (plain, debug))
    assert plain.returncode != 0
    assert plain_stderr.strip().splitlines() == [
        "python -m mace_lpcalc.protocols.nvt: error: timestep_fs must be positive, got -1.0"]
    assert debug.returncode != 0 and "Traceback" in debug_stderr
