"""What a run's data is, in the terms a recalibration record keeps, and the note when it is not the recalibration's data."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from bn_inspect.report.provenance import RecalibrationData, RecalibrationProvenance
from bn_inspect.text import Untrusted
from bn_inspect.version import __version__

if TYPE_CHECKING:
    from bn_inspect.analyses.session import RunObserver
    from bn_inspect.options import RunOptions


def run_data(options: RunOptions, num_samples: int) -> RecalibrationData | None:
    """The data of a run: its path as given (or --data spec), the options that change its values, its sample count.

    None for random input (--shape, or no data option), which no record describes.
    """
    if options.input_file is not None:
        paths = (Untrusted(str(options.input_file)),)
    elif options.data is not None:
        paths = (Untrusted(f"--data {options.data}"),)
    else:
        return None
    spelled = [
        *([f"--input-key {options.input_key}"] if options.input_key else []),
        *(f"--drop-column {column}" for column in options.drop_column),
        *([f"--resize {options.resize}"] if options.resize is not None else []),
        *([f"--crop {options.crop}"] if options.crop is not None else []),
        *([f"--normalize {options.normalize}"] if options.normalize else []),
        *(["--grayscale"] if options.grayscale else []),
    ]
    options_spelled = tuple(Untrusted(option) for option in spelled)
    return RecalibrationData(paths, Untrusted(str(Path.cwd())), options_spelled, num_samples)


def provenance_of(
    options: RunOptions, method: str, num_samples: int, sha256: str | None
) -> RecalibrationProvenance | None:
    """The record of a recalibration of options.model on the options' data (None without a model file or data)."""
    data = run_data(options, num_samples)
    if options.model is None or data is None:
        return None
    return RecalibrationProvenance(
        source_model=Untrusted(str(options.model)),
        source_sha256=None if sha256 is None else Untrusted(sha256),
        data=data,
        method=Untrusted(method),
        bn_inspect_version=Untrusted(__version__),
    )


def recalibration_data_note(options: RunOptions, num_samples: int | None, observer: RunObserver) -> str | None:
    """The one line that says the model's statistics were recalibrated on other data than this run's, else None.

    A record the model file holds but that cannot be read is said once through ``observer`` and ignored.
    """
    from bn_inspect.model.provenance import read_stored_record

    current = None if num_samples is None else run_data(options, num_samples)
    if options.model is None or current is None:
        return None
    stored = read_stored_record(Path(options.model))
    if stored.ignored_because is not None:
        observer.note(
            f"note: {Untrusted(str(options.model)).inert()} holds a bn-inspect recalibration record that is "
            f"ignored: {stored.ignored_because}."
        )
    return None if stored.record is None else stored.record.note_for(current)
