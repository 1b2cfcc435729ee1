"""``python -m mace_lpcalc``: does a precision policy change the physics? A short answer.

Runs Langevin NVT of the shipped water box (equilibrated with the reference engine, with
its momenta) and the shipped water model twice from the same start and seed — once with the FP64 reference policy, once with the policy under
test — then compares them: seed-averaged means with standard errors and their differences
(temperature, potential energy, ...), RDF and MSD overlays, and the static energy/force
deviations of the saved frames against FP64. Defaults finish in a few minutes on a CPU;
use ``--device cuda --steps 20000`` (or the NPT protocol) for a real study.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mace_lpcalc.analysis import compare
from mace_lpcalc.models import default_model_path
from mace_lpcalc.precision.policies import POLICIES
from mace_lpcalc.md.nvt import NVT, NVTSettings
from mace_lpcalc.fastpath.compiled import shorten_switch_interval_of_this_process

SYSTEMS = Path(__file__).resolve().parent.parent / "systems"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mace_lpcalc", description=__doc__.split("\n\n")[0])
    parser.add_argument("--structure", default=str(SYSTEMS / "water_192_spcfw.xyz"),
                        help="start structure; its stored momenta start the run when present")
    parser.add_argument("--model", default=None,
                        help="MACE .model file (default: the shipped water model)")
    parser.add_argument("--policy", default="fp32-linear-bf16", choices=list(POLICIES),
                        help="the policy to validate against fp64")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=Path("mace_lpcalc_validation"))
    args = parser.parse_args(argv)

    model = args.model or default_model_path()
    if model is None:
        parser.error("no --model given and the shipped water model is missing")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for policy in ("fp64", args.policy):
        out = args.out_dir / f"nvt_{policy}_seed{args.seed}.h5"
        print(f"== NVT, {args.steps} steps, policy {policy} -> {out}")
        NVT(NVTSettings(structure=args.structure, model=str(model), policy=policy,
                        device=args.device, steps=args.steps, seed=args.seed,
                        velocities_from_structure=_has_momenta(args.structure),
                        log_every=args.log_every, checkpoint_every=args.steps or 1,
                        out=str(out), overwrite=True)).run()
        runs.append(str(out))
    return compare.main([*runs, "--out-dir", str(args.out_dir / "comparison"),
                         "--static-deviations", "--model", str(model),
                         "--device", args.device, "--max-frames", "5"])


def _has_momenta(path: str) -> bool:
    import ase.io
    return ase.io.read(path).has("momenta")


if __name__ == "__main__":
    shorten_switch_interval_of_this_process()
    raise SystemExit(main())
