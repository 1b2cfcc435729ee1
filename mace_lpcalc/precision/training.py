"""Precision policies for training: which format the forward runs in, and loss scaling.

Every policy keeps the trainable parameters (the optimizer's master weights) in fp32,
except ``fp64`` which trains entirely in float64:

===============  ==========================================================  ============
name             forward pass                                                loss scaling
===============  ==========================================================  ============
``fp64``         float64                                                     no
``fp32``         float32                                                     no
``amp-bf16``     torch.autocast(bfloat16) around each MACE block (the        no
                 inference policy ``bf16``)
``amp-fp16``     the same with float16                                       yes
``linear-bf16``  Linear layers and MLPs with bf16 operands, fp32             no
                 accumulation (inference policy ``fp32-linear-bf16``)
``linear-fp16``  the same with fp16 operands (``fp32-linear-fp16``)          yes
===============  ==========================================================  ============

fp16 has a narrow exponent range, so its policies use dynamic loss scaling
(``torch.amp.GradScaler``), which also skips any step whose gradients hold inf or NaN.
The forward-pass transforms are :func:`mace_lpcalc.precision.policies.apply_policy`'s; the fp32
parameters they leave in place are the ones the optimizer updates.
"""

from __future__ import annotations

import dataclasses

import torch

from mace_lpcalc.precision.policies import POLICIES, PrecisionPolicy

_AMP_FP16 = PrecisionPolicy("amp-fp16", "torch.autocast(float16) over the whole model",
                            torch.float32, autocast_dtype=torch.float16)


@dataclasses.dataclass(frozen=True)
class TrainingPolicy:
    """A forward-pass precision policy plus whether training scales the loss."""

    name: str
    forward: PrecisionPolicy
    loss_scaling: bool = False

    @property
    def master_dtype(self) -> torch.dtype:
        """dtype of the trainable parameters and of the data."""
        return self.forward.model_dtype

    def as_dict(self) -> dict:
        return {"name": self.name, "forward": self.forward.as_dict(),
                "loss_scaling": self.loss_scaling}


TRAINING_POLICIES: dict[str, TrainingPolicy] = {
    policy.name: policy
    for policy in (
        TrainingPolicy("fp64", POLICIES["fp64"]),
        TrainingPolicy("fp32", POLICIES["fp32"]),
        TrainingPolicy("amp-bf16", POLICIES["bf16"]),
        TrainingPolicy("amp-fp16", _AMP_FP16, loss_scaling=True),
        TrainingPolicy("linear-bf16", POLICIES["fp32-linear-bf16"]),
        TrainingPolicy("linear-fp16", POLICIES["fp32-linear-fp16"], loss_scaling=True),
    )
}


def get_training_policy(name: str) -> TrainingPolicy:
    """Look a training policy up by name; an unknown name raises ``ValueError``."""
    try:
        return TRAINING_POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown training policy {name!r}; valid policies: "
                         f"{', '.join(TRAINING_POLICIES)}") from None
