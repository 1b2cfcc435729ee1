"""Generate the SPC/Fw liquid-water reference data set with OpenMM's own MD.

``python -m mace_lpcalc.training.reference.generate --out DIR --seed 0 [--molecules 32] [--frames N]``

One NVT trajectory per (temperature, density) state point: waters from OpenMM's
pre-equilibrated solvent box (``Modeller.addSolvent``), molecule centres scaled to the
target density, energy minimised, then Langevin dynamics (``LangevinMiddleIntegrator``,
0.5 fs, 1/ps friction) on the deterministic Reference platform with seeds drawn from
``--seed``. Frames are taken every ``--stride-fs`` after ``--equilibration-ps``. The
sampling MD uses OpenMM's default PME accuracy (Ewald tolerance 5e-4); the labels are
computed afterwards at the calculator's tighter settings.

Each trajectory's frames are cut into 10 contiguous blocks; a seeded permutation sends
8 blocks to train, 1 to valid and 1 to test, so every state point is in every split. The
first frame of every block is dropped, so no test or validation frame is a sampling
stride away from a training frame.

Every frame is labelled by :class:`SPCFwCalculator` at its positions rounded to the 8
decimals extended XYZ stores (so the file is exactly self-consistent): ``REF_energy``
(eV), ``REF_forces`` (eV/Å), ``REF_stress`` (eV/Å³, Voigt). Files are gzip-compressed
extended XYZ (ASE and mace read them directly) with a zero timestamp, so the same seed
and OpenMM build give byte-identical files. ``manifest.json`` records the settings,
versions, counts and SHA-256 of each file.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import platform
import sys
import time
from pathlib import Path

import ase.io
import numpy as np
import openmm
from ase import Atoms
from openmm import app, unit

from mace_lpcalc.systems import water_density_g_cm3
from mace_lpcalc.training.reference.spcfw import SPCFW_PARAMETERS, SPCFwCalculator, spcfw_forcefield

SPLITS = ("train", "valid", "test")
BLOCKS_PER_TRAJECTORY = 10
_BLOCKS_PER_SPLIT = {"train": 8, "valid": 1, "test": 1}
#: PME accuracy of the sampling MD (OpenMM's default); labels use the calculator's own.
SAMPLING_EWALD_TOLERANCE = 5e-4
_WATER_MASS_G_MOL = 18.01528
_AVOGADRO = 6.02214076e23


def initial_water(n_molecules: int, density_g_cm3: float) -> Atoms:
    """``n_molecules`` waters from OpenMM's equilibrated solvent box, rescaled to a density.

    Molecule centres of mass are scaled affinely (internal geometry kept) into a cubic box
    of the requested density; the result is deterministic.
    """
    if n_molecules < 1:
        raise ValueError(f"n_molecules must be positive, got {n_molecules}")
    if not 0.5 <= density_g_cm3 <= 1.5:
        raise ValueError(f"density_g_cm3={density_g_cm3} is not a liquid-water density")
    modeller = app.Modeller(app.Topology(), [] * unit.nanometer)
    modeller.addSolvent(spcfw_forcefield(), model="spce", numAdded=n_molecules, neutralize=False)
    positions = np.asarray(modeller.positions.value_in_unit(unit.angstrom))
    box = modeller.topology.getPeriodicBoxVectors()[0][0].value_in_unit(unit.angstrom)
    atoms = Atoms("OH2" * n_molecules, positions=positions, cell=[box] * 3, pbc=True)
    target_box = (n_molecules * _WATER_MASS_G_MOL / _AVOGADRO / density_g_cm3 * 1e24) ** (1 / 3)
    masses = atoms.get_masses().reshape(-1, 3)
    molecules = positions.reshape(-1, 3, 3)
    centres = (molecules * masses[..., None]).sum(1) / masses.sum(1)[:, None]
    shifted = molecules + (centres * (target_box / box - 1))[:, None, :]
    atoms.set_cell([target_box] * 3)
    atoms.positions = shifted.reshape(-1, 3)
    return atoms


def run_trajectory(calc: SPCFwCalculator, n_molecules: int, temperature_K: float,
                   density_g_cm3: float, seed: int, n_frames: int, *, timestep_fs: float,
                   stride_fs: float, equilibration_ps: float, friction_per_ps: float = 1.0):
    """Langevin NVT with OpenMM; yields ``(time_ps, positions_A, cell_A)`` per frame."""
    if seed < 1:
        raise ValueError("OpenMM treats seed 0 as 'pick a random seed'; use seed >= 1")
    atoms = initial_water(n_molecules, density_g_cm3)
    system = calc.create_system(n_molecules, np.array(atoms.cell))
    for force in system.getForces():
        if isinstance(force, openmm.NonbondedForce):
            # Sampling needs no label-grade PME: OpenMM's default accuracy, 2-3x faster.
            force.setPMEParameters(0.0, 0, 0, 0)
            force.setEwaldErrorTolerance(SAMPLING_EWALD_TOLERANCE)
    integrator = openmm.LangevinMiddleIntegrator(temperature_K * unit.kelvin,
                                                 friction_per_ps / unit.picosecond,
                                                 timestep_fs * unit.femtosecond)
    integrator.setRandomNumberSeed(seed)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(atoms.positions * unit.angstrom)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 2000)
    context.setVelocitiesToTemperature(temperature_K * unit.kelvin, seed)
    integrator.step(round(equilibration_ps * 1000 / timestep_fs))
    stride = round(stride_fs / timestep_fs)
    for _ in range(n_frames):
        integrator.step(stride)
        state = context.getState(getPositions=True, enforcePeriodicBox=True)
        yield (state.getTime().value_in_unit(unit.picosecond),
               np.asarray(state.getPositions(asNumpy=True).value_in_unit(unit.angstrom)),
               np.asarray(state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.angstrom)))


def assign_blocks(rng: np.random.Generator) -> list[str]:
    """Split label for each of a trajectory's blocks: a seeded 8/1/1 permutation."""
    labels = [split for split in SPLITS for _ in range(_BLOCKS_PER_SPLIT[split])]
    return [labels[i] for i in rng.permutation(BLOCKS_PER_TRAJECTORY)]


