"""Per-block profile of one MACE energy+forces call: host time, device time, kernel launches.

``python -m mace_lpcalc.perf.profile --device cuda --model off24m --policy fp32 --backend e3nn``

Every MACE block (node embedding, spherical harmonics, radial embedding, each
interaction's ``linear_up``, radial MLP ``conv_tp_weights``, ``conv_tp``, ``linear`` and
``skip_tp``, each product's symmetric contraction and ``linear``, each readout, ...) runs
inside a ``torch.profiler.record_function`` range opened and closed by forward hooks.
Hooks sit on the outermost module at each position, so a policy's wrappers (16-bit
Linear blocks, autocast regions) are timed with the layer they wrap; rows are named as
in a plain model's ``named_modules()``, and ``module`` gives the real path.

One profiled call is one ``calculate(atoms, ["energy", "forces"])``; how its host and
device time are attributed to the rows is described in
:mod:`mace_lpcalc.perf.profile_attribution`. Profiling inflates host time (each operator
is recorded); ``wall_ms`` of the whole call is therefore also measured without the
profiler and hooks, and the GPU-busy fraction and verdict use that. The table profiles
mace's own per-call path (``fast_path=False``); on CUDA the calculator's fast path
(:class:`mace_lpcalc.fastpath.engine.MACEEngine`) is then timed eagerly and replaying a
CUDA graph. A graph replay is one launch, so inside it only whole-call numbers exist, no
per-block attribution.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from pathlib import Path

from mace_lpcalc import compat  # noqa: F401  -- mace before e3nn; version check
import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule

from mace_lpcalc.perf.bench import energy_forces_call, make_model, write_json
from mace_lpcalc.perf.profile_attribution import (
    ATTRIBUTION,
    CALL,
    GPU_BOUND_FRACTION,
    RANGE_PREFIX,
    attribute,
    bound_verdict,
    device_in_window,
    is_device_activity,
    top_kernels,
)
from mace_lpcalc.timing import median_ms, synchronize
from mace_lpcalc.calculator import LowPrecisionMACECalculator
from mace_lpcalc.installed import measurement_provenance
from mace_lpcalc.precision.policies import POLICIES
from mace_lpcalc.precision.casting import POLICY_WRAPPERS
from mace_lpcalc.systems import water_box

#: Module lists whose members are groups: their children are timed one by one.
GROUP_LISTS = ("interactions", "products")

MODEL = "model"
GRAPH_NOTE = ("A CUDA graph replay is a single launch: per-block attribution is not possible "
              "inside it, only whole-call wall and device time.")


# --------------------------------------------------------------------- the blocks

def logical_modules(model: torch.nn.Module) -> dict[str, tuple[str, torch.nn.Module]]:
    """Each module's name with policy wrappers seen through -> (real name, outermost module).

    ``interactions.0.module.linear_up`` (inside an autocast region) and the
    ``IrrepBlockLinear`` at ``interactions.0.linear_up`` both map to
    ``interactions.0.linear_up``; the outermost module at a position wins.
    """
    logical_of = {"": ""}
    found: dict[str, tuple[str, torch.nn.Module]] = {}
    for name, module in model.named_modules():
        if name:
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            parent_logical = logical_of[parent_name]
            if isinstance(parent, POLICY_WRAPPERS) and module is next(iter(parent.children())):
                logical_of[name] = parent_logical
            else:
                logical_of[name] = f"{parent_logical}.{leaf}" if parent_logical else leaf
        found.setdefault(logical_of[name], (name, module))
    return found


def profiled_blocks(model: torch.nn.Module) -> dict[str, tuple[str, str]]:
    """The ranges to open: logical name -> (real module name, ``"block"`` or ``"group"``).

    Blocks: every child of the model (each member of a module list instead of the list),
    and every child of each interaction and product, whose members become groups. The
    model itself is the group ``model``. ScriptModules cannot take hooks and are left out.
    """
    modules = logical_modules(model)
    children: dict[str, list[str]] = {}
    for logical in modules:
        if logical:
            parent, _, _ = logical.rpartition(".")
            children.setdefault(parent, []).append(logical)
    ranges = {MODEL: ("", "group")}

    def add(logical: str, kind: str) -> None:
        real, module = modules[logical]
        if not isinstance(module, torch.jit.ScriptModule):
            ranges[logical] = (real, kind)

    for top in children.get("", []):
        module = modules[top][1]
        if not isinstance(module, torch.nn.ModuleList):
            add(top, "block")
            continue
        for member in children.get(top, []):
            if top in GROUP_LISTS:
                add(member, "group")
                for child in children.get(member, []):
                    add(child, "block")
            else:
                add(member, "block")
    return ranges


@contextlib.contextmanager
def block_ranges(model: torch.nn.Module, ranges: dict[str, tuple[str, str]]):
    """Open a ``record_function`` range around every listed module's forward call."""
    open_ranges: list[record_function] = []
    handles = []

    def enter(name):
        def hook(module, args):
            open_ranges.append(record_function(RANGE_PREFIX + name).__enter__())
        return hook

    def leave(module, args, output):
        open_ranges.pop().__exit__(None, None, None)

    for logical, (real, _) in ranges.items():
        module = model.get_submodule(real)
        handles.append(module.register_forward_pre_hook(enter(logical)))
        handles.append(module.register_forward_hook(leave))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        while open_ranges:  # a call that raised leaves its ranges open
            open_ranges.pop().__exit__(None, None, None)


