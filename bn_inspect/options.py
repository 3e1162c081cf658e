"""User choices as string enums whose values are the CLI spellings (no torch import here)."""

from __future__ import annotations

from enum import Enum


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


class CheckFormat(str, Enum):
    """How `bn-inspect check` writes its findings."""

    TABLE = "table"
    JSON = "json"
    MARKDOWN = "markdown"
    JUNIT = "junit"


class ListingFormat(str, Enum):
    """How `bn-inspect layers` writes its listing."""

    TABLE = "table"
    JSON = "json"
    MARKDOWN = "markdown"


class RecalibrationChoice(str, Enum):
    """How `bn-inspect recalibrate` recomputes running statistics."""

    PRECISE = "precise"
    SEQUENTIAL = "sequential"


class FailOn(str, Enum):
    """The lowest severity that makes `bn-inspect check` exit 1."""

    ERROR = "error"
    WARNING = "warning"


class DeviceChoice(str, Enum):
    """Where the model runs; auto picks CUDA when it is available."""

    CPU = "cpu"
    CUDA = "cuda"
    AUTO = "auto"
