"""The package's one unit table: what ASE's public ``ase.units`` does not name.

Everything else (eV, Å, fs, bar, GPa, kB, kJ/mol) is taken from ``ase.units`` where it is
used. ASE measures mass in amu; ``ase.units.kg`` is one kilogram in those units.
"""

from ase import units

#: Grams per atomic mass unit.
GRAM_PER_AMU = 1e3 / units.kg
#: Cubic centimetres per cubic ångström.
CM3_PER_A3 = 1e-24
#: Electronvolts per kJ/mol.
EV_PER_KJ_MOL = units.kJ / units.mol


def density_g_cm3(mass_amu: float, volume_A3: float) -> float:
    """Mass density (g/cm³) of ``mass_amu`` amu in ``volume_A3`` Å³."""
    return mass_amu * GRAM_PER_AMU / (volume_A3 * CM3_PER_A3)
