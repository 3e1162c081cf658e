"""The sequential method: trace which layers each layer's input depends on, recalibrate them in waves, check the result."""

from __future__ import annotations

from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from bn_inspect.analyses.resuming import Resumer
from bn_inspect.analyses.runner import DependencyTracer, Runner, Seen, Target
from bn_inspect.data.memory import available_memory_bytes
from bn_inspect.engine.moments import Moments

Floats = tuple[float, ...]

if TYPE_CHECKING:
    from bn_inspect.distributed.context import DistributedContext


@dataclass(frozen=True)
class Measurement:
    """What the passes of a recalibration measured, per layer name.

    Attributes:
        seen: each layer's inputs the new statistics come from.
        given: each layer's inputs in the model as given, before any statistic changed (eval mode
            for ``sequential``; for ``precise``, its one train-mode pass: ``seen`` itself).
        waves: the pass whose data gave each layer's statistics (0 for ``precise``).
        notes: what the user should know about how the passes ran.
        check: an eval pass of the recalibrated model (``sequential`` only, else None).
    """

    seen: dict[str, Seen]
    given: dict[str, Seen]
    waves: dict[str, int]
    notes: list[str]
    check: dict[str, Seen] | None


def run_sequential(
    runner: Runner, targets: dict[str, Target], *, trace: bool, memory_budget_bytes: int | None = None
) -> Measurement:
    """Measure every layer in eval mode once all layers it depends on hold their new statistics.

    The first pass measures the model as given; a final eval pass of the recalibrated model
    checks that no dependency was missed. The wave passes resume from activations held at module
    boundaries (``Resumer``), within ``memory_budget_bytes`` (default: half the memory available).
    """
    tracer = DependencyTracer(targets) if trace else None
    resumer = None
    if tracer is not None and not runner.is_script:
        budget = available_memory_bytes() // 2 if memory_budget_bytes is None else memory_budget_bytes
        resumer = Resumer(runner.model, targets, budget)
    first = runner.run(list(targets.values()), training=False, tracer=tracer, resumer=resumer)
    order = list(first)  # execution order of first calls
    notes = []
    if tracer is not None and runner.ranks is not None:
        _share_dependencies(tracer, runner.ranks)
    is_chain = tracer is None or tracer.has_data_dependent_control_flow
    stoppable = tracer is None or not tracer.has_data_dependent_control_flow
    waves: dict[str, int] = {}
    for position, name in enumerate(order):
        if tracer is None or is_chain:
            waves[name] = position
            continue
        # A layer whose batch-norm kernel was never traced (a custom forward) may depend on any
        # earlier layer; a dependency on a later layer can only come from a module called twice.
        upstream = tracer.depends[name] if name in tracer.depends else set(order[:position])
        waves[name] = 1 + max((waves[u] for u in upstream if u in waves), default=-1)
    if tracer is not None and tracer.has_data_dependent_control_flow:
        notes.append(
            "a value computed from running statistics was read into Python (data-dependent control flow): "
            "one layer per pass, each pass run to the end"
        )
    if not stoppable:
        resumer = None  # the trace, which says what a held activation depends on, cannot be trusted
    seen = {name: first[name] for name in order if waves[name] == 0}
    _measure_waves(runner, targets, first, order, waves, seen, stoppable=stoppable, start=1, resumer=resumer)
    if resumer is not None and resumer.is_over_budget:
        notes.append(
            f"the activations held to resume the passes reached their memory budget "
            f"({resumer.budget_bytes / 2**30:,.2f} GiB; by default half the memory available): "
            "past it, batches ran their passes from further back, with the same result"
        )
    check = _check_pass(runner, targets, order, seen)
    wrong = _first_disagreeing(order, seen, check, targets)
    if wrong is not None:
        # Something the trace could not see (a C++ extension writing its output directly, say)
        # hid a dependency: redo the layers from there on one per pass, which needs no trace.
        last = max(waves.values())
        for offset, name in enumerate(order[order.index(wrong) :]):
            waves[name] = last + 1 + offset
        notes.append(
            f"the dependency trace missed a dependency of {wrong}: it and the layers after it were "
            "recalibrated again, one per pass"
        )
        # The trace missed something, so nothing is held: every pass runs from the data.
        _measure_waves(runner, targets, first, order, waves, seen, stoppable=stoppable, start=last + 1, resumer=None)
        check = _check_pass(runner, targets, order, seen)
    return Measurement({name: seen[name] for name in order if name in seen}, first, waves, notes, check)


