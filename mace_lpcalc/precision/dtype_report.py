"""Which dtype each module of a model actually ran in, measured by forward hooks on a real call.

A policy says what should run in which format; this reads what did, so that a test or a
user can see the 16-bit operands and the model-dtype reductions of a policy on a real
structure (``LowPrecisionMACECalculator.precision_report``).
"""

from __future__ import annotations

from typing import Callable

import torch


def _floating_dtypes(values) -> list[str]:
    found = []
    for value in values if isinstance(values, (tuple, list)) else (values,):
        if torch.is_tensor(value) and value.is_floating_point():
            found.append(str(value.dtype).replace("torch.", ""))
    return sorted(set(found))


def dtype_report(model: torch.nn.Module, run: Callable[[], object]) -> list[dict]:
    """The dtypes ``model``'s modules saw while ``run()`` evaluated it.

    Returns one row per leaf-level computation that ran: module name, type, the dtypes
    of its floating-point inputs, outputs and parameters. Rows ``output:energy`` and
    ``output:forces`` give the dtypes of the energy sum and of the autograd reduction.
    """
    rows: dict[str, dict] = {}
    handles = []

    def record(name):
        def hook(module, inputs, output):
            rows.setdefault(name, {
                "module": name,
                "type": type(module).__name__,
                "input_dtypes": _floating_dtypes(inputs),
                "output_dtypes": _floating_dtypes(output),
                "parameter_dtypes": sorted({str(p.dtype).replace("torch.", "")
                                            for p in module.parameters(recurse=False)}),
            })
        return hook

    def record_outputs(module, inputs, output):
        for quantity in ("energy", "forces", "stress"):
            if torch.is_tensor(output.get(quantity)):
                rows[f"output:{quantity}"] = {
                    "module": f"output:{quantity}", "type": "model output",
                    "input_dtypes": [], "parameter_dtypes": [],
                    "output_dtypes": _floating_dtypes(output[quantity])}

    for name, module in model.named_modules():
        if name and not isinstance(module, (torch.nn.ModuleList, torch.jit.ScriptModule)):
            handles.append(module.register_forward_hook(record(name)))
    handles.append(model.register_forward_hook(record_outputs))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return list(rows.values())
