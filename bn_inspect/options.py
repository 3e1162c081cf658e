"""User choices: string enums whose values are the CLI spellings, and the options the commands share (no torch)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any


class Mode(str, Enum):
    """How the model runs: as deployed (eval) or as in training (batch statistics)."""

    EVAL = "eval"
    TRAIN = "train"


class OutputFormat(str, Enum):
    """How the report is written."""

    TABLE = "table"
    JSON = "json"
    CSV = "csv"
    MARKDOWN = "markdown"
    HTML = "html"


class CheckFormat(str, Enum):
    """How `bn-inspect check` writes its findings."""

    TABLE = "table"
    JSON = "json"
    MARKDOWN = "markdown"
    JUNIT = "junit"
    HTML = "html"


class ListingFormat(str, Enum):
    """How `bn-inspect layers` writes its listing."""

    TABLE = "table"
    JSON = "json"
    MARKDOWN = "markdown"


class RunFormat(str, Enum):
    """How `bn-inspect compare-modes`, `recalibrate` and `diff` write their results."""

    TABLE = "table"
    JSON = "json"
    MARKDOWN = "markdown"
    HTML = "html"


class RecalibrationChoice(str, Enum):
    """How `bn-inspect recalibrate` recomputes running statistics (sequential, the default, is exact for eval)."""

    SEQUENTIAL = "sequential"
    PRECISE = "precise"


class FailOn(str, Enum):
    """The lowest severity that makes `bn-inspect check` exit 1."""

    ERROR = "error"
    WARNING = "warning"


class TimelineFailOn(str, Enum):
    """The lowest severity of a timeline's events that makes `bn-inspect timeline` exit 1; never: none."""

    ERROR = "error"
    WARNING = "warning"
    INFO = "info"
    NEVER = "never"


class Explain(str, Enum):
    """How the table output of `bn-inspect inspect` explains each layer's reduction."""

    GROUPED = "grouped"
    ALL = "all"


class Precision(str, Enum):
    """The number format a model is deployed in, for check's folding rules (BN402-BN404)."""

    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"


class DeviceChoice(str, Enum):
    """Where the model runs; auto picks CUDA when it is available."""

    CPU = "cpu"
    CUDA = "cuda"
    AUTO = "auto"


@dataclass(frozen=True)
class RunOptions:
    """What the commands that run data share: the model, the data, and how to run them.

    Field names are the CLI's parameter names, so a command builds it with ``RunOptions.of(locals())``.
    """

    model: Path | None = None
    arch: str | None = None
    arch_kwargs: str | None = None
    trust_pickle: bool = False
    trust_remote_code: bool = False
    shape: str | None = None
    input_file: Path | None = None
    input_key: str | None = None
    drop_column: tuple[str, ...] = ()
    batch_size: int | None = None
    batches: int | None = None
    # Every batch holds exactly batch_size samples, a short last one left out: an ONNX graph fixes the size.
    whole_batches: bool = False
    seed: int = 0
    mode: Mode = Mode.EVAL
    device: DeviceChoice = DeviceChoice.CPU
    output: Path | None = None
    quiet: bool = False
    report: Path | None = None
    baseline: Path | None = None
    write_baseline: Path | None = None
    force: bool = False
    resize: int | None = None
    crop: int | None = None
    normalize: str | None = None
    grayscale: bool = False
    channels_last: bool = False
    workers: int | None = None
    strict_data: bool = False
    data: str | None = None

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> RunOptions:
        """The options among ``values`` (a command's parameters); the others are left at their defaults."""
        chosen = {f.name: values[f.name] for f in fields(cls) if f.name in values}
        chosen["drop_column"] = tuple(chosen.get("drop_column") or ())
        return cls(**chosen)
