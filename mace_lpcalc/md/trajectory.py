"""The MD trajectory file: MDTraj's HDF5 layout plus the thermodynamic time series.

One run writes one file that ``mdtraj.load("run.h5")`` opens (through PyTables; the
readers here need only h5py), in MDTraj's HDF5 layout ("Pande" conventions 1.1):
``coordinates`` (frames × atoms × 3, float32 nm), ``time`` (ps), ``cell_lengths`` (nm),
``cell_angles`` (degrees) and a JSON ``topology``, each bonded molecule one residue
(:mod:`.topology`; :func:`read_topology`). Alongside, every logged frame stores the float64
series below, each with a ``units`` attribute (``kelvin``: MDTraj parses it):

========================  ==========  ================================================
dataset                   units       meaning
========================  ==========  ================================================
``step``                  (int)       MD step index of the frame
``potential_energy``      eV
``kinetic_energy``        eV
``total_energy``          eV          potential + kinetic
``conserved_energy``      eV          the integrator's conserved quantity where ASE
                                      exposes one, else the total energy
``temperature``           K           from the kinetic energy, ASE's degrees of freedom
``pressure``              bar         −tr(stress)/3, ideal-gas (kinetic) term included
``stress``                eV/Å³       Voigt (xx, yy, zz, yz, xz, xy), ideal gas included
``volume``                Å³
``density``               g/cm³
``wall_time_per_step``    s           mean over the steps since the previous frame
                                      (NaN for a run's first frame)
========================  ==========  ================================================

Coordinates are *unwrapped* (atoms are never folded back into the cell), which mean
squared displacements need; MDTraj's RDF applies the minimum image itself. For a
triclinic cell that is not lower-triangular, coordinates are rotated into the cell's
standard orientation, the one MDTraj rebuilds from lengths and angles. Systems that are
not periodic in all three directions have no cell, stress, pressure, volume or density
datasets.

Frames are appended one at a time and flushed after each, so a run killed at any point
keeps every frame logged before its last flush; ``step`` is written last in each append,
so its length counts the complete frames. The group ``sentinel`` holds the live fp64
sentinel's checks (:mod:`mace_lpcalc.precision.sentinel`): ``step`` and one float64
dataset per deviation, each with its ``units``. The file stays readable while a run
writes it: the writer opens it without HDF5's file lock, so another process can open it
with h5py, :func:`read_trajectory` or ``mdtraj.load`` at any time (a frame being
appended at that moment may be missing from what it reads); instead, the writer holds an
exclusive lock on ``<file>.lock`` beside it, so no second run writes the same file. The
root attributes record the run: protocol, settings (JSON), model hash, precision policy,
backend, seed, library versions (JSON), ``n_atoms`` and ``periodic``.

What a frame holds before it is written, and what reading returns, is :mod:`.frames`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

import h5py
import numpy as np
from ase import Atoms, units
from ase.cell import Cell
from mdtraj.formats.hdf5 import HDF5TrajectoryFile

from mace_lpcalc import __version__
from mace_lpcalc.md.frames import Frame, TrajectoryData, is_periodic
from mace_lpcalc.md.topology import mdtraj_topology, topology_from_dict
from mace_lpcalc.units import density_g_cm3
from mace_lpcalc.precision.sentinel import SENTINEL_UNITS

FORMAT_NAME = "mace_lpcalc.md.trajectory"
FORMAT_VERSION = 1

#: Units attribute of every per-frame dataset.
UNITS = {
    "coordinates": "nanometers", "time": "picoseconds", "cell_lengths": "nanometers",
    "cell_angles": "degrees", "step": "dimensionless",
    "potential_energy": "eV", "kinetic_energy": "eV", "total_energy": "eV",
    "conserved_energy": "eV",
    "temperature": "kelvin",
    "pressure": "bar",
    "stress": "eV/Angstrom^3",
    "volume": "Angstrom^3",
    "density": "g/cm^3",
    "wall_time_per_step": "s",
}
_CELL_DATASETS = ("cell_lengths", "cell_angles", "pressure", "stress", "volume", "density")
_NM_PER_ANGSTROM = 0.1


class TrajectoryError(ValueError):
    """A trajectory file is missing, foreign, corrupt, or a frame does not fit it."""


class TrajectoryWriter:
    """Appends :class:`Frame` objects to a trajectory file, validating each.

    Use :meth:`create` for a new file and :meth:`reopen` to continue a run; both
    return a context manager.
    """

    def __init__(self, path: Path, handle: h5py.File, lock: _WriterLock):
        self.path = path
        self._file = handle
        self._lock = lock
        self.n_atoms = int(handle.attrs["n_atoms"])
        self.periodic = bool(handle.attrs["periodic"])
        # "step" goes last in every append: its length counts the complete frames.
        names = [name for name in UNITS if name != "step"
                 and (self.periodic or name not in _CELL_DATASETS)] + ["step"]
        self._datasets = {name: handle[name] for name in names}
        self._mass_amu = float(handle["masses"][:].sum())
        steps = handle["step"]
        self.last_step = int(steps[-1]) if len(steps) else None
        #: Complete frames :meth:`reopen` cut off (logged after the checkpoint resumed from).
        self.discarded_frames = 0

    @classmethod
    def create(cls, path, atoms: Atoms, metadata: dict, *, overwrite: bool = False):
        """Start a new trajectory for ``atoms``; ``metadata`` becomes root attributes
        (dicts and lists as JSON). Refuses an existing file unless ``overwrite``."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; choose another output file, "
                                  "pass overwrite to replace it, or resume to continue it")
        if atoms.pbc.all() and atoms.cell.rank < 3:
            raise TrajectoryError("structure is periodic in all directions but its cell "
                                  f"is degenerate: {atoms.cell.tolist()}")
        periodic = is_periodic(atoms)
        handle, lock = _open_locked(path, "w")
        try:
            root = handle.attrs
            root.update({"conventions": "Pande", "conventionVersion": "1.1",
                         "program": "mace_lpcalc", "programVersion": __version__,
                         "application": "mace_lpcalc",
                         "title": str(metadata.get("protocol", "MD")),
                         "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                         "n_atoms": len(atoms), "periodic": int(periodic)})
            _set_attributes(handle, metadata)
            topology = HDF5TrajectoryFile.convert_topology_to_dict(mdtraj_topology(atoms))
            handle.create_dataset("topology", data=np.array([json.dumps(topology).encode()]))
            handle.create_dataset("masses", data=atoms.get_masses()).attrs["units"] = "amu"
            for name in UNITS:
                if periodic or name not in _CELL_DATASETS:
                    _create_series(handle, name, len(atoms))
            sentinel = handle.create_group("sentinel")
            for name, unit in {"step": "dimensionless", **SENTINEL_UNITS}.items():
                sentinel.create_dataset(name, shape=(0,), maxshape=(None,), chunks=(256,),
                                        dtype=np.int64 if name == "step" else np.float64
                                        ).attrs["units"] = unit
            handle.flush()
        except BaseException:
            handle.close()
            lock.release()
            raise
        return cls(path, handle, lock)

    @classmethod
    def reopen(cls, path, *, keep_through_step: int, n_atoms: int, metadata=None):
        """Open an existing trajectory to continue it, discarding frames after
        ``keep_through_step`` (they are re-run from the checkpoint at that step);
        ``metadata`` updates root attributes."""
        path = Path(path)
        _check_readable(path)
        try:
            handle, lock = _open_locked(path, "r+")
        except OSError as err:
            raise TrajectoryError(f"{path} is a corrupt HDF5 file ({err})") from err
        try:
            _check_format(path, handle)
            if int(handle.attrs["n_atoms"]) != n_atoms:
                raise TrajectoryError(f"{path} holds {handle.attrs['n_atoms']} atoms, "
                                      f"the checkpoint {n_atoms}")
            steps = handle["step"][:]
            n_keep = int(np.count_nonzero(steps <= keep_through_step))
            for name in UNITS:
                if name in handle:
                    if handle[name].shape[0] < n_keep:
                        raise TrajectoryError(f"{path} is corrupt: dataset {name!r} has "
                                              f"fewer frames than 'step'")
                    handle[name].resize(n_keep, axis=0)
            if "sentinel" in handle:
                n_checks = int(np.count_nonzero(handle["sentinel/step"][:] <= keep_through_step))
                for dataset in handle["sentinel"].values():
                    dataset.resize(min(n_checks, dataset.shape[0]), axis=0)
            _set_attributes(handle, metadata or {})
            handle.flush()
        except BaseException:
            handle.close()
            lock.release()
            raise
        writer = cls(path, handle, lock)
        writer.discarded_frames = len(steps) - n_keep
        return writer

    def append(self, frame: Frame) -> None:
        """Validate ``frame`` against the file, write it and flush."""
        values = self._validated(frame)
        n_frames = self._datasets["step"].shape[0]
        for name, dataset in self._datasets.items():
            dataset.resize(n_frames + 1, axis=0)
            dataset[n_frames] = values[name]
        self._file.flush()
        self.last_step = frame.step

    def append_sentinel(self, step: int, record) -> None:
        """Write one sentinel check (a :class:`~mace_lpcalc.precision.sentinel.SentinelRecord`)
        made at MD ``step``, and flush."""
        group = self._file["sentinel"]
        n_checks = group["step"].shape[0]
        for name in (*SENTINEL_UNITS, "step"):  # "step" last: its length counts the checks
            group[name].resize(n_checks + 1, axis=0)
            group[name][n_checks] = step if name == "step" else getattr(record, name)
        self._file.flush()

    def set_attributes(self, metadata: dict) -> None:
        """Update root attributes (dicts and lists as JSON), and flush."""
        _set_attributes(self._file, metadata)
        self._file.flush()

    def _validated(self, frame: Frame) -> dict:
        if not isinstance(frame, Frame):
            raise TrajectoryError(f"expected a Frame, got {type(frame).__name__}")
        if not isinstance(frame.step, (int, np.integer)):
            raise TrajectoryError(f"{self.path}: frame step must be an integer, got "
                                  f"{frame.step!r}")
        positions = np.asarray(frame.positions_A, dtype=float)
        if positions.shape != (self.n_atoms, 3):
            raise TrajectoryError(f"{self.path}: frame at step {frame.step} has positions of "
                                  f"shape {positions.shape}, the file holds "
                                  f"({self.n_atoms}, 3)")
        if self.last_step is not None and frame.step <= self.last_step:
            raise TrajectoryError(f"{self.path}: frame step {frame.step} does not follow "
                                  f"the last written step {self.last_step}")
        scalars = {"time": frame.time_ps, "potential_energy": frame.potential_energy_eV,
                   "kinetic_energy": frame.kinetic_energy_eV,
                   "conserved_energy": frame.conserved_energy_eV,
                   "temperature": frame.temperature_K}
        checked = {"coordinates": positions, **scalars}
        values = {"step": int(frame.step), "wall_time_per_step": frame.wall_time_per_step_s,
                  "total_energy": frame.potential_energy_eV + frame.kinetic_energy_eV,
                  **scalars}
        if self.periodic:
            if frame.cell_A is None or frame.stress_eV_A3 is None:
                raise TrajectoryError(f"{self.path}: periodic trajectory needs cell and "
                                      f"stress, frame at step {frame.step} lacks them")
            cell = np.asarray(frame.cell_A, dtype=float)
            stress = np.asarray(frame.stress_eV_A3, dtype=float)
            if cell.shape != (3, 3) or stress.shape != (6,):
                raise TrajectoryError(f"{self.path}: frame at step {frame.step} has cell "
                                      f"{cell.shape} and stress {stress.shape}, expected "
                                      "(3, 3) and (6,)")
            checked.update(cell=cell, stress=stress)
            volume = abs(np.linalg.det(cell))
            cell_parameters = Cell(cell).cellpar()
            if not _is_lower_triangular(cell):
                positions = positions @ Cell(cell).standard_form()[1].T
            values.update(cell_lengths=cell_parameters[:3] * _NM_PER_ANGSTROM,
                          cell_angles=cell_parameters[3:], stress=stress, volume=volume,
                          pressure=-stress[:3].mean() / units.bar,
                          density=density_g_cm3(self._mass_amu, volume))
        elif frame.cell_A is not None or frame.stress_eV_A3 is not None:
            raise TrajectoryError(f"{self.path}: the trajectory is not periodic but frame "
                                  f"at step {frame.step} has a cell or stress")
        for name, value in checked.items():
            if not np.all(np.isfinite(value)):
                raise TrajectoryError(f"{self.path}: frame at step {frame.step} has "
                                      f"non-finite {name}; not written")
        values["coordinates"] = positions * _NM_PER_ANGSTROM
        return values

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()
        self._lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class _WriterLock:
    """An exclusive lock on ``<path>.lock``, held while a writer has ``path`` open.

    It stands in for HDF5's own file lock, which the writer does not take so that readers
    can open the file while it grows. The operating system drops it when the process dies,
    so a killed run leaves nothing that blocks its resumption. The lock file itself is
    left in place: removing it would let a second writer lock a new file of that name
    while a third still waits on the old one.
    """

    def __init__(self, path: Path):
        self._path = path.with_name(path.name + ".lock")
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise TrajectoryError(f"{path} is being written by another process (it holds "
                                  f"{self._path.name})") from None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _open_locked(path: Path, mode: str) -> tuple[h5py.File, _WriterLock]:
    """Open ``path`` for writing under its :class:`_WriterLock`, without HDF5's own lock."""
    lock = _WriterLock(path)
    try:
        return h5py.File(path, mode, locking=False), lock
    except BaseException:
        lock.release()
        raise


def _set_attributes(handle: h5py.File, metadata: dict) -> None:
    for key, value in metadata.items():
        handle.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value


def _is_lower_triangular(cell: np.ndarray) -> bool:
    return cell[0, 1] == 0 and cell[0, 2] == 0 and cell[1, 2] == 0


def _create_series(handle: h5py.File, name: str, n_atoms: int) -> None:
    frame_shape = {"coordinates": (n_atoms, 3), "cell_lengths": (3,), "cell_angles": (3,),
                   "stress": (6,)}.get(name, ())
    dtype = {"coordinates": np.float32, "cell_lengths": np.float32,
             "cell_angles": np.float32, "step": np.int64}.get(name, np.float64)
    frame_bytes = np.dtype(dtype).itemsize * int(np.prod(frame_shape, dtype=int))
    frames_per_chunk = int(np.clip(2**16 // frame_bytes, 1, 1024))
    dataset = handle.create_dataset(name, shape=(0, *frame_shape), dtype=dtype,
                                    maxshape=(None, *frame_shape),
                                    chunks=(frames_per_chunk, *frame_shape))
    dataset.attrs["units"] = UNITS[name]


def _check_readable(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"trajectory file not found: {path}")
    if not h5py.is_hdf5(path):
        raise TrajectoryError(f"{path} is not an HDF5 file")


def _check_format(path: Path, handle: h5py.File) -> None:
    if handle.attrs.get("format") != FORMAT_NAME:
        raise TrajectoryError(f"{path} is an HDF5 file but not a mace_lpcalc trajectory "
                              "(no 'format' attribute naming it)")
    if int(handle.attrs["format_version"]) > FORMAT_VERSION:
        raise TrajectoryError(f"{path} has format version {handle.attrs['format_version']}, "
                              f"newer than this reader's {FORMAT_VERSION}")
    names = [name for name in UNITS
             if bool(handle.attrs["periodic"]) or name not in _CELL_DATASETS]
    missing = [name for name in (*names, "topology", "masses") if name not in handle]
    if missing:
        raise TrajectoryError(f"{path} is corrupt: missing datasets {missing}")


def read_trajectory(path, names=None) -> TrajectoryData:
    """Read a trajectory written by :class:`TrajectoryWriter`: all its per-frame
    datasets, or only those in ``names``.

    Raises FileNotFoundError for a missing file and :class:`TrajectoryError`, naming
    the file, for one that is not HDF5, not a mace_lpcalc trajectory, or corrupt.
    Frames a killed writer left half-appended are not returned.
    """
    path = Path(path)
    with _open_checked(path) as handle:
        n_frames = handle["step"].shape[0]
        arrays, file_units = {}, {}
        for name in UNITS if names is None else names:
            if name not in UNITS:
                raise ValueError(f"{name!r} is not a trajectory dataset; known: {list(UNITS)}")
            if name in handle:
                if handle[name].shape[0] < n_frames:
                    raise TrajectoryError(f"{path} is corrupt: dataset {name!r} has fewer "
                                          "frames than 'step'")
                arrays[name] = handle[name][:n_frames]
                file_units[name] = str(handle[name].attrs["units"])
        attrs = {key: _decoded(value) for key, value in handle.attrs.items()}
        sentinel = {}
        if "sentinel" in handle:
            n_checks = handle["sentinel/step"].shape[0]
            sentinel = {name: dataset[:n_checks] for name, dataset in handle["sentinel"].items()}
        return TrajectoryData(path=path, attrs=attrs, arrays=arrays, units=file_units,
                              sentinel=sentinel,
                              masses=handle["masses"][:])


def read_topology(path):
    """The MDTraj topology of a trajectory file, read with h5py (no PyTables needed)."""
    with _open_checked(Path(path)) as handle:
        raw = handle["topology"][0]
    return topology_from_dict(json.loads(raw.decode() if isinstance(raw, bytes) else raw))


def _open_checked(path: Path) -> h5py.File:
    """The file open for reading, once it proved to be a readable trajectory."""
    _check_readable(path)
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise TrajectoryError(f"{path} is a corrupt HDF5 file ({err})") from err
    with contextlib.ExitStack() as on_error:
        on_error.callback(handle.close)
        _check_format(path, handle)
        on_error.pop_all()
    return handle


def _decoded(value):
    if isinstance(value, str) and value[:1] in "{[":
        return json.loads(value)
    return value.item() if isinstance(value, np.generic) else value
