"""The Python a batched replica step costs, the model call left out.

    python -m mace_lpcalc.perf.replica_python --replicas 1 16 --protocols nvt npt npt-ase \\
        --out bench/results/cpu_replica_python_648.json

Batched replicas (:func:`mace_lpcalc.md.replicas.run_replicas`) share one model call per
step, but each still runs its own ASE integrator, writer and checks in Python. On a GPU
that Python, not the model, bounds the throughput once a batch is large (16 replicas of
648 atoms: 20.5 ms a step batched against 12.6 ms for the same atoms as one box,
``h200_replicas_exact_check_648.json``). Here every replica asks a stand-in calculator
that answers at once (zero energy, forces and stress: a timing stand-in, not physics), so
what is timed is that Python alone. Each configuration runs twice, ``--steps`` and
``--steps`` + ``--extra-steps``, and the difference gives the cost per step without the
runs' set-up (files, topology). Runs use the protocols' own settings files. ``npt-ase``
is NPT stepped by ASE's own ``IsotropicMTKNPT`` instead of the protocol's lean version of it.

With ``--model`` the replicas share a real calculator instead (``--device``, ``--policy``;
uncompiled, so that no background compilation runs during the timing): then the whole
batched step is timed, model call included, e.g. on a GPU

    python -m mace_lpcalc.perf.replica_python --replicas 16 --protocols npt npt-ase \\
        --model systems/water_mace.model --device cuda --policy fp32 --out FILE
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from ase.md.nose_hoover_chain import IsotropicMTKNPT

from mace_lpcalc.md.nvt import NVT, NVTSettings
from mace_lpcalc.md.npt import NPT, NPTSettings
from mace_lpcalc.md.replicas import run_replicas
from mace_lpcalc.toml_files import read_toml


class NPTWithASEIntegrator(NPT):
    """NPT stepped by ASE's own ``IsotropicMTKNPT``: what the lean integrator saves."""

    integrator = IsotropicMTKNPT


PROTOCOLS = {"nvt": (NVT, NVTSettings, "protocols/nvt_langevin.toml"),
             "npt": (NPT, NPTSettings, "protocols/npt_water.toml"),
             "npt-ase": (NPTWithASEIntegrator, NPTSettings, "protocols/npt_water.toml")}


class InstantAnswers:
    """Answers every replica at once with zeros: the batched call without a model."""

    def __init__(self):
        self.parameters = {"model_hash": "none", "policy": "fp32", "backend": "none"}
        self.policy, self.max_force_eV_A = SimpleNamespace(name="fp32"), 1000.0

    def check_atoms(self, atoms) -> None:
        """Every structure is acceptable to a stand-in."""

    def replica_results(self, atoms_list, properties) -> list[dict]:
        return [{"energy": 0.0, "free_energy": 0.0, "forces": np.zeros((len(atoms), 3)),
                 "stress": np.zeros(6), "energies": np.zeros(len(atoms)),
                 "node_energy": np.zeros(len(atoms))} for atoms in atoms_list]


def seconds_for(protocol: str, n_replicas: int, steps: int, structure: str,
                model: dict | None = None) -> float:
    """Wall seconds of one batched run of ``steps`` steps (set-up included); ``model``:
    the settings of a real calculator (``model``, ``device``, ``policy``), else the
    stand-in answers."""
    protocol_class, settings_class, settings_file = PROTOCOLS[protocol]
    settings = {**read_toml(settings_file, "settings"), "structure": structure, "steps": steps,
                "log_every": 100, "checkpoint_every": 10**9, "sentinel_every": 0,
                "device": "cpu", **({"compile_model": "off", **model} if model else {})}
    with tempfile.TemporaryDirectory() as folder:
        replicas = [settings_class(**{**settings, "seed": seed,
                                      "out": str(Path(folder) / f"r{seed}.h5")})
                    for seed in range(n_replicas)]
        started = time.perf_counter()
        run_replicas(protocol_class, replicas, calculator=None if model else InstantAnswers())
        return time.perf_counter() - started


def main(argv=None) -> None:
    from mace_lpcalc.installed import measurement_provenance
    from mace_lpcalc.perf.bench import write_json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--structure", default="systems/water_648_spcfw.xyz")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--protocols", nargs="+", choices=sorted(PROTOCOLS),
                        default=["nvt", "npt", "npt-ase"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--extra-steps", type=int, default=200)
    parser.add_argument("--model", help="a real calculator on this model instead of the "
                                        "stand-in: the model call is timed too")
    parser.add_argument("--device", default="cpu", help="with --model")
    parser.add_argument("--policy", default="fp32", help="with --model")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    model = (dict(model=args.model, device=args.device, policy=args.policy)
             if args.model else None)
    rows = []
    for protocol in args.protocols:
        for n_replicas in args.replicas:
            short, long = (seconds_for(protocol, n_replicas, steps, args.structure, model)
                           for steps in (args.steps, args.steps + args.extra_steps))
            ms_per_step = (long - short) * 1e3 / args.extra_steps
            rows.append({"protocol": protocol, "replicas": n_replicas,
                         "ms_per_step": ms_per_step,
                         "ms_per_replica_step": ms_per_step / n_replicas,
                         "replica_steps_per_s": n_replicas * 1e3 / ms_per_step,
                         "setup_s": short - args.steps * ms_per_step / 1e3})
            print(rows[-1], flush=True)
    result = {"benchmark": ("batched replica step, model call included" if model else
                            "Python per batched replica step, model call left out"),
              "structure": args.structure, "steps": [args.steps, args.extra_steps],
              "calculator": model or "stand-in answering zeros at once",
              **measurement_provenance(model["device"] if model else "cpu"), "rows": rows}
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
