"""Moments to the report's ``LayerMoments`` and back: how exact moments travel in a JSON report.

A report stores each float64 as Python's shortest repr, which reads back to the same float, so a
report's moments are the engine's to the last bit, and merging reports (``bn-inspect merge``)
folds exactly what each run held, with the one merge of engine/moments.py.
"""

from __future__ import annotations

from collections import Counter

import torch

from bn_inspect.engine.moments import ChannelMoments, InstanceMoments, Moments
from bn_inspect.report.layer_moments import LayerMoments

CHANNEL = "channel"
INSTANCE = "instance"


def layer_moments(moments: Moments, num_batches: int, batch_sizes: Counter[int]) -> LayerMoments:
    """The report's record of ``moments``, gathered over ``num_batches`` batches of ``batch_sizes``."""
    # In the order the sizes first came: the explanation lists tied sizes in that order.
    sizes = tuple(batch_sizes.items())
    if isinstance(moments, ChannelMoments):
        return LayerMoments(
            CHANNEL, moments.count, num_batches, sizes, mean=_floats(moments.mean), m2=_floats(moments.m2)
        )
    return LayerMoments(
        INSTANCE,
        moments.num_instances,
        num_batches,
        sizes,
        values_per_instance=moments.values_per_instance,
        mean_sum=_floats(moments.mean_sum),
        var_sum=_floats(moments.var_sum),
    )


def engine_moments(record: LayerMoments) -> Moments:
    """The engine's moments (float64, on the CPU) of a record ``layer_moments`` wrote and a report read back."""
    if record.kind == CHANNEL:
        return ChannelMoments(record.count, _tensor(record.mean), _tensor(record.m2))
    return InstanceMoments(
        record.count, record.values_per_instance or 0, _tensor(record.mean_sum), _tensor(record.var_sum)
    )


def _floats(tensor: torch.Tensor) -> tuple[float, ...]:
    return tuple(float(v) for v in tensor.detach().to("cpu", torch.float64).tolist())


def _tensor(values: tuple[float, ...] | None) -> torch.Tensor:
    return torch.tensor(values or (), dtype=torch.float64)