# ------------------------------------------------------------------- profiling

def _activities(device: str) -> list:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])


def _profile_calls(call, device: str, steps: int, trace: Path | None):
    """Run ``call`` under the profiler (one unrecorded profiler warm-up, then ``steps``)."""
    with profile(activities=_activities(device),
                 schedule=schedule(wait=0, warmup=1, active=steps, repeat=1)) as prof:
        for _ in range(steps + 1):
            synchronize(device)
            with record_function(RANGE_PREFIX + CALL):
                call()
            synchronize(device)
            prof.step()
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    return prof.events()


def profile_blocks(calc, atoms, *, warmup: int = 5, steps: int = 20,
                   trace: Path | None = None) -> dict:
    """Profile ``steps`` energy+forces calls of ``calc`` on ``atoms``, block by block.

    Returns ``{"rows": [...], "whole_call": {...}}``; each row has ``block``, ``module``
    (the real module path, ``None`` for ``(other)`` and synthetic rows), ``calls``,
    ``host_ms_per_call``, and on CUDA ``device_ms_per_call`` and ``kernels_per_call``.
    """
    if warmup < 0 or steps < 1:
        raise ValueError(f"need warmup >= 0 and steps >= 1, got warmup={warmup}, steps={steps}")
    engine = getattr(calc, "engine", None)
    if engine is not None and engine.use_cuda_graph:
        raise ValueError("per-block profiling needs eager evaluation: build the calculator "
                         "with fast_path=False or use_cuda_graph=False")
    device = str(calc.device)
    with_device = device.startswith("cuda")
    model = calc.models[0]
    ranges = profiled_blocks(model)
    kinds = {name: kind for name, (_, kind) in ranges.items()} | {CALL: "group"}
    call = energy_forces_call(calc, atoms)
    for _ in range(warmup):
        call()
    wall_ms = median_ms(call, device, warmup=0, repeats=steps)  # no hooks, no profiler
    with block_ranges(model, ranges):
        events = _profile_calls(call, device, steps, trace)
    found = attribute(events, kinds, with_device)

    rows = []
    for name, totals in sorted(found["rows"].items(), key=lambda item: item[1]["first_start"]):
        if totals["calls"] == 0 and totals["device_us"] == 0:
            continue
        calls = totals["calls"] or steps
        in_ranges = name in ranges and ranges[name][1] == "block"
        rows.append({
            "block": name,
            "module": ranges[name][0] if in_ranges else None,
            "calls": calls,
            "host_ms_per_call": totals["host_us"] / calls / 1e3,
            "device_ms_per_call": totals["device_us"] / calls / 1e3 if with_device else None,
            "kernels_per_call": totals["kernels"] / calls if with_device else None,
        })
    profiled_wall_ms = statistics.fmean(c["wall_us"] for c in found["calls"]) / 1e3
    device_ms = (statistics.fmean(c["device_us"] for c in found["calls"]) / 1e3
                 if with_device else None)
    whole_call = {
        "wall_ms": wall_ms,
        "profiled_wall_ms": profiled_wall_ms,
        "device_ms": device_ms,
        "kernels_per_call": (statistics.fmean(c["kernels"] for c in found["calls"])
                             if with_device else None),
        "gpu_busy_fraction": device_ms / wall_ms if with_device else None,
        "verdict": bound_verdict(device_ms, wall_ms),
    }
    return {"rows": rows, "whole_call": whole_call}


