"""Making a model's TorchScript functions visible to ``make_fx`` while it traces
(:func:`make_traceable`; ``test_cuda_trace_after_torchscript_fused_the_spherical_harmonics``)."""

from __future__ import annotations

import contextvars
import inspect
import types

import torch

#: Set while this thread traces: modules made traceable run their Python forward.
TRACING = contextvars.ContextVar("mace_lpcalc_tracing", default=False)


def make_traceable(model: torch.nn.Module) -> None:
    """Let ``model``'s modules run TorchScript functions as Python while this module traces.

    Once a scripted function (e3nn's spherical harmonics, ...) has run a few times on
    CUDA, TorchScript executes it as fused kernels that bypass the operators make_fx
    records, and the trace would freeze its outputs at the traced positions. Each
    submodule whose ``forward`` calls such a function gets, on this instance only, a
    ``forward`` that, while tracing, runs the same code with the functions' Python
    originals in place of the scripted ones; everyone else's calls, and this module's
    outside a trace, run the class's own ``forward``. Nothing in e3nn or mace changes.
    """
    for module in model.modules():
        if "forward" in vars(module) or isinstance(module, torch.jit.ScriptModule):
            continue  # already made traceable (or given an instance forward by its owner)
        scripted = inspect.getattr_static(type(module), "forward", None)
        if not isinstance(scripted, types.FunctionType):
            continue
        python = _with_python_script_functions(scripted)
        if python is not None:
            module.forward = types.MethodType(_TracingDispatch(scripted, python), module)


class _TracingDispatch:
    """A forward that is ``python`` while tracing and ``scripted`` otherwise."""

    #: Pickled bound to its module, a method is looked up by this name again.
    __name__ = "forward"

    def __init__(self, scripted, python):
        self.scripted, self.python = scripted, python

    def __call__(self, module, *args, **kwargs):
        return (self.python if TRACING.get() else self.scripted)(module, *args, **kwargs)


def _with_python_script_functions(function):
    """``function`` with the scripted functions it calls replaced by their Python
    originals (a copy with its own globals), or None if it calls none."""
    code, replacements = function.__code__, {}
    for name in code.co_names:
        value = function.__globals__.get(name)
        original = getattr(value, "_torchdynamo_inline", None)
        if isinstance(value, torch.jit.ScriptFunction) and callable(original):
            replacements[name] = original
    if not replacements:
        return None
    return types.FunctionType(code, {**function.__globals__, **replacements},
                              function.__name__, function.__defaults__, function.__closure__)
