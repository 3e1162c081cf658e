"""Quantization-aware training's fused modules (torch.ao.nn.intrinsic.qat): the BatchNorm inside one and what it normalizes.

``prepare_qat`` turns Conv+BN(+ReLU) and Linear+BN into one module (ConvBn2d, ConvBnReLU2d,
LinearBn1d, ...) that keeps the BatchNorm as its child ``bn``. Its forward does not hand the BN the
convolution's plain output: it scales the weights by ``s = bn.weight / sqrt(running_var + eps)``,
fake-quantizes them, convolves without bias, divides by ``s`` and adds the bias. That tensor,

    conv_orig = conv(x, fake_quant(W * s), 0) / s + b,

is what ``bn`` receives and normalizes (with batch statistics while it trains, with the running
ones once frozen or in eval), so it is what the running statistics are compared against.
torch's slower path (``_enable_slow_path_for_better_numerical_stability``) never calls ``bn`` in
eval: it folds the running statistics into the weights and bias instead, which equals normalizing
the same ``conv_orig`` with them; ``folded_input`` computes it for that case.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class QatOwner:
    """The fused QAT module a BatchNorm sits in: its class name, and whether ``freeze_bn`` is set."""

    module: nn.Module
    type_name: str
    is_frozen: bool

    @property
    def input_sentence(self) -> str:
        """What the BatchNorm's input is, for the layer's explanation."""
        operation = "linear" if self.type_name.startswith("Linear") else "conv"
        return (
            f" Inside the QAT {self.type_name}, that input is {operation}(x, fake_quant(W·s))/s + b with "
            "s = weight/√(running var + eps): the layer as its quantized weights compute it."
        )

    @property
    def folds_in_eval(self) -> bool:
        """True where the forward never calls ``bn`` in eval mode (torch's slow, exact path)."""
        return bool(getattr(self.module, "_enable_slow_path_for_better_numerical_stability", False))


def _fused_classes() -> tuple[type[nn.Module], ...]:
    try:
        from torch.ao.nn.intrinsic.qat.modules.conv_fused import _ConvBnNd
        from torch.ao.nn.intrinsic.qat.modules.linear_fused import LinearBn1d
    except ImportError:  # a torch built without torch.ao
        return ()
    return (_ConvBnNd, LinearBn1d)


def qat_owners(model: nn.Module) -> dict[int, QatOwner]:
    """The fused QAT modules of ``model``, by the ``id`` of the BatchNorm each holds."""
    classes = _fused_classes()
    if not classes:
        return {}
    owners = {}
    for module in model.modules():
        bn = getattr(module, "bn", None) if isinstance(module, classes) else None
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            owners[id(bn)] = QatOwner(module, type(module).__name__, bool(getattr(module, "freeze_bn", False)))
    return owners


def folded_input(owner: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(x, fake_quant(W * s), 0) / s + b``: what the fused module's ``bn`` normalizes, computed as its forward does.

    Args:
        owner: a ConvBn or LinearBn QAT module (``bn``, ``weight``, ``bias``, ``weight_fake_quant``).
        x: the fused module's input.
    """
    fused: Any = owner  # its attributes are the fused class's, which nn.Module does not type
    bn = fused.bn
    weight: torch.Tensor = fused.weight
    running_std = torch.sqrt(bn.running_var + bn.eps)
    scale_factor = bn.weight / running_std
    weight_shape = [1] * weight.dim()
    weight_shape[0] = -1
    bias_shape = [1] * weight.dim()
    bias_shape[1] = -1
    scaled_weight = fused.weight_fake_quant(weight * scale_factor.reshape(weight_shape))
    zero_bias = torch.zeros(weight.shape[0], device=scaled_weight.device, dtype=x.dtype)
    out: torch.Tensor
    if isinstance(owner, nn.Linear):
        out = nn.functional.linear(x, scaled_weight, zero_bias)
    else:
        out = fused._conv_forward(x, scaled_weight, zero_bias)
    out = out / scale_factor.reshape(bias_shape)
    bias: torch.Tensor | None = fused.bias
    return out if bias is None else out + bias.reshape(bias_shape)


@contextmanager
def observers_paused(model: nn.Module) -> Iterator[None]:
    """Every fake-quantize observer of ``model`` paused for the block, then set back as it was.

    A QAT model's observers update each fake-quantize's scale and zero point on every forward,
    eval included, so each batch would run through a model the batches before it changed. Paused,
    every batch sees the quantization the model was saved with, as a converted model would.
    """
    paused = []
    for module in model.modules():
        enabled = getattr(module, "observer_enabled", None)
        if isinstance(enabled, torch.Tensor) and enabled.numel() == 1 and not enabled.is_meta:
            paused.append((enabled, enabled.clone()))
            enabled.fill_(0)
    try:
        yield
    finally:
        for enabled, before in paused:
            enabled.copy_(before)
