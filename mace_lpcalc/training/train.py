"""Train a MACE model on extended-XYZ data under a precision policy.

``python -m mace_lpcalc.training.train --train T.xyz --valid V.xyz --test Z.xyz --policy fp32 --out DIR``

Everything model-related is mace's own: ``ScaleShiftMACE`` (through
:func:`mace_lpcalc.models.build_model`), ``config_from_atoms``/``AtomicData`` and its
DataLoader, least-squares E0s (``compute_average_E0s``), ``compute_avg_num_neighbors``,
scale and shift from the training set (``compute_mean_rms_energy_forces``: mean
interaction energy per atom and RMS force, mace's default), and the
``WeightedEnergyForcesStressLoss``. Optimizer: Adam with AMSGrad (mace's default),
learning rate decayed exponentially from ``--lr`` to ``--lr-final`` over the epochs, an
exponential moving average of the weights (``--ema-decay``) used for validation and saving,
gradient-norm clipping.

Precision: ``--policy`` names a :mod:`mace_lpcalc.precision.training` policy. The best
model by validation loss is saved as a plain MACE model (policy wrappers stripped, in the
policy's master dtype: float64 for ``fp64``, float32 otherwise) that mace's
``MACECalculator`` and :func:`mace_lpcalc.models.load_model` load.

Output (``--out``): ``best.model`` and ``metrics.json`` with per-split RMSEs of energy
(meV/atom), forces (meV/Å and % of the RMS reference force), stress (meV/Å³) and the
intra-/inter-molecular force decomposition (:mod:`mace_lpcalc.training.metrics`), plus
the training history. The data are read by :mod:`mace_lpcalc.training.data`. Training runs
with ``torch.use_deterministic_algorithms``, so a CPU run is bit-for-bit reproducible for
a given seed, data and package versions (unless ``--max-minutes`` stops it early); on CUDA
ops without a deterministic kernel only warn.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from mace_lpcalc import compat  # noqa: F401  -- mace before e3nn; version check
import numpy as np
import torch
from mace import data as mace_data
from mace.modules.loss import WeightedEnergyForcesStressLoss
from mace.modules.utils import compute_avg_num_neighbors, compute_mean_rms_energy_forces
from mace.tools import AtomicNumberTable
from mace.tools.torch_geometric.dataloader import DataLoader
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from mace_lpcalc.models import build_model, load_model
from mace_lpcalc.training.data import KEYS, Split, make_split, read_frames
from mace_lpcalc.training.metrics import error_metrics
from mace_lpcalc.precision.policies import apply_policy, copy_without_policy, policy_context
from mace_lpcalc.precision.training import TRAINING_POLICIES, TrainingPolicy, get_training_policy

#: The shipped water model's architecture: invariant messages, small enough to train on a
#: 2-core CPU in about 40 minutes (any :func:`mace_lpcalc.models.build_model` keyword works).
DEFAULT_MODEL_SETTINGS = {"hidden_irreps": "32x0e", "r_max": 5.0, "max_ell": 2, "correlation": 2,
                          "num_interactions": 2, "num_bessel": 8, "radial_mlp": (32, 32, 32),
                          "mlp_irreps": "16x0e"}


def prepare_model(policy: TrainingPolicy, train: Split, z_table: AtomicNumberTable,
                  model_settings: dict, seed: int, batch_size: int) -> tuple[torch.nn.Module, dict]:
    """Build a ScaleShiftMACE with E0s, neighbour count, scale and shift from ``train``."""
    configs = [mace_data.config_from_atoms(a, key_specification=KEYS) for a in train.atoms]
    e0s = mace_data.compute_average_E0s(configs, z_table)
    atomic_energies = np.array([e0s[z] for z in z_table.zs])
    loader = DataLoader(train.graphs, batch_size=batch_size, shuffle=False)
    avg_num_neighbors = float(compute_avg_num_neighbors(loader))
    mean, rms = compute_mean_rms_energy_forces(loader, atomic_energies)
    statistics = {"e0s_eV": {int(z): float(e) for z, e in e0s.items()},
                  "avg_num_neighbors": avg_num_neighbors,
                  "shift_eV": float(np.ravel(mean)[0]), "scale_eV_A": float(np.ravel(rms)[0])}
    model = build_model(z_table.zs, atomic_energies=atomic_energies,
                        avg_num_neighbors=avg_num_neighbors, scale=statistics["scale_eV_A"],
                        shift=statistics["shift_eV"], seed=seed, dtype=policy.master_dtype,
                        **model_settings)
    return model, statistics


def _forward(model, policy: TrainingPolicy, batch, training: bool) -> dict:
    with policy_context(policy.forward):
        return model(batch.to_dict(), training=training, compute_force=True, compute_stress=True)


def predict(model: torch.nn.Module, policy: TrainingPolicy, graphs, batch_size: int,
            device="cpu") -> list[dict]:
    """Energy (eV), forces (eV/Å, ``(n, 3)``) and stress (eV/Å³, ``(3, 3)``) per graph.

    ``model`` must already carry the policy (see :func:`mace_lpcalc.precision.policies.apply_policy`);
    results are float64 numpy arrays.
    """
    model.eval()
    results = []
    for batch in DataLoader(graphs, batch_size=batch_size, shuffle=False):
        batch = batch.to(device)
        output = _forward(model, policy, batch, training=False)
        ptr = batch.ptr.cpu().numpy()
        energy, forces, stress = (output[key].detach().double().cpu().numpy()
                                  for key in ("energy", "forces", "stress"))
        for i in range(batch.num_graphs):
            results.append({"energy": energy[i], "forces": forces[ptr[i]:ptr[i + 1]],
                            "stress": stress[i].reshape(3, 3)})
    return results


class Trainer:
    """One model, its optimizer, EMA and (for fp16) gradient scaler, under a training policy."""

    def __init__(self, model: torch.nn.Module, policy: TrainingPolicy, *, lr: float,
                 energy_weight: float, forces_weight: float, stress_weight: float,
                 ema_decay: float = 0.0, clip_grad: float | None = 10.0, device="cpu"):
        self.policy = policy
        self.device = torch.device(device)
        self.model = apply_policy(model.to(self.device), policy.forward)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr, amsgrad=True)
        self.loss_fn = WeightedEnergyForcesStressLoss(
            energy_weight, forces_weight, stress_weight).to(self.device, policy.master_dtype)
        self.scaler = torch.amp.GradScaler(self.device.type) if policy.loss_scaling else None
        self.ema = (AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay),
                                  use_buffers=True) if ema_decay > 0 else None)
        self.clip_grad = clip_grad
        self.skipped_steps = 0

    @property
    def eval_model(self) -> torch.nn.Module:
        """The model validation and saving use: the EMA copy if there is one."""
        return self.ema.module if self.ema is not None else self.model

    def step(self, batch) -> tuple[float, bool]:
        """One optimisation step on ``batch``; returns ``(loss, skipped)``.

        With loss scaling a step whose gradients hold inf/NaN is skipped (GradScaler
        lowers the scale); without it a non-finite loss raises ``FloatingPointError``.
        """
        batch = batch.to(self.device)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(batch, _forward(self.model, self.policy, batch, training=True))
        if self.scaler is None:
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss {loss.item()} under policy "
                                         f"{self.policy.name!r}")
            loss.backward()
            self._clip()
            self.optimizer.step()
            skipped = False
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            self._clip()
            scale_before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skipped if unscaled gradients hold inf/NaN
            self.scaler.update()
            skipped = self.scaler.get_scale() < scale_before
        if skipped:
            self.skipped_steps += 1
        elif self.ema is not None:
            self.ema.update_parameters(self.model)
        return float(loss.detach()), skipped

    def _clip(self) -> None:
        if self.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)

    def loss(self, graphs, batch_size: int) -> float:
        """mace's loss of ``eval_model`` over ``graphs``, averaged per graph."""
        model = self.eval_model
        model.eval()
        total, count = 0.0, 0
        for batch in DataLoader(graphs, batch_size=batch_size, shuffle=False):
            batch = batch.to(self.device)
            loss = self.loss_fn(batch, _forward(model, self.policy, batch, training=False))
            total += float(loss.detach()) * batch.num_graphs
            count += batch.num_graphs
        return total / count

    def plain_model(self) -> torch.nn.Module:
        """A deep copy of ``eval_model`` with the policy's wrappers stripped, on the CPU."""
        return copy_without_policy(self.eval_model).cpu()


