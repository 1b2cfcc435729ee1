"""Collect the metrics.json of runs made by bench/training_table.sh into one table.

    python bench/training_table.py RUN/*/metrics.json --out table.json

Prints the Markdown table (RMSE of energy and forces per split, intra/inter-molecular
force errors on the test split, and the NVT stability check) and writes it as JSON.
"""

import argparse
import json
from pathlib import Path

import numpy as np

from mace_lpcalc.trajectory import read_trajectory


def stability(run_dir: Path) -> dict:
    """Temperature statistics of the short NVT run beside a trained model, if it ran."""
    path = run_dir / "nvt.h5"
    if not path.is_file():
        return {"nvt": "did not run"}
    data = read_trajectory(path)
    temperature = np.asarray(data["temperature"])
    return {"nvt_steps": int(data["step"][-1]), "nvt_T_mean_K": float(temperature.mean()),
            "nvt_T_max_K": float(temperature.max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", nargs="+", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    for path in args.metrics:
        metrics = json.loads(path.read_text())
        row = {"policy": metrics["policy"]["name"], "device": metrics["device"],
               "epochs": metrics["epochs_run"], "skipped_steps": metrics["skipped_steps"],
               "training_seconds": metrics["training_seconds"]}
        for split, values in metrics["rmse"].items():
            for key in ("energy_rmse_meV_per_atom", "forces_rmse_meV_A", "forces_rel_rmse_percent",
                        "forces_intra_rmse_meV_A", "forces_inter_rmse_meV_A",
                        "forces_inter_rel_rmse_percent"):
                row[f"{split}_{key}"] = values[key]
        row.update(stability(path.parent))
        rows.append(row)
    print("| policy | split | E RMSE (meV/atom) | F RMSE (meV/Å) | rel. F (%) | "
          "F intra / inter (meV/Å) | NVT 2 ps: T mean / max (K) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        for split in ("train", "valid", "test"):
            if f"{split}_energy_rmse_meV_per_atom" not in row:
                continue
            nvt = (f"{row['nvt_T_mean_K']:.0f} / {row['nvt_T_max_K']:.0f}"
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
