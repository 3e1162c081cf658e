"""``bn_inspect.watch``: watch a model's BatchNorm layers while it trains, and write what happens to a timeline.

    with bn_inspect.watch(model, "runs/bn-watch.jsonl", every=50) as watch:
        for x, y in loader:
            loss_fn(model(x), y).backward()
            ...
    print(watch.summary())

A step is one training-mode forward of the model (``watch.step(global_step)`` names it instead).
Every ``every`` steps a sample records each layer call's statistics; every step is checked for
non-finite values and too small batches (engine/watching.py says how cheaply). The timeline's
records are those of report/watch_records.py; the events, BN501-BN506, those of report/watch_rules.py.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import torch
from torch import nn

from bn_inspect.boundary.writing import AppendFile, Destination, create_append_file
from bn_inspect.engine.watch_compiling import compile_refusal
from bn_inspect.engine.watching import StepObservation, TrainingHooks, ValidationMoments, WatchedModule
from bn_inspect.errors import OutputError, WatchError
from bn_inspect.model.modules import refuse_lazy_modules
from bn_inspect.report.departure import Thresholds
from bn_inspect.report.watch_records import (
    CallStatistics,
    WatchedLayer,
    WatchEvent,
    end_record,
    event_record,
    grouped_event_lines,
    header_record,
    json_line,
    sample_record,
    summarize,
    validation_record,
)
from bn_inspect.report.watch_rules import WatchRules
from bn_inspect.version import __version__

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def rank_path(path: Path, rank: int) -> Path:
    """This rank's timeline: ``path`` for rank 0, ``.rank<r>`` before the suffix for the others."""
    if rank == 0:
        return path
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _watched_modules(model: nn.Module) -> list[WatchedModule]:
    found: list[WatchedModule] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            found.append(WatchedModule(len(found), name or type(module).__name__, module, int(module.num_features)))
    return found