def train(train_path, valid_path, test_path, out_dir, *, policy: str = "fp32", seed: int = 0,
          device: str = "cpu", epochs: int = 16, batch_size: int = 4, valid_batch_size: int = 8,
          lr: float = 0.01, lr_final: float = 0.001, ema_decay: float = 0.99,
          energy_weight: float = 1000.0, forces_weight: float = 100.0,
          stress_weight: float = 1000.0,
          clip_grad: float | None = 10.0, max_minutes: float | None = None,
          model_settings: dict | None = None, log=print) -> dict:
    """Train, keep the best model by validation loss, evaluate it on every split.

    Writes ``out_dir/best.model`` and ``out_dir/metrics.json``; returns the metrics.
    ``model_settings`` update :data:`DEFAULT_MODEL_SETTINGS` (keyword arguments of
    :func:`mace_lpcalc.models.build_model`).
    """
    training_policy = get_training_policy(policy)
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be positive, got {epochs}, {batch_size}")
    model_settings = {**DEFAULT_MODEL_SETTINGS, **(model_settings or {})}
    r_max = float(model_settings["r_max"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    frames = {"train": read_frames(train_path), "valid": read_frames(valid_path),
              "test": read_frames(test_path) if test_path is not None else None}
    z_table = AtomicNumberTable(sorted({int(z) for a in frames["train"] for z in a.numbers}))
    saved_dtype = torch.get_default_dtype()
    saved_determinism = (torch.are_deterministic_algorithms_enabled(),
                         torch.is_deterministic_algorithms_warn_only_enabled())
    torch.set_default_dtype(training_policy.master_dtype)  # AtomicData takes the default dtype
    # Multi-threaded CPU scatter/matmul otherwise differ in the last bit from run to run;
    # warn_only: ops without a deterministic kernel (some CUDA ones) warn instead of failing.
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        splits = {name: make_split(name, f, z_table, r_max)
                  for name, f in frames.items() if f is not None}
        torch.manual_seed(seed)
        model, statistics = prepare_model(training_policy, splits["train"], z_table,
                                          model_settings, seed, batch_size)
        trainer = Trainer(model, training_policy, lr=lr, energy_weight=energy_weight,
                          forces_weight=forces_weight, stress_weight=stress_weight,
                          ema_decay=ema_decay, clip_grad=clip_grad, device=device)
        decay = (lr_final / lr) ** (1 / max(epochs - 1, 1))
        scheduler = torch.optim.lr_scheduler.ExponentialLR(trainer.optimizer, gamma=decay)
        loader = DataLoader(splits["train"].graphs, batch_size=batch_size, shuffle=True,
                            drop_last=False, generator=torch.Generator().manual_seed(seed))
        history, best = [], {"valid_loss": math.inf, "epoch": None}
        model_path = out_dir / "best.model"
        for epoch in range(1, epochs + 1):
            epoch_started = time.perf_counter()
            losses = [trainer.step(batch)[0] for batch in loader]
            valid_loss = trainer.loss(splits["valid"].graphs, valid_batch_size)
            history.append({"epoch": epoch, "lr": scheduler.get_last_lr()[0],
                            "train_loss": float(np.mean(losses)), "valid_loss": valid_loss,
                            "skipped_steps": trainer.skipped_steps,
                            "seconds": time.perf_counter() - epoch_started})
            scheduler.step()
            if valid_loss < best["valid_loss"]:
                best = {"valid_loss": valid_loss, "epoch": epoch}
                torch.save(trainer.plain_model(), model_path)
            log(f"epoch {epoch}/{epochs}: train loss {history[-1]['train_loss']:.5g}, "
                f"valid loss {valid_loss:.5g}{' (best)' if best['epoch'] == epoch else ''}, "
                f"{history[-1]['seconds']:.0f} s")
            if max_minutes is not None and time.perf_counter() - started > 60 * max_minutes:
                log(f"stopping after epoch {epoch}: --max-minutes {max_minutes} reached")
                break
        if best["epoch"] is None:
            raise FloatingPointError("validation loss was never finite; no model saved")
        training_seconds = time.perf_counter() - started

        best_model = load_model(model_path)
        parameters = sum(p.numel() for p in best_model.parameters())
        evaluated = apply_policy(best_model.to(device), training_policy.forward)
        rmse = {name: error_metrics(split, predict(evaluated, training_policy, split.graphs,
                                                   valid_batch_size, device))
                for name, split in splits.items()}
    finally:
        torch.set_default_dtype(saved_dtype)
        torch.use_deterministic_algorithms(saved_determinism[0], warn_only=saved_determinism[1])

    metrics = {
        "policy": training_policy.as_dict(), "seed": seed, "device": device,
        "torch_threads": torch.get_num_threads(),
        "data": {name: str(path) for name, path in
                 (("train", train_path), ("valid", valid_path), ("test", test_path))},
        "model_settings": model_settings, "statistics": statistics,
        "parameters": parameters,
        "settings": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "lr_final": lr_final,
                     "ema_decay": ema_decay, "energy_weight": energy_weight,
                     "forces_weight": forces_weight, "stress_weight": stress_weight,
                     "clip_grad": clip_grad, "max_minutes": max_minutes},
        "best_epoch": best["epoch"], "best_valid_loss": best["valid_loss"],
        "epochs_run": len(history), "skipped_steps": trainer.skipped_steps,
        "training_seconds": training_seconds,
        "evaluation_seconds": time.perf_counter() - started - training_seconds,
        "rmse": rmse, "history": history, "model_path": str(model_path),
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", required=True, help="training extended XYZ")
    parser.add_argument("--valid", required=True, help="validation extended XYZ")
    parser.add_argument("--test", help="test extended XYZ")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--policy", default="fp32", choices=list(TRAINING_POLICIES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--valid-batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--lr-final", type=float, default=0.001)
    parser.add_argument("--ema-decay", type=float, default=0.99, help="0 disables the EMA")
    parser.add_argument("--energy-weight", type=float, default=1000.0,
                        help="weight of the per-atom energy MSE (eV²)")
    parser.add_argument("--forces-weight", type=float, default=100.0,
                        help="weight of the force MSE (eV²/Å²)")
    parser.add_argument("--stress-weight", type=float, default=1000.0,
                        help="weight of the stress MSE (eV²/Å⁶)")
    parser.add_argument("--clip-grad", type=float, default=10.0, help="0 disables clipping")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop after the epoch that passes this wall time (not reproducible)")
    model = DEFAULT_MODEL_SETTINGS
    parser.add_argument("--hidden-irreps", default=model["hidden_irreps"])
    parser.add_argument("--r-max", type=float, default=model["r_max"], help="cut-off, Å")
    parser.add_argument("--max-ell", type=int, default=model["max_ell"])
    parser.add_argument("--correlation", type=int, default=model["correlation"])
    parser.add_argument("--num-interactions", type=int, default=model["num_interactions"])
    parser.add_argument("--num-bessel", type=int, default=model["num_bessel"])
    parser.add_argument("--radial-mlp", type=int, nargs="+", default=list(model["radial_mlp"]))
    parser.add_argument("--mlp-irreps", default=model["mlp_irreps"])
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model_settings = {"hidden_irreps": args.hidden_irreps, "r_max": args.r_max,
                      "max_ell": args.max_ell, "correlation": args.correlation,
                      "num_interactions": args.num_interactions, "num_bessel": args.num_bessel,
                      "radial_mlp": tuple(args.radial_mlp), "mlp_irreps": args.mlp_irreps}
    try:
        metrics = train(args.train, args.valid, args.test, args.out, policy=args.policy,
                        seed=args.seed, device=args.device, epochs=args.epochs,
                        batch_size=args.batch_size, valid_batch_size=args.valid_batch_size,
                        lr=args.lr, lr_final=args.lr_final, ema_decay=args.ema_decay,
                        energy_weight=args.energy_weight, forces_weight=args.forces_weight,
                        stress_weight=args.stress_weight, clip_grad=args.clip_grad or None,
                        max_minutes=args.max_minutes, model_settings=model_settings)
    except (ValueError, FloatingPointError) as err:
        sys.exit(f"error: {err}")
    print(json.dumps(metrics["rmse"], indent=2))


if __name__ == "__main__":
    main()
