"""What the watch records of a sampled layer call: its batch statistics, its running statistics after the update."""

from __future__ import annotations

import torch
from torch import nn


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
