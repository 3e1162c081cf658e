"""Write a changed model back in the format it came in: state_dict, checkpoint, safetensors, TorchScript, pickle."""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from enum import Enum
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from bn_inspect.boundary.reading import Source, run_manifest
from bn_inspect.boundary.writing import Destination, check_output_target, output_file
from bn_inspect.errors import BnInspectError, OutputError
from bn_inspect.model.archives import load_exported_program
from bn_inspect.model.files import open_model_file
from bn_inspect.model.pickles import plain_data_globals
from bn_inspect.model.provenance import METADATA_KEY, RECORD_NAME, record_bytes, with_record_entry
from bn_inspect.model.state_dict import extract_state_dict, owner_prefix, strip_prefixes
from bn_inspect.report.provenance import RecalibrationProvenance


class SaveFormat(str, Enum):
    """How a model file was stored (``LoadedModel.format``); ``save_like`` writes the same."""

    STATE_DICT = "state_dict"
    CHECKPOINT = "checkpoint"
    SAFETENSORS = "safetensors"
    TORCHSCRIPT = "torchscript"
    PICKLE = "pickle"
    TORCH_EXPORT = "torch.export"


def save_like(
    original_path: Path | str,
    loaded_format: SaveFormat | str,
    model: nn.Module,
    output_path: Path | str,
    *,
    force: bool = False,
    original: object = None,
    trust_pickle: bool = False,
    provenance: RecalibrationProvenance | None = None,
) -> Path:
    """Write ``model`` to ``output_path`` in the format its input file had.

    * state_dict: ``torch.save`` of a dict with the input's keys (``module.`` / ``_orig_mod.``
      prefixes kept) and dtypes, values taken from ``model.state_dict()``.
    * checkpoint: the input's checkpoint dict (epoch, optimizer state, ...) with its state_dict
      entry replaced the same way; other weight entries (an EMA copy) are left as they were.
    * safetensors: ``safetensors.torch.save`` with the input's keys, dtypes and metadata.
    * torchscript: ``torch.jit.save`` of ``model`` (a ScriptModule).
    * pickle: ``torch.save(model)``, or, when ``original`` is a dict holding the model, that
      dict with the model in place.
    * torch.export: the input's program, read again through the same checks as when loading
      (``trust_pickle`` as then; its sample inputs are left out), with every buffer and parameter
      taken from ``model`` (its ``ep.module()``), saved with ``torch.export.save``.

    The input file is never written: it goes into the run's manifest, so an output that is the
    input (by any spelling, symlink or hard link), or any other file the run reads, is refused, and
    so is an output that is not a regular file (a pipe, a device). The file is written through the
    writer policy (``bn_inspect.boundary.writing.output_file``): a temporary file in the output's
    folder, flushed to disk and moved into place at the run's commit (at once outside a CLI run),
    so a reader never sees a partial file, removed on any interruption; a new file's mode follows
    the umask. An existing output is refused unless ``force``, even one that appears meanwhile.

    Args:
        original_path: the model file the model was loaded from.
        loaded_format: ``LoadedModel.format`` of that load.
        model: the (recalibrated) model.
        output_path: where to write.
        force: replace an existing output file.
        original: what ``torch.load(original_path, weights_only=True)`` returned, if the caller
            still has it; for state_dict and checkpoint files it is loaded again (weights only,
            on the CPU) when omitted. Needed for a pickle whose model sits inside a dict.
        provenance: where the new statistics came from, stored in the file where every loader
            ignores it (bn_inspect/model/provenance.py); None stores nothing.

    Returns:
        The output path.

    Raises:
        OutputError: the output is the input, exists without ``force``, is a directory, pipe or
            device, its folder is missing, or the format cannot hold this model.
    """
    source, output = Path(original_path), Path(output_path)
    file_format = _save_format(loaded_format)
    with run_manifest() as manifest:
        manifest.declare(source, Source.MODEL)
        # Refused before the input is read again, which can take long.
        check_output_target(output, Destination.MODEL, force=force)
        payload = None if provenance is None else record_bytes(provenance)
        write = _writer(source, file_format, model, original, trust_pickle, payload)
        with output_file(output, Destination.MODEL, force=force) as stream:
            write(stream)
    return output


def _writer(
    source: Path, file_format: SaveFormat, model: nn.Module, original: object, trust_pickle: bool, record: bytes | None
) -> Callable[[IO[bytes]], None]:
    """What writes ``model`` (and ``record``) to a stream in ``file_format``; what it needs to read is read before the file is opened."""
    extra = {} if record is None else {RECORD_NAME: record.decode("utf-8")}
    if file_format is SaveFormat.TORCH_EXPORT:
        program = _exported_with_state(source, model, trust_pickle)

        def write(stream: IO[bytes]) -> None:
            torch.export.save(program, stream, extra_files=extra)

    elif file_format is SaveFormat.TORCHSCRIPT:
        if not isinstance(model, torch.jit.ScriptModule):
            raise OutputError(
                f"{source} is TorchScript but the model to save is an eager {type(model).__name__}",
                "Save it as a state_dict instead",
            )

        def write(stream: IO[bytes]) -> None:
            torch.jit.save(model, stream, _extra_files=extra)  # type: ignore[no-untyped-call]

    elif file_format is SaveFormat.SAFETENSORS:
        payload = _safetensors_bytes(source, model, record)

        def write(stream: IO[bytes]) -> None:
            stream.write(payload)

    elif file_format is SaveFormat.PICKLE:
        # The model was changed in place, so a dict that holds it holds the recalibrated model.
        holds_model = isinstance(original, dict) and any(value is model for value in original.values())
        document = original if holds_model else model

        def write(stream: IO[bytes]) -> None:
            _torch_save(document, stream, record)

    else:
        state_document = _state_dict_document(source, file_format, model, original)

        def write(stream: IO[bytes]) -> None:
            _torch_save(state_document, stream, record)

    return write


