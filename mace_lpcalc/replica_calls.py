"""Batched replicas for :class:`mace_lpcalc.calculator.LowPrecisionMACECalculator`.

Several configurations of the same atoms (replicas: seeds of one system, each with its
own positions and cell) are evaluated in one model call on the fast path
(:meth:`MACEEngine.compute_replicas <mace_lpcalc.fastpath.engine.MACEEngine.compute_replicas>`),
one after another on mace's path. The MD side, which gathers the replicas' force
requests from their integrators, is :mod:`mace_lpcalc.md.replicas`.
"""

from __future__ import annotations

import numpy as np
from ase.calculators.calculator import (CalculationFailed, Calculator, CalculatorSetupError,
                                        all_changes)
from mace.calculators.mace import MACECalculator

from mace_lpcalc.fastpath.mace_layout import cell_as_mace_sees_it, results_like_mace


class ReplicaCalls:
    """The calculator's replica methods (a mixin of ``LowPrecisionMACECalculator``)."""

    def calculate_replicas(self, replicas, properties=("energy", "forces")) -> list[dict]:
        """ASE results of several configurations of the same atoms (replicas: seeds of one
        system, each with its own positions and cell), on the fast path in one batched
        model call (:meth:`MACEEngine.compute_replicas
        <mace_lpcalc.fastpath.engine.MACEEngine.compute_replicas>`), on mace's path one
        after another. ``self.results`` is left as it was.

        Raises ``CalculationFailed`` naming the first replica whose results are not finite
        or exploding, ``CalculatorSetupError`` for policy "auto" or a sentinel (both judge
        single structures).
        """
        results = self.replica_results(replicas, properties)
        for index, own in enumerate(results):
            try:
                self._check_results(own)
            except CalculationFailed as err:
                raise CalculationFailed(f"replica {index}: {err}") from None
        return results

    def replica_results(self, replicas, properties=("energy", "forces")) -> list[dict]:
        """:meth:`calculate_replicas` without the finite/exploding check."""
        if self._auto_budget is not None or self._delegate is not None or self.sentinel is not None:
            raise CalculatorSetupError("batched replicas need a fixed policy and no sentinel "
                                       "(policy 'auto' and the sentinel judge single structures)")
        replicas = list(replicas)
        if not replicas:
            raise ValueError("no replicas given")
        for atoms in replicas:
            if not np.array_equal(atoms.numbers, replicas[0].numbers) \
                    or not np.array_equal(atoms.pbc, replicas[0].pbc):
                raise ValueError("replicas must have the same atoms, in the same order, and "
                                 "the same periodicity")
            self.check_atoms(atoms)
        saved = self.atoms, self.results
        try:
            with self._policy_scope():
                if self.engines and self._verify_fast_path:  # the first-call check, on replica 0
                    Calculator.calculate(self, replicas[0].copy())
                    self._calculate_fast_or_step_aside(list(properties))
                if self.engines:
                    return self._replica_results_fast(replicas, properties)
                results = []
                for atoms in replicas:
                    MACECalculator.calculate(self, atoms.copy(), list(properties), all_changes)
                    results.append(self.results)
                return results
        finally:
            self.atoms, self.results = saved

    def _replica_results_fast(self, replicas, properties) -> list[dict]:
        first = replicas[0]
        positions = np.stack([atoms.positions for atoms in replicas])
        cells = np.stack([cell_as_mace_sees_it(atoms.cell.array, atoms.pbc, atoms.positions,
                                               self.r_max) for atoms in replicas])
        charges_array = self.arrays_keys.get("charges")
        charges = first.arrays.get(charges_array) if charges_array else None
        outs = [engine.compute_replicas(positions, first.numbers, cells, first.pbc,
                                        compute_stress="stress" in properties, charges=charges)
                for engine in self.engines]
        return [results_like_mace([member[index] for member in outs], self.energy_units_to_eV,
                                  self.length_units_to_A) for index in range(len(replicas))]
