"""Batches fitted to a torch.export program's input specification (the batch size it was exported for)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from bn_inspect.errors import InputError

if TYPE_CHECKING:
    from torch import nn

    from bn_inspect.analyses.session import RunObserver
    from bn_inspect.data.batch import Batch


class ExportedBatches:
    """Batches fitted to a torch.export program's input specification, or refused in one line.

    A program exported without ``dynamic_shapes`` runs only the batch size it was exported with:
    the samples are regrouped into batches of that size. Per-channel moments merge exactly across
    batches, so in eval mode this changes nothing a layer reports; samples that do not fill a last
    batch cannot run, and a note says how many were left out. Iterable again if ``batches`` is.
    """

    def __init__(self, module: nn.Module, batches: Iterable[Batch], observer: RunObserver) -> None:
        from bn_inspect.model.graph import exported_input_shapes

        shapes = exported_input_shapes(module)
        self._expected = shapes[0] if shapes else None
        self._batches, self._observer = batches, observer
        self._noted: set[str] = set()

    def __iter__(self) -> Iterator[Batch]:
        from bn_inspect.data.batch import regroup_batches

        checked = (self._checked(batch) for batch in self._batches)
        size = self._expected[0] if self._expected else None
        if size is None:
            return checked
        return regroup_batches(checked, size, self._note_left_out)

    def _checked(self, batch: Batch) -> Batch:
        from bn_inspect.data.shapes import shape_fix, spell_shape

        expected = self._expected
        if expected is None or not batch.args:
            return batch
        shape = tuple(batch.args[0].shape)
        fits = len(shape) == len(expected) and all(
            e is None or e == s for e, s in zip(expected[1:], shape[1:], strict=True)
        )
        if not fits:
            raise InputError(
                f"this torch.export archive takes input of shape {spell_shape(expected)}, and the data's batches "
                f"have shape {shape}",
                shape_fix(shape, expected),
            )
        if expected[0] is not None and shape[0] != expected[0]:
            self._note_once(
                f"note: this torch.export archive was exported for batches of exactly {expected[0]} samples, so "
                f"the data runs in batches of {expected[0]}; per-channel statistics merge exactly across batches, "
                "so regrouping loses nothing."
            )
        return batch

    def _note_left_out(self, count: int) -> None:
        if count:
            self._note_once(
                f"note: {count} sample(s) at the end did not fill a batch of {self._expected and self._expected[0]} "
                "and were left out: the archive cannot run another batch size."
            )

    def _note_once(self, message: str) -> None:
        # Recalibration reads the batches several times; a note is said once.
        if message not in self._noted:
            self._noted.add(message)
            self._observer.note(message)
