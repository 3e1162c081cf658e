"""Eval-mode batch norm on the CPU that takes its input's moments from the same read.

A pre-hook that reduces a batch norm's input reads it from memory once, and the layer's own
forward reads it once more. In eval mode the layer's output is an affine map of its input per
channel, so it can be computed piece by piece: ``cpu_moments`` reads each piece of the input (a
few MiB along N) into the cache for its sums, and the layer's own kernel normalizes that piece
right there, into the output. The input then comes from memory once, as in a plain forward.

The output is torch's own: the same aten kernel (``native_batch_norm.out``, eval) runs on each
piece, and it computes every value from that value and its channel's coefficients alone, in the
same order for a piece as for the whole batch, so the output is bitwise what the module returns
(tests/test_cpu_batch_norm.py checks it, with the buffers left untouched). Used only where that
holds: stock ``nn.BatchNorm1d/2d/3d`` in eval mode with running statistics, float32 or float64
input on the CPU, contiguous in NC* or channels-last order, every tensor of the input's dtype,
no autograd. Elsewhere the pre-hook path runs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bn_inspect.engine.moments import ChannelMoments, cpu_moments, piece_length

STOCK_FORWARD = _BatchNorm.forward
_DTYPES = (torch.float32, torch.float64)
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def cpu_pass_may_run(module: nn.Module) -> bool:
    """Whether ``module`` is a stock batch norm on the CPU whose eval forward this pass can replace."""
    return (
        isinstance(module, _BatchNorm)
        and type(module).forward is STOCK_FORWARD
        and "forward" not in vars(module)
        and not isinstance(module, nn.modules.lazy.LazyModuleMixin)
        and module.running_mean is not None
        and module.running_mean.device.type == "cpu"
    )


def cpu_pass_applies(module: _BatchNorm, x: torch.Tensor) -> bool:
    """Whether this call of a module that ``cpu_pass_may_run`` can take the pass (else: the pre-hook path)."""
    running_mean, running_var = module.running_mean, module.running_var
    if module.training or running_mean is None or running_var is None:
        return False
    dtype = x.dtype
    if dtype not in _DTYPES or x.device.type != "cpu" or x.dim() < 2 or x.numel() == 0:
        return False
    affine = [t for t in (module.weight, module.bias) if t is not None]
    if running_mean.dtype != dtype or running_var.dtype != dtype or any(t.dtype != dtype for t in affine):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in affine)):
        return False
    memory_format = _CHANNELS_LAST.get(x.dim())
    return x.is_contiguous() or (memory_format is not None and x.is_contiguous(memory_format=memory_format))


def cpu_batch_norm(
    module: _BatchNorm, x: torch.Tensor, previous: ChannelMoments | None
) -> tuple[torch.Tensor, ChannelMoments]:
    """The layer's eval-mode output and ``previous`` merged with the moments of ``x``.

    Call only where ``cpu_pass_applies(module, x)``.
    """
    output = torch.empty_like(x)
    step = piece_length(x)
    outputs = (output,) if step >= len(x) else torch.split(output, step)
    unused = torch.empty(0, dtype=x.dtype)
    normalize = torch.ops.aten.native_batch_norm.out
    args = (module.weight, module.bias, module.running_mean, module.running_var, False, 0.0, module.eps)

    def each_piece(index: int, piece: torch.Tensor) -> None:
        normalize(piece, *args, out=outputs[index], save_mean=unused, save_invstd=unused)

    moments = cpu_moments(x, each_piece)
    return output, moments if previous is None else previous.merge(moments)
