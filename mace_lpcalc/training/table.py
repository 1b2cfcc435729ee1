"""The training table (the thesis's Table 4.6): the metrics.json of runs made by
bench/training_table.sh, collected into one table.

    python -m mace_lpcalc.training.table RUN/*/metrics.json --out table.json

Prints the Markdown table (RMSE of energy and forces per split, intra/inter-molecular
force errors, and the NVT stability check) and writes it as JSON.

Runs stopped before writing metrics.json (only ``best.model`` and the log exist) can be
evaluated afterwards, on the CPU, in the policy of their folder name:

    python -m mace_lpcalc.training.table --evaluate RUN/* --data systems/water_reference
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from mace_lpcalc import compat  # noqa: F401  -- mace before e3nn; version check
from mace.tools.utils import AtomicNumberTable

from mace_lpcalc.md.trajectory import read_trajectory
from mace_lpcalc.models import load_model
from mace_lpcalc.precision.policies import apply_policy
from mace_lpcalc.precision.training import get_training_policy
from mace_lpcalc.training.data import make_split, read_frames
from mace_lpcalc.training.metrics import error_metrics
from mace_lpcalc.training.train import predict


def evaluate(run_dir: Path, data: Path) -> Path:
    """Write ``run_dir/metrics.json`` for its ``best.model`` on the valid and test splits."""
    policy = get_training_policy(run_dir.name)
    model = load_model(run_dir / "best.model")
    model = apply_policy(model, policy.forward)
    z_table = AtomicNumberTable([int(z) for z in model.atomic_numbers])
    log = (run_dir.parent / f"{run_dir.name}.log")
    epochs = [line for line in log.read_text().splitlines() if line.startswith("epoch ")] \
        if log.is_file() else []
    saved = torch.get_default_dtype()
    torch.set_default_dtype(policy.forward.model_dtype)
    try:
        rmse = {}
        for split in ("valid", "test"):
            graphs = make_split(split, read_frames(data / f"{split}.xyz.gz"), z_table,
                                float(model.r_max))
            rmse[split] = error_metrics(graphs, predict(model, policy, graphs.graphs, 8))
    finally:
        torch.set_default_dtype(saved)
    metrics = {"policy": policy.as_dict(), "device": "cpu (evaluation only)",
               "epochs_run": len(epochs), "last_epoch_log": epochs[-1] if epochs else None,
               "skipped_steps": None, "training_seconds": None, "rmse": rmse}
    path = run_dir / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    return path


def stability(run_dir: Path) -> dict:
    """Temperature statistics of the short NVT run beside a trained model, if it ran."""
    path = run_dir / "nvt.h5"
    if not path.is_file():
        return {"nvt": "did not run"}
    data = read_trajectory(path)
    temperature = np.asarray(data["temperature"])
    return {"nvt_steps": int(data["step"][-1]), "nvt_T_mean_K": float(temperature.mean()),
            "nvt_T_max_K": float(temperature.max())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mace_lpcalc.training.table",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", nargs="*", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--evaluate", nargs="+", type=Path, default=[],
                        help="run folders holding best.model to evaluate first")
    parser.add_argument("--data", type=Path, default=Path("systems/water_reference"))
    args = parser.parse_args(argv)
    args.metrics += [evaluate(run_dir, args.data) for run_dir in args.evaluate]
    rows = []
    for path in args.metrics:
        metrics = json.loads(path.read_text())
        row = {"policy": metrics["policy"]["name"], "device": metrics["device"],
               "epochs": metrics["epochs_run"], "skipped_steps": metrics["skipped_steps"],
               "last_epoch_log": metrics.get("last_epoch_log"),
               "training_seconds": metrics["training_seconds"]}
        for split, values in metrics["rmse"].items():
            for key in ("energy_rmse_meV_per_atom", "forces_rmse_meV_A", "forces_rel_rmse_percent",
                        "forces_intra_rmse_meV_A", "forces_inter_rmse_meV_A",
                        "forces_inter_rel_rmse_percent"):
                row[f"{split}_{key}"] = values[key]
        row.update(stability(path.parent))
        rows.append(row)
    print("| policy | split | E RMSE (meV/atom) | F RMSE (meV/Å) | rel. F (%) | "
          "F intra / inter (meV/Å) | NVT check: steps, T mean / max (K) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        for split in ("train", "valid", "test"):
            if f"{split}_energy_rmse_meV_per_atom" not in row:
                continue
            nvt = (f"{row['nvt_steps']}, {row['nvt_T_mean_K']:.0f} / {row['nvt_T_max_K']:.0f}"
                   if split == "valid" and "nvt_T_mean_K" in row else "")
            print(f"| {row['policy']} | {split} | {row[f'{split}_energy_rmse_meV_per_atom']:.2f} | "
                  f"{row[f'{split}_forces_rmse_meV_A']:.1f} | "
                  f"{row[f'{split}_forces_rel_rmse_percent']:.2f} | "
                  f"{row[f'{split}_forces_intra_rmse_meV_A']:.1f} / "
                  f"{row[f'{split}_forces_inter_rmse_meV_A']:.1f} | {nvt} |")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