def generate(out_dir, *, seed: int = 0, n_molecules: int = 32, n_frames: int = 1350,
             temperatures_K=(300.0, 350.0, 400.0), densities_g_cm3=(0.95, 1.0, 1.05),
             timestep_fs: float = 0.5, stride_fs: float = 200.0, equilibration_ps: float = 5.0,
             cutoff_A: float = 4.5, log=print) -> dict:
    """Sample, label, split and write the data set; return the manifest (also written)."""
    states = [(float(t), float(d)) for t in temperatures_K for d in densities_g_cm3]
    per_block_unit = len(states) * BLOCKS_PER_TRAJECTORY
    if n_frames < per_block_unit or n_frames % per_block_unit:
        raise ValueError(f"--frames must be a positive multiple of {per_block_unit} "
                         f"({len(states)} state points x {BLOCKS_PER_TRAJECTORY} blocks), "
                         f"got {n_frames}")
    frames_per_block = n_frames // per_block_unit
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    md_seeds = rng.integers(1, 2**31 - 1, size=len(states))
    calc = SPCFwCalculator(cutoff_A=cutoff_A)
    frames = {split: [] for split in SPLITS}
    started = time.perf_counter()
    for index, ((temperature, density), md_seed) in enumerate(zip(states, md_seeds)):
        block_splits = assign_blocks(rng)
        samples = run_trajectory(
            calc, n_molecules, temperature, density, int(md_seed),
            BLOCKS_PER_TRAJECTORY * (frames_per_block + 1), timestep_fs=timestep_fs,
            stride_fs=stride_fs, equilibration_ps=equilibration_ps)
        for frame_index, (time_ps, positions, cell) in enumerate(samples):
            block, position_in_block = divmod(frame_index, frames_per_block + 1)
            if position_in_block == 0:  # guard frame between blocks
                continue
            frame = Atoms("OH2" * n_molecules, positions=np.round(positions, 8), cell=cell,
                          pbc=True)
            frame.calc = calc
            energy, forces, stress = (frame.get_potential_energy(), frame.get_forces(),
                                      frame.get_stress())
            frame.calc = None
            frame.info.update(REF_energy=energy, REF_stress=stress,
                              config_type=f"T{temperature:g}K_rho{density:g}",
                              temperature_K=temperature,
                              density_g_cm3=round(water_density_g_cm3(frame), 6),
                              trajectory=index, block=block, time_ps=round(time_ps, 6))
            frame.arrays["REF_forces"] = forces
            frames[block_splits[block]].append(frame)
        log(f"state {index + 1}/{len(states)}: T={temperature:g} K, rho={density:g} g/cm3 "
            f"done ({time.perf_counter() - started:.0f} s)")
    manifest = {
        "reference": "SPC/Fw flexible water (Wu, Tepper, Voth, J. Chem. Phys. 124, 024503 (2006))",
        "engine": f"OpenMM {openmm.__version__}, Reference platform",
        "spcfw_parameters": SPCFW_PARAMETERS,
        "electrostatics": "PME",
        "lj": "switched to zero below the cut-off (switch_width_A) + dispersion correction",
        "calculator_parameters": dict(calc.parameters),
        "seed": seed, "molecules": n_molecules, "frames": n_frames,
        "temperatures_K": list(temperatures_K), "densities_g_cm3": list(densities_g_cm3),
        "timestep_fs": timestep_fs, "stride_fs": stride_fs, "equilibration_ps": equilibration_ps,
        "thermostat": "LangevinMiddleIntegrator, friction 1/ps",
        "sampling_ewald_tolerance": SAMPLING_EWALD_TOLERANCE,
        "blocks_per_trajectory": BLOCKS_PER_TRAJECTORY, "blocks_per_split": _BLOCKS_PER_SPLIT,
        "units": {"REF_energy": "eV", "REF_forces": "eV/A",
                  "REF_stress": "eV/A^3, Voigt xx yy zz yz xz xy (ASE sign)"},
        "python": platform.python_version(),
        "files": {},
    }
    for split in SPLITS:
        path = out_dir / f"{split}.xyz.gz"
        data = write_extxyz_gz(path, frames[split])
        manifest["files"][path.name] = {"frames": len(frames[split]),
                                        "sha256": hashlib.sha256(data).hexdigest()}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def write_extxyz_gz(path: Path, frames: list[Atoms]) -> bytes:
    """Write frames as gzip-compressed extended XYZ with a fixed header; return the bytes."""
    text = io.StringIO()
    ase.io.write(text, frames, format="extxyz")
    raw = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as compressed:
        compressed.write(text.getvalue().encode())
    data = raw.getvalue()
    path.write_bytes(data)
    return data


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--molecules", type=int, default=32)
    parser.add_argument("--frames", type=int, default=1350,
                        help="total labelled frames (multiple of state points x 10)")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[300.0, 350.0, 400.0],
                        metavar="K")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.95, 1.0, 1.05],
                        metavar="G_CM3")
    parser.add_argument("--stride-fs", type=float, default=200.0)
    parser.add_argument("--equilibration-ps", type=float, default=5.0)
    parser.add_argument("--cutoff", type=float, default=4.5, help="nonbonded cut-off, Å")
    args = parser.parse_args(argv)
    try:
        manifest = generate(args.out, seed=args.seed, n_molecules=args.molecules,
                            n_frames=args.frames, temperatures_K=args.temperatures,
                            densities_g_cm3=args.densities, stride_fs=args.stride_fs,
                            equilibration_ps=args.equilibration_ps, cutoff_A=args.cutoff)
    except ValueError as err:
        sys.exit(f"error: {err}")
    print(json.dumps(manifest["files"], indent=2))


if __name__ == "__main__":
    main()
