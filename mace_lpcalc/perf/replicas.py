"""Replica throughput on one GPU: N water boxes in one batched pass, against one at a time.

    python -m mace_lpcalc.perf.replicas --device cuda --molecules 216 --replicas 1 4 16 \\
        --policies fp32 fp32-linear-fp16 --out bench/results/h200_replicas_648.json

A certificate needs hundreds of replica-picoseconds per policy, and one 648-atom box
leaves an H200 mostly idle. Two ways to run N replicas in one process are measured
here, in the same run, on the shipped water model:

* ``ours``: our calculator under ASE Langevin on one periodic box of N × ``molecules``.
  N replicas batched as disconnected graphs of one model call have the same atoms and the
  same edges per atom as that box, so its ms per step is what batching them into our
  engine would cost, integrator included. N = 1 is one replica alone, the baseline.
* ``ours-batched``: N separate replicas (own boxes, own cells) under ASE Langevin, each in
  a greenlet of its own, batched into one model call per step by
  :class:`mace_lpcalc.md.replicas.ReplicaBatch`: what ``run_replicas`` and the campaigns
  run. N = 1 shows the cost of the greenlet and the batch over a plain calculator.
* ``torchsim``: TorchSim's batched Langevin NVT (``torch_sim.nvt_langevin``) on N
  separate boxes, with the same model, policy and backend as a TorchSim ``MaceModel``:
  one model call per step for all N boxes, on mace's own forward (neither our
  neighbour list nor CUDA graphs).

Each row: ms per MD step, replica-steps per second, and that throughput over one replica
on our engine.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mace_lpcalc.calculator import LowPrecisionMACECalculator
from mace_lpcalc.installed import measurement_provenance
from mace_lpcalc.md.replicas import ReplicaBatch, ReplicaSlot
from mace_lpcalc.models import default_model_path
from mace_lpcalc.perf.bench import langevin_steps_call, write_json
from mace_lpcalc.timing import median_ms
from mace_lpcalc.systems import water_box

TIMESTEP_PS = 0.0005
TEMPERATURE_K = 300.0


def calculator(policy: str, device: str, **options) -> LowPrecisionMACECalculator:
    return LowPrecisionMACECalculator(model_paths=str(default_model_path()), device=device,
                                      policy=policy, **options)


def ours_step_ms(policy: str, device: str, n_molecules: int, *, block: int, warmup: int,
                 repeats: int) -> float:
    run_block = langevin_steps_call(calculator(policy, device), water_box(n_molecules, seed=0),
                                    block)
    return median_ms(run_block, device, warmup, repeats) / block


def batched_step_ms(policy: str, device: str, n_molecules: int, n_replicas: int, *,
                    block: int, warmup: int, repeats: int) -> float:
    """ms per MD step of ``n_replicas`` boxes batched by :class:`ReplicaBatch`."""
    batch = ReplicaBatch(calculator(policy, device))
    slots = [ReplicaSlot(batch, index) for index in range(n_replicas)]
    runs = [langevin_steps_call(slot, water_box(n_molecules, seed=seed), block, seed=seed)
            for seed, slot in enumerate(slots)]

    def run_block():
        calls_before = len(batch.batch_sizes)
        failures = [outcome for outcome in batch.run(runs) if isinstance(outcome, BaseException)]
        if failures:
            raise failures[0]
        if set(batch.batch_sizes[calls_before:]) != {n_replicas}:
            raise RuntimeError(f"replicas fell out of step: {batch.batch_sizes[calls_before:]}")

    return median_ms(run_block, device, warmup, repeats) / block


def torchsim_step_ms(batched, n_molecules: int, n_replicas: int, *, device: str, block: int,
                     warmup: int, repeats: int) -> float:
    """``batched``: a TorchSim ``MaceModel`` (:func:`torchsim_model`)."""
    import torch_sim
    from torch_sim.units import MetalUnits

    dtype = batched.dtype
    boxes = [water_box(n_molecules, seed=seed) for seed in range(n_replicas)]
    state = torch_sim.initialize_state(boxes, device=torch.device(device), dtype=dtype)
    kT = torch.tensor(TEMPERATURE_K * MetalUnits.temperature, dtype=dtype, device=device)
    dt = torch.tensor(TIMESTEP_PS * MetalUnits.time, dtype=dtype, device=device)
    init, step = torch_sim.nvt_langevin(model=batched, dt=dt, kT=kT, seed=0)
    md_state = init(state)

    def run_block():
        nonlocal md_state
        for _ in range(block):
            md_state = step(md_state, kT)

    return median_ms(run_block, device, warmup, repeats) / block


def torchsim_model(policy: str, device: str):
    """The shipped model as a TorchSim ``MaceModel``: our calculator converts the backend
    and applies the policy, on mace's path (no fast-path rewrites of the modules)."""
    from torch_sim.models.mace import MaceModel

    calc = calculator(policy, device, fast_path=False)
    return MaceModel(calc.models[0], device=torch.device(device),
                     dtype=calc.policy.model_dtype, compute_stress=False)


def measure(policies, replicas, engines, *, device: str, n_molecules: int, block: int,
            warmup: int, repeats: int) -> list[dict]:
    rows = []
    timing = dict(block=block, warmup=warmup, repeats=repeats)
    for policy in policies:
        one_replica_ms = ours_step_ms(policy, device, n_molecules, **timing)
        batched = torchsim_model(policy, device) if "torchsim" in engines else None
        for n in replicas:
            step_ms_of = {
                "ours": lambda: one_replica_ms if n == 1 else
                ours_step_ms(policy, device, n * n_molecules, **timing),
                "ours-batched": lambda: batched_step_ms(policy, device, n_molecules, n,
                                                        **timing),
                "torchsim": lambda: torchsim_step_ms(batched, n_molecules, n, device=device,
                                                     **timing)}
            for engine in engines:
                step_ms = step_ms_of[engine]()
                rows.append({"engine": engine, "policy": policy, "n_replicas": n,
                             "atoms_per_replica": 3 * n_molecules, "step_ms": step_ms,
                             "replica_steps_per_s": 1e3 * n / step_ms,
                             "throughput_vs_one_replica_ours": n * one_replica_ms / step_ms})
                print(f"{policy:18s} {engine:12s} N={n:3d}  {step_ms:8.2f} ms/step  "
                      f"{rows[-1]['replica_steps_per_s']:8.0f} replica-steps/s  "
                      f"×{rows[-1]['throughput_vs_one_replica_ours']:.2f}", flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mace_lpcalc.perf.replicas",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--molecules", type=int, default=216, help="molecules per replica")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--policies", nargs="+", default=["fp32", "fp32-linear-fp16"])
    parser.add_argument("--engines", nargs="+", default=["ours", "ours-batched", "torchsim"],
                        choices=["ours", "ours-batched", "torchsim"])
    parser.add_argument("--block", type=int, default=10, help="MD steps per timed sample")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float32)  # TorchSim's states follow the model's dtype
    rows = measure(args.policies, args.replicas, args.engines, device=args.device,
                   n_molecules=args.molecules, block=args.block, warmup=args.warmup,
                   repeats=args.repeats)
    write_json(args.out, {
        "benchmark": "replica throughput: ASE Langevin on our engine (one box of N replicas' "
                     "atoms, N replicas batched) vs TorchSim batched NVT",
        "model": str(default_model_path().name), "device": args.device,
        **measurement_provenance(args.device),
        "timestep_ps": TIMESTEP_PS, "statistic": "median", "block": args.block,
        "warmup": args.warmup, "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
