"""Seconds a fresh process spends on a model's symmetric-contraction descriptors: with an
empty descriptor cache, then with what the first process left in it.

    python -m mace_lpcalc.perf.descriptor_cache --model off24m --out FILE

Each process imports the package and asks both descriptor functions
(:data:`mace_lpcalc.compat.SYMMETRIC_CONTRACTION_DESCRIPTORS`) for every symmetric
contraction of the model, with the arguments a cuEquivariance model's constructor and
mace's converter give them (:mod:`mace_lpcalc.fastpath.disk_caches`). The descriptors are
pure Python: any machine measures them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(model_spec: str) -> dict:
    """In this process: the seconds both descriptor functions take for ``model_spec``."""
    import cuequivariance as cue
    from mace.tools.cg import O3_e3nn

    from mace_lpcalc.compat import SYMMETRIC_CONTRACTION_DESCRIPTORS
    from mace_lpcalc.fastpath.disk_caches import use_descriptor_cache
    from mace_lpcalc.perf.bench import make_model

    directory = use_descriptor_cache()
    contractions = [product.symmetric_contractions for product in make_model(model_spec).products]
    start = time.perf_counter()
    for contraction in contractions:
        degrees = tuple(range(1, contraction.contractions[0].correlation + 1))
        for module_name, name in SYMMETRIC_CONTRACTION_DESCRIPTORS:
            getattr(importlib.import_module(module_name), name)(
                cue.Irreps(O3_e3nn, str(contraction.irreps_in)),
                cue.Irreps(O3_e3nn, str(contraction.irreps_out)), degrees)
    return {"seconds": time.perf_counter() - start, "contractions": len(contractions),
            "files": len(list(directory.glob("*.pkl")))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="off24m", help="as perf.bench's --model")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.model)))
        return
    from mace_lpcalc.installed import measurement_provenance
    from mace_lpcalc.perf.bench import write_json

    result = {"benchmark": "symmetric-contraction descriptors of one model, fresh processes",
              "model": args.model, **measurement_provenance("cpu"), "runs": {}}
    with tempfile.TemporaryDirectory(prefix="mace_lpcalc_descriptors_") as cache:
        environment = dict(os.environ, MACE_LPCALC_CACHE_DIR=cache)
        for run in ("empty cache", "cache of the first process"):
            output = subprocess.run(
                [sys.executable, "-m", "mace_lpcalc.perf.descriptor_cache", "--child",
                 "--model", args.model], env=environment, check=True, capture_output=True,
                text=True).stdout
            result["runs"][run] = json.loads(output.strip().splitlines()[-1])
            print(run, result["runs"][run], flush=True)
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
