"""SPC/Fw flexible water evaluated by OpenMM, as an ASE calculator.

SPC/Fw (Wu, Tepper & Voth, J. Chem. Phys. 124, 024503 (2006)): harmonic O–H bonds
(``r0`` = 1.012 Å, ``k_b`` = 1059.162 kcal/mol/Å²) and H–O–H angle (``θ0`` = 113.24°,
``k_θ`` = 75.90 kcal/mol/rad², both with the ½k convention that OpenMM uses), SPC
charges (O −0.82 e, H +0.41 e) and an O–O Lennard-Jones term (σ = 3.165492 Å,
ε = 0.1554253 kcal/mol). OpenMM ships no SPC/Fw, so the force field is written here as
an OpenMM XML document, with every unit conversion spelled out.

Long-range treatment (the published model's functional form, our cut-offs): Coulomb by
particle-mesh Ewald, Lennard-Jones switched smoothly to zero between
``cutoff_A - switch_width_A`` and ``cutoff_A`` plus OpenMM's analytic long-range
dispersion correction. The Ewald splitting parameter is chosen so that the real-space
Coulomb term is 1e-8 of its bare value at the cut-off (the energy is then continuous to
that level, which finite-difference stresses need); the PME grid is then sized by
OpenMM's own error estimate for ``reciprocal_tolerance`` at that splitting. Both depend
only on the cell, so the energy is a pure function of the configuration.

Stress: OpenMM reports no virial, so the stress is the central finite difference of the
energy under affine strain, ``σ_ij = (1/V) ∂E/∂ε_ij`` (ASE's sign convention, the one
mace uses). Strains are applied as upper-triangular deformations, which keep OpenMM's
reduced (lower-triangular) box form; the energy is rotation invariant, so this gives the
symmetric stress.

Everything runs on OpenMM's double-precision ``Reference`` platform, which is
deterministic.
"""

from __future__ import annotations

import io
import math

import numpy as np
import openmm
from ase.calculators.calculator import Calculator, CalculatorSetupError, all_changes
from openmm import app, unit

from mace_lpcalc.units import EV_PER_KJ_MOL

_KCAL_TO_KJ = 4.184
_A_TO_NM = 0.1

#: SPC/Fw parameters in the paper's units.
SPCFW_PARAMETERS = {
    "bond_length_A": 1.012,
    "bond_k_kcal_mol_A2": 1059.162,
    "angle_deg": 113.24,
    "angle_k_kcal_mol_rad2": 75.90,
    "charge_O_e": -0.82,
    "charge_H_e": 0.41,
    "sigma_OO_A": 3.165492,
    "epsilon_OO_kcal_mol": 0.1554253,
}


def spcfw_forcefield_xml() -> str:
    """The SPC/Fw force field as an OpenMM ForceField XML document (OpenMM units)."""
    p = SPCFW_PARAMETERS
    bond_length_nm = p["bond_length_A"] * _A_TO_NM
    bond_k = p["bond_k_kcal_mol_A2"] * _KCAL_TO_KJ / _A_TO_NM**2  # kJ/mol/nm²
    angle_rad = math.radians(p["angle_deg"])
    angle_k = p["angle_k_kcal_mol_rad2"] * _KCAL_TO_KJ  # kJ/mol/rad²
    sigma_nm = p["sigma_OO_A"] * _A_TO_NM
    epsilon = p["epsilon_OO_kcal_mol"] * _KCAL_TO_KJ  # kJ/mol
    return f"""<ForceField>
 <AtomTypes>
  <Type name="spcfw-O" class="OW" element="O" mass="15.99943"/>
  <Type name="spcfw-H" class="HW" element="H" mass="1.007947"/>
 </AtomTypes>
 <Residues>
  <Residue name="HOH">
   <Atom name="O" type="spcfw-O"/>
   <Atom name="H1" type="spcfw-H"/>
   <Atom name="H2" type="spcfw-H"/>
   <Bond atomName1="O" atomName2="H1"/>
   <Bond atomName1="O" atomName2="H2"/>
  </Residue>
 </Residues>
 <HarmonicBondForce>
  <Bond class1="OW" class2="HW" length="{bond_length_nm!r}" k="{bond_k!r}"/>
 </HarmonicBondForce>
 <HarmonicAngleForce>
  <Angle class1="HW" class2="OW" class3="HW" angle="{angle_rad!r}" k="{angle_k!r}"/>
 </HarmonicAngleForce>
 <NonbondedForce coulomb14scale="0.5" lj14scale="0.5">
  <Atom type="spcfw-O" charge="{p['charge_O_e']!r}" sigma="{sigma_nm!r}" epsilon="{epsilon!r}"/>
  <Atom type="spcfw-H" charge="{p['charge_H_e']!r}" sigma="1" epsilon="0"/>
 </NonbondedForce>
</ForceField>
"""