def profile_fast_path(build_calc, atoms, device: str, *, warmup: int = 5,
                      steps: int = 20, compile_model: bool = False) -> list[dict]:
    """Whole-call wall and device time of the fast path, eager and replaying a CUDA graph.

    ``build_calc(use_cuda_graph, compile_model)`` makes a calculator on the fast path;
    with ``compile_model`` the compiled call replaying a CUDA graph is profiled too. Empty
    unless ``device`` is CUDA. Positions do not change between calls, so the neighbour
    list is checked but not rebuilt, as in MD between rebuilds.
    """
    if not device.startswith("cuda"):
        return []
    results = []
    variants = [(False, False), (True, False)] + ([(True, True)] if compile_model else [])
    for use_cuda_graph, compiled in variants:
        calc = build_calc(use_cuda_graph, compiled)
        call = energy_forces_call(calc, atoms)
        for _ in range(max(warmup, 1)):
            call()
        wall_ms = median_ms(call, device, warmup=0, repeats=steps)
        events = _profile_calls(call, device, steps, trace=None)
        activities = [e for e in events if is_device_activity(e)]
        per_call = [device_in_window(activities, e.time_range.start, e.time_range.end)
                    for e in events if e.name == RANGE_PREFIX + CALL]
        device_ms = statistics.fmean(c["device_us"] for c in per_call) / 1e3
        results.append({
            "top_kernels": top_kernels(activities, n_calls=len(per_call)),
            "path": "fast path, " + ("compiled, " if compiled else "")
                    + ("CUDA graph" if use_cuda_graph else "eager"),
            "compiled": bool(compiled and calc.engine.compiled.active),
            "replayed_cuda_graph": calc.engine.last_call_replayed_graph,
            "wall_ms": wall_ms,
            "device_ms": device_ms,
            "kernels_per_call": statistics.fmean(c["kernels"] for c in per_call),
            "gpu_idle_fraction": 1 - device_ms / wall_ms,
            "verdict": bound_verdict(device_ms, wall_ms),
        })
    return results


def run_profile(*, model_spec: str, policy: str, backend: str, device: str, n_molecules: int,
                warmup: int, steps: int, trace: Path | None = None,
                compile_model: bool = False) -> dict:
    """Profile mace's per-call path block by block (and the fast path on CUDA); JSON-ready."""
    atoms = water_box(n_molecules, seed=0)

    def build_calc(fast_path, use_cuda_graph=False, compiled=False):
        return LowPrecisionMACECalculator(models=make_model(model_spec), device=device,
                                          policy=policy, backend=backend, fast_path=fast_path,
                                          use_cuda_graph=use_cuda_graph,
                                          compile_model=compiled, compile_in_background=False)

    calc = build_calc(fast_path=False)  # mace's own per-call path: every block runs eagerly
    profiled = profile_blocks(calc, atoms, warmup=warmup, steps=steps, trace=trace)
    fast = profile_fast_path(lambda graph, compiled: build_calc(True, graph, compiled), atoms,
                             device, warmup=warmup, steps=steps, compile_model=compile_model)
    # The same blocks on the fast path, run eagerly (a graph replay cannot be split).
    fast_rows = (profile_blocks(build_calc(True, False), atoms, warmup=warmup,
                                steps=steps)["rows"] if fast else [])
    notes = [("Host times are measured under the profiler, which inflates them; "
              "whole_call.wall_ms is measured without it and is the one to quote.")]
    if not device.startswith("cuda"):
        notes.append("CPU run: no device time; the table gives host times only.")
    if fast:
        notes.append(GRAPH_NOTE)
    return {
        "profile": "per-block host and device time of one energy+forces call",
        "model": model_spec, "policy": policy, "backend": calc.backend, "device": device,
        **measurement_provenance(device),
        "settings": {"molecules": n_molecules, "n_atoms": len(atoms), "warmup": warmup,
                     "steps": steps, "gpu_bound_fraction": GPU_BOUND_FRACTION,
                     "torch_threads": torch.get_num_threads()},
        "attribution": ATTRIBUTION,
        "rows": profiled["rows"],
        "whole_call": profiled["whole_call"],
        "path": "mace's per-call path (fast_path=False)",
        "fast_path": fast,
        "fast_path_eager_rows": fast_rows,
        "notes": notes,
    }