def _unwrapped(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise WatchError(f"watch takes a torch.nn.Module, not {type(model).__name__}", "Pass the model you train")
    if type(model).__name__ == "OptimizedModule":
        raise WatchError(
            "the model is compiled (torch.compile), and its compiled graphs skip the hooks the watch adds",
            "Watch the uncompiled model (model._orig_mod) while diagnosing",
        )
    if type(model).__name__ == "DataParallel":
        raise WatchError(
            "DataParallel runs copies of the model in threads, which the watch's hooks cannot follow",
            "Train with DistributedDataParallel (one process per GPU), or watch a single-device run",
        )
    inner = getattr(model, "module", None)
    # DDP calls its module, whose layers carry the names a checkpoint uses.
    if type(model).__name__ == "DistributedDataParallel" and isinstance(inner, nn.Module):
        return inner
    return model


# What the periodic per-channel detail of one timeline may take: with a ResNet-50's 26,560 channels
# a detailed sample is about 1 MB, so 2,000 samples with detail at every 20th would be 100 MB.
DETAIL_BUDGET_BYTES = 12 * 2**20


class DetailBudget:
    """When the periodic per-channel detail is written: every ``detail_every``-th sample while it is
    cheap, ever more rarely as it fills its budget, never past it.

    The interval doubles each time the detail written reaches 1/2, 3/4, 7/8, ... of the budget, so
    that a large model's detail spreads over more of the run; a detail that would pass the budget is
    not written, and once it is spent only events carry detail. Detail at events does not count: it
    is small (the layers concerned) and always written.
    """

    def __init__(self, detail_every: int, budget: int = DETAIL_BUDGET_BYTES) -> None:
        self.interval = detail_every
        self.budget = budget
        self.written = 0
        self._halvings = 1

    def take(self, size: int) -> bool:
        """Whether a periodic detail of ``size`` bytes is written now (and counted, if so)."""
        if self.written + size > self.budget:
            return False
        self.written += size
        # Bounded: past 50 halvings the threshold is the budget itself, which nothing more can reach.
        while self._halvings <= 50 and self.written >= self.budget * (1 - 0.5**self._halvings):
            self.interval *= 2
            self._halvings += 1
        return True


class Watch:
    """A watch over one model's BatchNorm layers during training; use it as a context manager.

    Attributes:
        events: the events found so far, in the order they were found.
        path: this rank's timeline file.
        steps: the training forwards seen so far.
        samples: the samples written so far.
    """

    def __init__(
        self,
        model: nn.Module,
        path: str | Path,
        *,
        every: int = 50,
        detail_every: int = 20,
        print_events: bool = False,
        thresholds: Thresholds | None = None,
    ) -> None:
        for name, value in (("every", every), ("detail_every", detail_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise WatchError(f"{name} must be a whole number of at least 1, not {value!r}", f"Pass {name}=50")
        if not str(path).strip():
            raise OutputError("the timeline's path is empty", "Pass a new file's path, e.g. runs/bn-watch.jsonl")
        self.model = _unwrapped(model)
        refuse_lazy_modules(self.model, ", so its layers' channels are unknown", "Run one forward before watching")
        self.layers = _watched_modules(self.model)
        if not self.layers:
            raise WatchError("the model has no BatchNorm layer to watch", "Check that this is the model you train")
        self.rank, self.world_size = _distributed()
        self.path = rank_path(Path(path), self.rank)
        self.every, self.detail_every = every, detail_every
        self.print_events = print_events
        self.thresholds = thresholds or Thresholds()
        self.rules = WatchRules(self.thresholds, rank=self.rank)
        self.events: list[WatchEvent] = []
        self.samples = 0
        self._file: AppendFile | None = None
        self._divergence: list[WatchEvent | None] = []
        self._detail = DetailBudget(detail_every)
        # Named by step(): the first and the last step named, and how many were named (each change counts).
        self._named: tuple[int, int, int] | None = None
        self._hooks = TrainingHooks(
            self.model,
            self.layers,
            every=every,
            min_values=self.thresholds.min_values,
            on_step=self._on_step,
            on_sample_begin=self._compare_ranks if self.world_size > 1 else None,
        )

    @property
    def steps(self) -> int:
        """How many training forwards the watch has seen."""
        return self._hooks.count

    def step(self, global_step: int) -> None:
        """Name the step the next training forwards belong to (a trainer's global step), instead of counting forwards."""
        if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 0:
            raise WatchError(f"the step must be a whole number of at least 0, not {global_step!r}", "Pass global_step")
        self._hooks.explicit_step = global_step
        if self._named is None:
            self._named = (global_step, global_step, 1)
        elif global_step != self._named[1]:
            self._named = (self._named[0], global_step, self._named[2] + 1)

    def __enter__(self) -> Watch:
        self._file = create_append_file(self.path, Destination.TIMELINE)
        try:
            self._write(
                header_record(
                    version=__version__,
                    rank=self.rank,
                    world_size=self.world_size,
                    every=self.every,
                    detail_every=self.detail_every,
                    model=type(self.model).__name__,
                    created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    layers=[WatchedLayer(w.name, type(w.module).__name__, w.channels) for w in self.layers],
                )
            )
            self._file.sync()
            self._hooks.install()
        except BaseException:
            self._hooks.remove()
            self._file.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._hooks.remove()
        # The watch's own refusal, when it refuses, is what ended the block: the end record names it.
        refusal = compile_refusal(error) if error is not None else None
        if error is None and self.steps == 0:
            refusal = WatchError(
                "the watch saw no training-mode forward of the model, so it recorded nothing",
                "Call the model given to watch (not a compiled copy) in training mode inside the with block",
            )
        try:
            found = self._hooks.flush_nonfinite()
            if found is not None:
                self._record([self._nonfinite(found.step, found.layer, found.tensors)])
            last = max(self._hooks.count - 1, 0) if self._hooks.explicit_step is None else self._hooks.explicit_step
            self._write(
                end_record(
                    last,
                    self.rank,
                    steps=self.steps,
                    samples=self.samples,
                    events=len(self.events),
                    raised=refusal if refusal is not None else error,
                )
            )
        finally:
            if self._file is not None:
                self._file.close()
        if refusal is not None:
            raise refusal from error

    @contextmanager
    def validation(self) -> Iterator[None]:
        """Measure the train/eval gap over the eval forwards in this block, and record it in the timeline.

        The inputs of every layer call in the block's eval-mode forwards are pooled exactly; at the
        end a sample of phase "validation" (each call's summary of the pooled statistics) and each
        layer's departure score of the pooled statistics from its running statistics (the largest
        over its calls) as a validation record are written at the current step. The forwards are
        not steps.
        """
        pooled = ValidationMoments()
        self._hooks.validation = pooled
        try:
            yield
        finally:
            self._hooks.validation = None
        summaries = [summarize(call, self.thresholds) for call in pooled.results()]
        gaps: dict[str, float | None] = {}
        for summary in summaries:
            score = summary.departure
            best = gaps.get(summary.layer)
            gaps[summary.layer] = score if best is None or (score is not None and score > best) else best
        step = self._hooks.explicit_step if self._hooks.explicit_step is not None else max(self._hooks.count - 1, 0)
        if summaries:
            self._write(sample_record(step, self.rank, summaries, phase="validation"))
        self._write(validation_record(step, self.rank, list(gaps.items())))
        if self._file is not None:
            self._file.sync()

    def summary(self) -> str:
        """What the watch found, as text: one line per event (an event on several layers at one step
        as one line listing them), then the counts and the timeline's path.

        With ``step(global_step)`` the steps named and the training forwards are counted apart (with
        gradient accumulation a step is several forwards).
        """
        lines = grouped_event_lines(self.events)
        watched = f"{_counted(self.steps, 'training step')} watched"
        if self._named is not None:
            first, last, count = self._named
            watched = (
                f"{_counted(count, 'step')} named ({first:,} to {last:,}), {_counted(self.steps, 'training forward')}"
            )
        lines.append(
            f"{watched}, {_counted(self.samples, 'sample')}, {_counted(len(self.events), 'event')}; timeline: {self.path}"
        )
        return "\n".join(lines)

    def _write(self, record: dict[str, object]) -> None:
        if self._file is not None:
            self._file.write_line(json_line(record))

    def _record(self, events: list[WatchEvent | None]) -> list[WatchEvent]:
        found = [e for e in events if e is not None]
        for event in found:
            self.events.append(event)
            self._write(event_record(event))
            if self.print_events:
                print(event.line(), file=sys.stderr)
        return found

    def _on_step(self, observation: StepObservation) -> None:
        step = observation.step
        found = [self.rules.few_values(step, name, values) for name, values in observation.few_values]
        if observation.nonfinite is not None:
            first = observation.nonfinite
            found.append(self._nonfinite(first.step, first.layer, first.tensors))
        if observation.is_sample:
            self._sample(step, observation.calls, found)
        elif self._record(found) and self._file is not None:
            self._file.sync()

    def _nonfinite(self, step: int, layer: str, tensors: tuple[str, ...]) -> WatchEvent | None:
        follows = any(w.name == layer and w.follows_input() for w in self.layers)
        return self.rules.nonfinite(step, layer, tensors, follows_input=follows)

    def _sample(self, step: int, calls: tuple[CallStatistics, ...], found: list[WatchEvent | None]) -> None:
        summaries = [summarize(call, self.thresholds) for call in calls]
        momenta = {w.name: float(m) for w in self.layers if (m := getattr(w.module, "momentum", None)) is not None}
        found.extend(self.rules.judge_sample(step, summaries, momenta))
        found.extend(self._divergence)
        self._divergence = []
        events = [e for e in found if e is not None]
        named = {e.layer for e in events if e.step == step}
        line = json_line(sample_record(step, self.rank, summaries, [c for c in calls if c.layer in named]))
        if self.samples % self._detail.interval == 0:
            detailed = json_line(sample_record(step, self.rank, summaries, calls))
            if self._detail.take(len(detailed) - len(line)):
                line = detailed
        if self._file is not None:
            self._file.write_line(line)
        self.samples += 1
        self._record(list(events))
        if self._file is not None:
            self._file.sync()

    def _compare_ranks(self, step: int, group: ProcessGroup | None = None) -> None:
        """BN504 at a sample step, on the buffers as the step's forward finds them (DDP has broadcast
        its buffers by then, if it does; each rank's own update has not happened yet)."""
        self._divergence = self._rank_divergence(step, group)

    def _rank_divergence(self, step: int, group: ProcessGroup | None) -> list[WatchEvent | None]:
        from bn_inspect.distributed.divergence import running_spread

        buffers = [
            (w.name, name, tensor)
            for w in self.layers
            for name, tensor in w.tensors()
            if name in ("running_mean", "running_var")
        ]
        if not buffers:
            return []
        spread = running_spread(torch.cat([t.detach().reshape(-1).double() for *_, t in buffers]), group).tolist()
        largest: dict[str, tuple[float, str]] = {}
        offset = 0
        for layer, name, tensor in buffers:
            block = spread[offset : offset + tensor.numel()]
            offset += tensor.numel()
            value = max(block) if block else 0.0
            if value > largest.get(layer, (0.0, name))[0]:
                largest[layer] = (value, name)
        return [self.rules.rank_divergence(step, layer, value, name) for layer, (value, name) in largest.items()]


def _counted(number: int, noun: str) -> str:
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


def watch(
    model: nn.Module,
    path: str | Path,
    *,
    every: int = 50,
    detail_every: int = 20,
    print_events: bool = False,
    thresholds: Thresholds | None = None,
) -> Watch:
    """Watch ``model``'s BatchNorm layers while it trains, writing a timeline to ``path``; use it in a ``with`` block.

    Args:
        model: the model the loop trains (a DistributedDataParallel wrapper is looked through).
        path: the timeline to create (JSON lines; never an existing file). Under torch.distributed
            rank r > 0 writes ``<stem>.rank<r><suffix>`` beside it.
        every: record a sample every ``every`` steps (step 0 included).
        detail_every: add the per-channel statistics every ``detail_every``-th sample (and at events).
        print_events: print each event to stderr as it is found; otherwise nothing is printed.
        thresholds: the departure tiers (BN506) and the minimum values per channel (BN505).

    Returns:
        The ``Watch``: its ``events`` so far, ``step(global_step)``, ``summary()``.

    Raises:
        WatchError: the model is compiled (before the watch, or inside it: at the first compiled
            forward of the model, of a module holding it or of one of its layers) or wrapped in
            DataParallel, has no BatchNorm layer or unmaterialized lazy ones, the settings are not
            whole numbers of at least 1, or (at the end of a block that raised nothing) no training
            forward was seen.
        OutputError: ``path`` is empty, exists in any form, or its folder is missing or not writable.
    """
    return Watch(model, path, every=every, detail_every=detail_every, print_events=print_events, thresholds=thresholds)