def _share_dependencies(tracer: DependencyTracer, context: DistributedContext) -> None:
    """Give every rank the union of all ranks' traced dependencies, so all plan the same waves.

    A rank sees only the paths its own data took (none at all without batches); the union of
    what all ranks saw is what one process over all the data would have seen.
    """
    local = {
        "depends": {name: sorted(upstream) for name, upstream in tracer.depends.items()},
        "control_flow": tracer.has_data_dependent_control_flow,
    }
    from bn_inspect.distributed.collectives import gather_json

    for seen in gather_json(local, context.group, "sharing the traced dependencies"):
        for name, upstream in seen["depends"].items():
            tracer.depends[name] |= set(upstream)
        tracer.has_data_dependent_control_flow |= bool(seen["control_flow"])


def _measure_waves(
    runner: Runner,
    targets: dict[str, Target],
    first: dict[str, Seen],
    order: list[str],
    waves: dict[str, int],
    seen: dict[str, Seen],
    *,
    stoppable: bool,
    start: int,
    resumer: Resumer | None,
) -> None:
    """One eval pass per wave from ``start``, each after writing everything measured so far.

    With a resumer (see there) each pass runs only from the activations held before this wave's
    layers, so a chain of L layers costs about one forward per batch in all instead of L / 2.
    Inside the session the written statistics are undone on exit; ``_check_pass`` and
    ``recalibrate`` write them all again.
    """
    last = max(waves.values(), default=0)
    members_of: dict[int, list[str]] = defaultdict(list)
    for name in order:
        members_of[waves[name]].append(name)
    if resumer is not None:
        resumer.plan(waves)
    with runner.eval_session() if resumer is not None else nullcontext():
        changed = [name for name in order if name in seen]
        for wave in range(start, 1 + last):
            # Buffers written earlier stay written (each pass restores what it found), so only the
            # statistics measured by the previous pass need writing.
            for name in changed:
                write_statistics(targets[name], seen[name])
            members = members_of[wave]
            if resumer is not None:
                resumer.begin_wave(wave)
            stop_after = {n: first[n].calls_per_forward for n in members} if stoppable else None
            measured = runner.run([targets[n] for n in members], training=False, stop_after=stop_after, resumer=resumer)
            changed = [name for name in members if name in measured]
            seen.update({name: measured[name] for name in changed})


def _check_pass(runner: Runner, targets: dict[str, Target], order: list[str], seen: dict[str, Seen]) -> dict[str, Seen]:
    for name in order:
        if name in seen:
            write_statistics(targets[name], seen[name])
    return runner.run([targets[name] for name in order if name in seen], training=False)


# How far an eval pass of the recalibrated model may sit from the statistics it was given, in
# running standard deviations (mean) and relative variance: rounding of the buffers and of
# reductions in another order is ~1e-7; a layer measured before an upstream change is far off.
_AGREEMENT = 1e-3


def _first_disagreeing(
    order: list[str], seen: dict[str, Seen], check: dict[str, Seen], targets: dict[str, Target]
) -> str | None:
    """The first layer whose eval input does not have the statistics it was recalibrated to."""
    for name in order:
        written, measured = seen.get(name), check.get(name)
        if written is None or measured is None or written.calls_per_forward > 1 or unusable_reason(written):
            continue  # a module called twice cannot agree exactly (see the result's notes)
        mean, biased = written.moments.mean, written.moments.biased_var()
        measured_mean, measured_biased = measured.moments.mean, measured.moments.biased_var()
        scale = biased + (targets[name].layer.eps or 0.0)
        z = (measured_mean - mean).abs() / scale.sqrt()
        ratio = (measured_biased - biased).abs() / scale
        if not bool((z <= _AGREEMENT).all() & (ratio <= _AGREEMENT).all()):
            return name
    return None


def new_statistics(moments: Moments) -> tuple[torch.Tensor, torch.Tensor]:
    """What recalibration writes: the population mean and the unbiased population variance."""
    return moments.mean, moments.unbiased_var()


def unusable_reason(seen: Seen) -> str | None:
    """Why these statistics must not be written, or None."""
    moments = seen.moments
    if moments.values_per_statistic < 2 or moments.values_per_channel < 2:
        return "fewer than 2 values per channel on these batches: no unbiased variance"
    mean, var = new_statistics(moments)
    if not bool(torch.isfinite(mean).all() & torch.isfinite(var).all()):
        return "its input held NaN or Inf on these batches"
    return None


def write_statistics(target: Target, seen: Seen) -> None:
    """Write the new statistics into the layer's buffers, unless they are unusable."""
    if unusable_reason(seen) is not None:
        return  # left as it was; recalibrate lists it as skipped
    mean, var = new_statistics(seen.moments)
    with torch.no_grad():
        target.running_mean.copy_(mean.to(target.running_mean.dtype))
        target.running_var.copy_(var.to(target.running_var.dtype))
        if target.num_batches_tracked is not None:
            target.num_batches_tracked.fill_(seen.num_calls)