def spcfw_forcefield() -> app.ForceField:
    """An OpenMM ``ForceField`` holding SPC/Fw (residue name ``HOH``, atoms O, H1, H2)."""
    return app.ForceField(io.StringIO(spcfw_forcefield_xml()))


def water_topology(n_molecules: int) -> app.Topology:
    """An OpenMM topology of ``n_molecules`` waters, atoms ordered O, H, H per molecule."""
    topology = app.Topology()
    chain = topology.addChain()
    for _ in range(n_molecules):
        residue = topology.addResidue("HOH", chain)
        oxygen = topology.addAtom("O", app.element.oxygen, residue)
        for name in ("H1", "H2"):
            topology.addBond(oxygen, topology.addAtom(name, app.element.hydrogen, residue))
    return topology


def check_water_atoms(atoms) -> int:
    """Number of molecules; ``ValueError`` unless atoms are O,H,H repeated in a 3D-periodic cell."""
    symbols = atoms.get_chemical_symbols()
    if len(symbols) == 0 or len(symbols) % 3 or symbols != ["O", "H", "H"] * (len(symbols) // 3):
        raise ValueError("SPC/Fw needs atoms ordered O, H, H per water molecule, got "
                         f"{atoms.get_chemical_formula()} in order {''.join(symbols[:9])}...")
    if not atoms.pbc.all():
        raise ValueError(f"SPC/Fw with PME needs a cell periodic in 3D, got pbc={atoms.pbc}")
    return len(symbols) // 3


def _reduced_box_nm(cell_A: np.ndarray, cutoff_A: float) -> np.ndarray:
    """Check that a lower-triangular cell is in OpenMM's reduced form and large enough."""
    a, b, c = cell_A
    reduced = (a[0] > 0 and b[1] > 0 and c[2] > 0 and a[0] >= 2 * abs(b[0])
               and a[0] >= 2 * abs(c[0]) and b[1] >= 2 * abs(c[1]))
    if not reduced:
        raise ValueError(f"cell {cell_A.round(4).tolist()} is too far from orthorhombic for "
                         "OpenMM's reduced box form")
    widths = np.diag(cell_A)
    if widths.min() < 2 * cutoff_A:
        raise ValueError(f"cell widths {widths.round(3).tolist()} Å are less than twice the "
                         f"{cutoff_A} Å cut-off; use a larger box or a smaller cutoff_A")
    return cell_A * _A_TO_NM


class SPCFwCalculator(Calculator):
    """ASE calculator for periodic SPC/Fw water computed by OpenMM (Reference platform).

    Atoms must be ordered O, H, H per molecule in a 3D-periodic cell. Energies in eV,
    forces in eV/Å, stress in eV/Å³ (Voigt order xx, yy, zz, yz, xz, xy).

    Args:
        cutoff_A: real-space cut-off of Coulomb and Lennard-Jones, Å.
        switch_width_A: width of the Lennard-Jones switching region below the cut-off, Å.
        real_space_tolerance: Coulomb real-space term at the cut-off relative to bare Coulomb.
        reciprocal_tolerance: OpenMM's PME error target used to size the grid.
        strain_step: strain of the central finite differences for the stress.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]
    default_parameters = {
        "cutoff_A": 4.5,
        "switch_width_A": 0.5,
        "real_space_tolerance": 1e-8,
        "reciprocal_tolerance": 5e-4,
        "strain_step": 1e-5,
    }

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        cutoff, width = self.parameters["cutoff_A"], self.parameters["switch_width_A"]
        if not 0 < width < cutoff:
            raise CalculatorSetupError(f"need 0 < switch_width_A < cutoff_A, got {width}, {cutoff}")
        self._context = None
        self._context_key = None

    def create_system(self, n_molecules: int, cell_A: np.ndarray) -> openmm.System:
        """The OpenMM system for ``n_molecules`` waters in a reduced (lower-triangular) cell."""
        cutoff_A = self.parameters["cutoff_A"]
        box_nm = _reduced_box_nm(cell_A, cutoff_A)
        topology = water_topology(n_molecules)
        topology.setPeriodicBoxVectors([openmm.Vec3(*row) for row in box_nm] * unit.nanometer)
        system = spcfw_forcefield().createSystem(
            topology, nonbondedMethod=app.PME, nonbondedCutoff=cutoff_A * _A_TO_NM * unit.nanometer,
            rigidWater=False, constraints=None, removeCMMotion=False)
        cutoff_nm = cutoff_A * _A_TO_NM
        alpha = math.sqrt(-math.log(2 * self.parameters["real_space_tolerance"])) / cutoff_nm
        # OpenMM's own grid-size estimate (see its NonbondedForce docs) at this alpha.
        grid = [math.ceil(2 * alpha * width / (3 * self.parameters["reciprocal_tolerance"] ** 0.2))
                for width in np.diag(box_nm)]
        for force in system.getForces():
            if isinstance(force, openmm.NonbondedForce):
                force.setPMEParameters(alpha, *grid)
                force.setUseSwitchingFunction(True)
                switch_A = cutoff_A - self.parameters["switch_width_A"]
                force.setSwitchingDistance(switch_A * _A_TO_NM)
                force.setUseDispersionCorrection(True)
        return system

    def _get_context(self, n_molecules: int, cell_A: np.ndarray) -> openmm.Context:
        key = (n_molecules, cell_A.tobytes())
        if key != self._context_key:
            system = self.create_system(n_molecules, cell_A)
            self._context = openmm.Context(system, openmm.VerletIntegrator(0.0005),
                                           openmm.Platform.getPlatformByName("Reference"))
            self._context_key = key
        return self._context

    @staticmethod
    def _evaluate(context, box_nm, positions_nm, forces: bool):
        context.setPeriodicBoxVectors(*[openmm.Vec3(*row) for row in box_nm])
        context.setPositions(positions_nm)
        state = context.getState(getEnergy=True, getForces=forces)
        energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) * EV_PER_KJ_MOL
        if not forces:
            return energy, None
        force = state.getForces(asNumpy=True).value_in_unit(
            unit.kilojoule_per_mole / unit.nanometer)
        return energy, np.asarray(force) * EV_PER_KJ_MOL * _A_TO_NM

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        try:
            n_molecules = check_water_atoms(self.atoms)
        except ValueError as err:
            raise CalculatorSetupError(str(err)) from None
        # OpenMM wants a lower-triangular box: rotate into it, rotate results back.
        reduced_cell, rotation = self.atoms.cell.standard_form()
        cell_A = np.array(reduced_cell)
        positions_A = self.atoms.positions @ rotation.T
        try:
            context = self._get_context(n_molecules, cell_A)
        except ValueError as err:
            raise CalculatorSetupError(str(err)) from None
        box_nm = cell_A * _A_TO_NM
        energy, forces = self._evaluate(context, box_nm, positions_A * _A_TO_NM, forces=True)
        self.results["energy"] = self.results["free_energy"] = energy
        self.results["forces"] = forces @ rotation
        if "stress" in properties:
            stress = self._strain_derivative(context, box_nm, positions_A * _A_TO_NM)
            stress = rotation.T @ stress @ rotation / abs(np.linalg.det(cell_A))
            self.results["stress"] = stress.flat[[0, 4, 8, 5, 2, 1]]

    def _strain_derivative(self, context, box_nm, positions_nm) -> np.ndarray:
        """∂E/∂ε (eV) by central differences, upper-triangular strains only, symmetrised."""
        step = self.parameters["strain_step"]
        derivative = np.zeros((3, 3))
        for i, j in ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)):
            energies = []
            for sign in (1.0, -1.0):
                deformation = np.eye(3)
                deformation[i, j] += sign * step
                energies.append(self._evaluate(context, box_nm @ deformation.T,
                                               positions_nm @ deformation.T, forces=False)[0])
            derivative[i, j] = derivative[j, i] = (energies[0] - energies[1]) / (2 * step)
        return derivative
