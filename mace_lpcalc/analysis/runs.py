"""One MD run as the analysis sees it: an MDTraj trajectory plus per-frame series in ASE units.

Files are read with :func:`mace_lpcalc.md.trajectory.read_trajectory` (which checks the
format and drops half-written frames) and :func:`~mace_lpcalc.md.trajectory.read_topology`
into the ``mdtraj.Trajectory`` that ``mdtraj.load`` would give, without PyTables (which
``mdtraj.load`` needs for HDF5, and which GPU machines may lack). Coordinates are
unwrapped; MDTraj keeps them in nm, everything this module hands out is in Å, eV, K, bar,
ps and seconds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import mdtraj
import numpy as np
from ase import Atoms

from mace_lpcalc.md.trajectory import TrajectoryError, read_topology, read_trajectory

NM_TO_A = 10.0

#: Per-frame series read into :attr:`Run.series`, with the unit each must be stored in.
SERIES_UNITS = {
    "potential_energy": "eV",
    "kinetic_energy": "eV",
    "total_energy": "eV",
    "conserved_energy": "eV",
    "temperature": "K",
    "wall_time_per_step": "s",
    "pressure": "bar",
    "volume": "Å^3",
    "density": "g/cm^3",
    "stress": "eV/Å^3",
}
#: Series every run has; the rest exist only for periodic systems.
REQUIRED_SERIES = ("potential_energy", "kinetic_energy", "total_energy", "conserved_energy",
                   "temperature", "wall_time_per_step", "step")

# Spellings accepted for each unit, after _normalise_unit.
_UNIT_SPELLINGS = {
    "eV": {"ev", "electronvolt", "electronvolts"},
    "K": {"k", "kelvin"},
    "s": {"s", "second", "seconds"},
    "bar": {"bar"},
    "Å^3": {"a^3"},
    "g/cm^3": {"g/cm^3", "g/cc"},
    "eV/Å^3": {"ev/a^3"},
}


@dataclass
class Run:
    """One MD run: trajectory, per-frame series (ASE units), masses and provenance.

    ``series[name]`` has one entry per frame (``stress`` has shape ``(n_frames, 6)``;
    ``step`` is the MD step of each frame).
    """

    path: Path
    trajectory: mdtraj.Trajectory
    series: dict[str, np.ndarray]
    masses_amu: np.ndarray
    policy: str
    protocol: str
    n_atoms: int
    seed: int | None = None
    backend: str = ""
    model_hash: str = ""
    settings: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    #: The live fp64 sentinel's checks (``step`` and deviations), empty if it made none.
    sentinel: dict = field(default_factory=dict)
    #: Where the sentinel switched the run to a safer policy (step, from, to), if it did.
    sentinel_fallback: dict | None = None

    @property
    def n_frames(self) -> int:
        return self.trajectory.n_frames

    @property
    def time_ps(self) -> np.ndarray:
        """Simulation time of each frame, ps, shape ``(n_frames,)``."""
        return np.asarray(self.trajectory.time, dtype=float)

    @property
    def positions_A(self) -> np.ndarray:
        """Unwrapped positions, Å, shape ``(n_frames, n_atoms, 3)``."""
        return self.trajectory.xyz.astype(float) * NM_TO_A

    @property
    def symbols(self) -> list[str]:
        return [atom.element.symbol for atom in self.trajectory.topology.atoms]

    @property
    def is_periodic(self) -> bool:
        return self.trajectory.unitcell_vectors is not None

    def to_atoms(self, frame: int) -> Atoms:
        """Frame ``frame`` as ASE ``Atoms`` (Å, the run's masses), wrapped into the cell."""
        if not -self.n_frames <= frame < self.n_frames:
            raise IndexError(f"frame {frame} out of range for {self.n_frames} frames")
        atoms = Atoms(self.symbols, positions=self.trajectory.xyz[frame].astype(float) * NM_TO_A,
                      masses=self.masses_amu)
        if self.is_periodic:
            atoms.cell = self.trajectory.unitcell_vectors[frame].astype(float) * NM_TO_A
            atoms.pbc = True
            atoms.wrap()
        return atoms


def load_run(path) -> Run:
    """Load one run file, checking its series and their units up front.

    Raises ``FileNotFoundError`` for a missing file and
    :class:`mace_lpcalc.md.trajectory.TrajectoryError` (a ``ValueError``) naming the problem
    for a file that is not HDF5, not a mace_lpcalc trajectory, lacks a series or
    attribute, or stores a series in unexpected units.
    """
    data = read_trajectory(path)
    path = data.path
    missing = [f"dataset '{name}'" for name in REQUIRED_SERIES if name not in data.arrays]
    missing += [f"root attribute '{name}'" for name in ("policy", "protocol")
                if name not in data.attrs]
    if missing:
        raise TrajectoryError(f"{path} lacks {', '.join(missing)}")
    series = {"step": np.asarray(data["step"], dtype=np.int64)}
    for name, unit in SERIES_UNITS.items():
        if name in data.arrays:
            if _normalise_unit(data.units[name]) not in _UNIT_SPELLINGS[unit]:
                raise TrajectoryError(f"{path}: series '{name}' is in '{data.units[name]}', "
                                      f"expected '{unit}'")
            series[name] = np.asarray(data[name], dtype=float)
    topology = read_topology(path)
    # read_trajectory already cut every dataset to the complete frames (the writer appends
    # coordinates before 'step', so a killed run may hold one coordinate frame more).
    try:
        trajectory = mdtraj.Trajectory(data["coordinates"], topology,
                                       time=data["time"],
                                       unitcell_lengths=data.arrays.get("cell_lengths"),
                                       unitcell_angles=data.arrays.get("cell_angles"))
    except (KeyError, ValueError) as err:  # a dataset missing, or shapes that do not fit
        raise TrajectoryError(
            f"{path}: MDTraj cannot build the trajectory ({type(err).__name__}: {err})") from err
    attrs = data.attrs
    seed = attrs.get("seed")
    return Run(
        path=path,
        trajectory=trajectory,
        series=series,
        masses_amu=np.asarray(data.masses, dtype=float),
        policy=str(attrs["policy"]),
        protocol=str(attrs["protocol"]),
        n_atoms=data.n_atoms,
        seed=None if seed is None else int(seed),
        backend=str(attrs.get("backend", "")),
        model_hash=str(attrs.get("model_hash", "")),
        settings=attrs.get("settings") if isinstance(attrs.get("settings"), dict) else {},
        sentinel=data.sentinel,
        sentinel_fallback=attrs.get("sentinel_fallback"),
        versions=attrs.get("versions") if isinstance(attrs.get("versions"), dict) else {},
    )


def cut_to_time(run: Run, end_ps: float) -> Run:
    """``run`` without the frames logged after ``end_ps`` (ps, simulation time)."""
    keep = int(np.searchsorted(run.time_ps, end_ps, side="right"))
    if keep == run.n_frames:
        return run
    if keep < 2:
        raise ValueError(f"{run.path.name}: fewer than two frames up to {end_ps:g} ps")
    return dataclasses.replace(run, trajectory=run.trajectory[:keep],
                               series={name: values[:keep] for name, values in run.series.items()})


def _normalise_unit(unit: str) -> str:
    unit = unit.strip().lower().replace(" ", "").replace("**", "^").replace("³", "^3")
    return unit.replace("angstrom", "a").replace("å", "a")