def format_report(result: dict) -> str:
    """The per-block table (by device time, or host time on CPU) and the whole-call lines."""
    on_device = result["whole_call"]["device_ms"] is not None
    key = "device_ms_per_call" if on_device else "host_ms_per_call"
    rows = sorted(result["rows"], key=lambda r: r[key] * r["calls"], reverse=True)
    lines = [(f"{result['model']}  policy {result['policy']}  backend {result['backend']}  "
              f"{result['device']} ({result['gpu'] or 'CPU'})  "
              f"{result['settings']['n_atoms']} atoms  {result['settings']['steps']} calls"),
             f"{'block':<36}{'calls':>6}{'host ms':>10}{'device ms':>11}{'kernels':>9}"]
    for r in rows:
        device = f"{r['device_ms_per_call']:11.3f}{r['kernels_per_call']:9.1f}" if on_device else ""
        lines.append(f"{r['block']:<36}{r['calls']:>6}{r['host_ms_per_call']:10.3f}{device}")
    whole = result["whole_call"]
    line = f"whole call: wall {whole['wall_ms']:.3f} ms (profiled {whole['profiled_wall_ms']:.3f})"
    if on_device:
        line += (f", device {whole['device_ms']:.3f} ms, {whole['kernels_per_call']:.0f} kernels, "
                 f"GPU busy {whole['gpu_busy_fraction']:.0%}")
    lines.append(line + f": {whole['verdict']}")
    for path in result["fast_path"]:
        device = ("device n/a" if path["device_ms"] is None else
                  f"device {path['device_ms']:.3f} ms, GPU idle {path['gpu_idle_fraction']:.0%}")
        fell_back = path["path"].endswith("graph") and not path["replayed_cuda_graph"]
        lines.append(f"{path['path']}{' (capture failed: ran eagerly)' if fell_back else ''}: "
                     f"wall {path['wall_ms']:.3f} ms, {device}: {path['verdict']}")
        lines.extend(f"    {k['device_ms_per_call']:8.3f} ms {k['launches_per_call']:5.1f}x "
                     f"{k['kernel'][:90]}" for k in path["top_kernels"][:8])
    if result.get("fast_path_eager_rows"):
        lines.append("fast path, eager, by block (device ms per call):")
        ranked = sorted(result["fast_path_eager_rows"], key=lambda r: -r["device_ms_per_call"])
        lines.extend(f"    {r['device_ms_per_call']:8.3f} {r['block']}" for r in ranked[:12])
    lines.extend(result["notes"])
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="off24m", help="off24m, tiny, or a .model path")
    parser.add_argument("--policy", default="fp32", choices=list(POLICIES))
    parser.add_argument("--backend", default="auto", choices=["auto", "e3nn", "cuequivariance"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--molecules", type=int, default=64, help="water molecules (x3 atoms)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="profiled calls")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    parser.add_argument("--trace", type=Path, help="write a Chrome trace of the profiled calls")
    parser.add_argument("--compile", action="store_true",
                        help="also profile the compiled fast path (CUDA only)")
    args = parser.parse_args(argv)
    result = run_profile(model_spec=args.model, policy=args.policy, backend=args.backend,
                         device=args.device, n_molecules=args.molecules, warmup=args.warmup,
                         steps=args.steps, trace=args.trace, compile_model=args.compile)
    print(format_report(result))
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