def _torch_save(document: object, stream: IO[bytes], record: bytes | None) -> None:
    if record is None:
        torch.save(document, stream)
        return
    # The writer's stream is write-only, and zipfile appends by reading the central directory: the
    # archive is built in memory (the model is there already) and written once.
    buffer = io.BytesIO()
    torch.save(document, buffer)
    stream.write(with_record_entry(buffer.getvalue(), record))


def _exported_with_state(source: Path, model: nn.Module, trust_pickle: bool) -> torch.export.ExportedProgram:
    """The program in ``source`` holding ``model``'s current tensors (its buffers: the new running statistics)."""
    program = load_exported_program(source, trust_pickle)
    current = model.state_dict()
    with torch.no_grad():
        for key, value in program.state_dict.items():
            new = current.get(key)
            if isinstance(new, torch.Tensor) and new.shape == value.shape:
                # In place: the program's graph reads these very tensors.
                value.copy_(new.detach().to(device=value.device, dtype=value.dtype))
    return program


def _save_format(loaded_format: SaveFormat | str) -> SaveFormat:
    try:
        return SaveFormat(loaded_format)
    except ValueError:
        raise OutputError(
            f"cannot save a model loaded as {loaded_format!r} in the same format",
            f"Formats that can be written: {', '.join(f.value for f in SaveFormat)}",
        ) from None


def _load_weights_only(source: Path) -> object:
    with open_model_file(source) as opened:
        try:
            with opened.stream() as stream, plain_data_globals():
                return torch.load(stream, map_location="cpu", weights_only=True)
        except Exception as error:
            raise OutputError(
                f"cannot read {source} again to keep its layout ({type(error).__name__})",
                "Check that the input file is still there, or pass original=",
            ) from error


def _replaced(saved: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """``saved`` with every tensor taken from the model's state_dict, keys and dtypes kept."""
    from collections import OrderedDict

    current = model.state_dict()
    # strip_prefixes keeps the order, so zipping pairs each saved key with its stripped form.
    stripped = list(strip_prefixes(dict(saved)))
    replaced: dict[str, Any] = OrderedDict()
    metadata = getattr(saved, "_metadata", None)
    if metadata is not None:
        # Module versions that load_state_dict uses to upgrade old layouts (BatchNorm's is one).
        replaced._metadata = metadata  # type: ignore[attr-defined]
    # A LightningModule's network sits under its attribute's prefix, as when it was loaded.
    prefix = owner_prefix(stripped, list(current)) or ""
    for key, short in zip(saved, stripped, strict=True):
        value = saved[key]
        new = current.get(short[len(prefix) :]) if short.startswith(prefix) else None
        if isinstance(value, torch.Tensor) and isinstance(new, torch.Tensor) and new.shape == value.shape:
            value = new.detach().to(device="cpu", dtype=value.dtype).clone()
        replaced[key] = value
    return replaced


def _state_dict_document(source: Path, file_format: SaveFormat, model: nn.Module, original: object) -> object:
    document = _load_weights_only(source) if original is None else original
    if not isinstance(document, Mapping):
        raise OutputError(f"{source} does not hold a dict any more", "Save the model as a state_dict elsewhere")
    if file_format is SaveFormat.STATE_DICT:
        return _replaced(document, model)

    try:
        weights, _ = extract_state_dict(document, source)
    except BnInspectError as error:
        raise OutputError(error.what, "Save the model as a state_dict elsewhere") from None
    # extract_state_dict returns the very tensors of the entry it chose: find that entry by identity.
    chosen = [id(t) for t in weights.values()]
    for key, value in document.items():
        if isinstance(value, Mapping) and [id(t) for t in value.values()] == chosen:
            return {**document, key: _replaced(value, model)}
    return _replaced(document, model)


def _safetensors_bytes(source: Path, model: nn.Module, record: bytes | None) -> bytes:
    from safetensors import safe_open
    from safetensors.torch import save

    with open_model_file(source) as opened:
        try:
            with safe_open(opened.library_path(), framework="pt", device="cpu") as handle:
                metadata = handle.metadata()
                saved = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
        except Exception as error:
            raise OutputError(
                f"cannot read {source} again to keep its layout ({type(error).__name__})",
                "Check that the input file is still there",
            ) from error
    if record is not None:
        metadata = {**(metadata or {}), METADATA_KEY: record.decode("utf-8")}
    return bytes(save(_replaced(saved, model), metadata=metadata))
