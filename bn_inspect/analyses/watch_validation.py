"""The timeline records of a validation run: its sample (phase "validation") and its train/eval gap.

The statistics come from engine/validation_capture.py: each layer call's eval-mode input over the
whole run against the running statistics it was normalized with. The sample's per-layer summary is
the training samples' (report/watch_records.py: ``summarize``), so the two phases read alike; the
gap names each layer's departure, the largest over its calls where a layer is called several times.
"""

from __future__ import annotations

from collections.abc import Sequence

from bn_inspect.engine.validation_capture import EvalCall
from bn_inspect.report.departure import Thresholds
from bn_inspect.report.watch_records import CallStatistics, sample_record, summarize, validation_record


def call_statistics(call: EvalCall) -> CallStatistics:
    """One validation call as the watch's per-call statistics.

    Nothing trains during validation, so the parameters did not change; the running buffers changed
    only where a layer was left in training mode (it then updates them with every batch).
    """
    return CallStatistics(
        layer=call.layer,
        call=call.call,
        values_per_channel=call.values_per_channel,
        samples=call.samples,
        batch_mean=call.batch_mean,
        batch_var=call.batch_var,
        running_mean=call.running_mean,
        running_var=call.running_var,
        eps=call.eps,
        nonfinite=call.nonfinite,
        buffers_changed=call.training and call.has_running,
        params_changed=False,
        params_requires_grad=call.params_requires_grad,
        training=call.training,
        has_running=call.has_running,
        has_affine=call.has_affine,
    )


def validation_records(
    step: int, rank: int, calls: Sequence[EvalCall], thresholds: Thresholds | None = None
) -> list[dict[str, object]]:
    """The validation sample and the gap record of a run at ``step`` (none when no layer was called)."""
    if not calls:
        return []
    summaries = [summarize(call_statistics(call), thresholds) for call in calls]
    largest: dict[str, float | None] = {}
    for summary in summaries:
        score = summary.departure
        known = largest.get(summary.layer)
        if summary.layer not in largest or (score is not None and (known is None or score > known)):
            largest[summary.layer] = score
    return [
        sample_record(step, rank, summaries, phase="validation"),
        validation_record(step, rank, list(largest.items())),
    ]
