"""What the watch records of a sampled layer call: its batch statistics, its running statistics after the update.

Read back from the update. In training mode BatchNorm folds the statistics it normalizes with into
its running buffers, with the factor f = momentum (or 1 / num_batches_tracked after its increment
when momentum is None):

    running_mean' = (1 - f) running_mean + f batch_mean
    running_var'  = (1 - f) running_var  + f batch_var_unbiased

so, with n values per channel,

    batch_mean = running_mean + (running_mean' - running_mean) / f
    batch_var  = (running_var + (running_var' - running_var) / f) (n - 1) / n

computed in float64 on the device from a clone of the buffers taken before the forward: the layer's
own statistics, with no read of its input. Their precision is the buffers': running_mean' is
stored rounded to float32 (half an ulp, 2^-24, about 6e-8 of its magnitude), and the division by f
multiplies that rounding, so batch_mean is exact to about 6e-8 max(|running_mean|, |running_mean'|) / f
(a few times that at most: the update itself rounds more than once; the tests allow 4 times), and
batch_var likewise with running_var (floored at 0: a batch variance far below the running one
can come out slightly negative): 6e-7 of the running magnitude at the default momentum 0.1,
where a float32 reduction of the input is exact to about 1e-7 of the batch's. A mean shift in
running standard deviations is then off by about 6e-8 |running_mean| / (f running_std), negligible
against the departure tiers unless the mean is thousands of standard deviations from zero.

Read from the input (one float32 ``var_mean`` over every axis but the channels) for every other
call: eval mode, momentum 0 or no running buffers (nothing to read back), a factor below
``MIN_UPDATE_FACTOR`` (the error above would pass 6e-5 of the running magnitude), buffers of
another dtype than float32 or float64 (bfloat16 rounds to 2e-3), a subclass whose forward is its
own (its update may be anything), SyncBatchNorm under torch.distributed (its update carries every
rank's batch), and momentum None off the CPU (its factor would take a host read per layer).

The non-finite count: read from the input on a GPU (a device-side count, no host sync); on the
CPU, where a host check costs nothing, the input is read only when the statistics read back are
not finite (a NaN or infinity in the input always makes them so).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

MIN_UPDATE_FACTOR = 1e-3

_PRECISE = (torch.float32, torch.float64)


@dataclass(frozen=True)
class RunningBefore:
    """A layer's running buffers before its training call, and the factor its update will weigh the batch by."""

    running_mean: torch.Tensor
    running_var: torch.Tensor
    factor: float


def update_factor(module: nn.Module) -> float | None:
    """The factor the coming call's update weighs its batch by, when its statistics are read back from it.

    Returns:
        momentum, or 1 / (num_batches_tracked + 1) when momentum is None; None when the statistics
        are read from the input instead (the cases the module docstring lists).
    """
    forward = type(module).forward
    if forward is nn.SyncBatchNorm.forward:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return None
    elif forward is not nn.modules.batchnorm._BatchNorm.forward:
        return None
    running = _running(module)
    if not (module.training and getattr(module, "track_running_stats", False)) or running is None:
        return None
    if any(t.dtype not in _PRECISE for t in running):
        return None
    momentum = getattr(module, "momentum", None)
    if momentum is not None:
        factor = float(momentum)
    else:
        tracked = module._buffers.get("num_batches_tracked")
        if tracked is None or tracked.device.type != "cpu":
            return None
        factor = 1.0 / (int(tracked) + 1)
    return factor if factor >= MIN_UPDATE_FACTOR else None


def running_before(module: nn.Module) -> RunningBefore | None:
    """Clone the running buffers before a call whose statistics will be read back from its update; None otherwise."""
    factor, running = update_factor(module), _running(module)
    if factor is None or running is None:
        return None
    return RunningBefore(running[0].detach().clone(), running[1].detach().clone(), factor)


def read_back_statistics(module: nn.Module, before: RunningBefore, x: torch.Tensor) -> torch.Tensor:
    """Read back from the update: the same vector as ``input_statistics``, float64 on the device."""
    running = _running(module)
    if running is None:  # the buffers were taken away during the call: nothing to read back
        return input_statistics(module, x)
    mean_after, var_after = (t.detach().double() for t in running)
    mean_before, var_before = before.running_mean.double(), before.running_var.double()
    channels = mean_after.numel()
    values = x.numel() // channels if channels else 0
    batch_mean = mean_before + (mean_after - mean_before) / before.factor
    batch_var_unbiased = var_before + (var_after - var_before) / before.factor
    statistics = torch.cat(
        [batch_mean, (batch_var_unbiased * ((values - 1) / values)).clamp_min(0.0), mean_after, var_after]
    )
    if x.device.type == "cpu" and bool(torch.isfinite(statistics).all()):
        nonfinite = torch.zeros(1, dtype=torch.float64)
    else:
        nonfinite = (~torch.isfinite(x)).sum().double().reshape(1)
    return torch.cat([statistics, nonfinite])


def _running(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    mean, var = module._buffers.get("running_mean"), module._buffers.get("running_var")
    return (mean, var) if mean is not None and var is not None else None


def input_statistics(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Read from the input: batch_mean, batch_var (biased), running_mean, running_var after the update,
    non-finite count, as one float64 vector (the running statistics only where the layer has them)."""
    values = x if x.dtype == torch.float64 else x.float()
    dims = [0, *range(2, x.dim())]
    batch_var, batch_mean = torch.var_mean(values, dim=dims, correction=0)
    running = [getattr(module, name, None) for name in ("running_mean", "running_var")]
    running_parts = [t.detach().double().reshape(-1) for t in running if isinstance(t, torch.Tensor)]
    nonfinite = (~torch.isfinite(x)).sum().double().reshape(1)
    return torch.cat([batch_mean.double(), batch_var.double(), *running_parts, nonfinite])
