"""BnInspectError and its subclasses: the only exceptions users see."""

from __future__ import annotations

from dataclasses import dataclass

from bn_inspect.text import one_line


class BnInspectError(Exception):
    """A failure the user can fix; the CLI prints it as one line and exits with ``exit_code``.

    Args:
        what: what went wrong, as a sentence without the final full stop.
        fix: how to fix it, as a sentence.
    """

    exit_code = 2

    def __init__(self, what: str, fix: str = "") -> None:
        self.what = one_line(what).rstrip(".")
        self.fix = one_line(fix)
        super().__init__(self.line())

    def line(self) -> str:
        """The one-line message: what went wrong, then how to fix it."""
        return f"{self.what}. {self.fix}".strip()


class ModelFileError(BnInspectError):
    """The model file is missing, unreadable, corrupt, or of an unknown kind."""


class UntrustedPickleError(BnInspectError):
    """The model file would import (and so run) code to load; refused without --trust-pickle."""

    def __init__(self, path: str, unsafe_globals: list[str]) -> None:
        self.unsafe_globals = unsafe_globals
        super().__init__(
            f"{path} is a pickle that imports {', '.join(unsafe_globals)} when loaded, "
            "and loading it would run code from the file",
            "If you trust the file, pass --trust-pickle; otherwise ask for a state_dict "
            "(load it with --arch) or a TorchScript archive",
        )


class RemoteCodeError(BnInspectError):
    """A model folder's config names code in the folder (``auto_map``); refused without --trust-remote-code."""

    def __init__(self, folder: str, classes: list[str]) -> None:
        self.classes = classes
        super().__init__(
            f"model folder {folder}: config.json names code of its own ({', '.join(classes)} in auto_map), "
            "which building the model would import and run",
            "If you trust the folder's Python files, pass --trust-remote-code; otherwise ask for a model "
            "that transformers builds itself",
        )


class ArchError(BnInspectError):
    """The --arch spec or --arch-kwargs cannot build a model."""


class StateDictMismatchError(BnInspectError):
    """The state_dict does not fit the architecture (missing, unexpected or misshapen keys)."""


class InputError(BnInspectError):
    """The --shape or --input data cannot be used."""


class ShapeMismatchError(BnInspectError):
    """The data does not fit what a layer of the model expects."""


class DeviceError(BnInspectError):
    """The requested device is not available."""


class ForwardError(BnInspectError):
    """The model's forward pass failed on the given data."""


class NoNormLayersError(BnInspectError):
    """The model has no normalization layer to inspect."""

    @classmethod
    def for_action(cls, verb: str) -> NoNormLayersError:
        """The error for a model without any normalization layer, where the user asked to ``verb``."""
        return cls(
            "the model has no normalization layer (BatchNorm, InstanceNorm, GroupNorm, LayerNorm, "
            "RMSNorm or FrozenBatchNorm2d)",
            f"Nothing to {verb}; check that this is the model you meant",
        )


class ExportModeError(BnInspectError):
    """A torch.export program cannot run in the requested mode: its mode was fixed at export."""


class LazyModelError(BnInspectError):
    """Inspecting would materialize the model's lazy modules, which the caller did not allow."""


class OutputError(BnInspectError):
    """The --output file cannot be written."""


class ModeComparisonError(BnInspectError):
    """The two modes cannot be compared side by side on this model."""


@dataclass(frozen=True)
class RankFailure:
    """What one rank reported when its local work raised."""

    rank: int
    error_type: str
    what: str
    fix: str
    is_internal: bool
    exit_code: int


class DistributedError(BnInspectError):
    """A rank failed, the ranks lost contact, or the torchrun environment is unusable.

    Raised on every rank alike, so that all of them stop with the same one-line message.

    Attributes:
        failures: the ranks that failed and what each reported (empty for a lost contact).
    """

    def __init__(self, what: str, fix: str = "", *, failures: tuple[RankFailure, ...] = (), exit_code: int = 2) -> None:
        super().__init__(what, fix)
        self.failures = failures
        self.exit_code = exit_code


class ConfigError(BnInspectError):
    """pyproject.toml's [tool.bn-inspect] table cannot be used."""


class UntrustedArchiveError(BnInspectError):
    """A TorchScript or torch.export archive would run code or reach files when loaded or run;
    refused without --trust-pickle."""

    def __init__(self, path: str, reason: str) -> None:
        self.reason = reason
        super().__init__(
            f"{path} {reason}",
            "If you trust the file, pass --trust-pickle; otherwise ask for a state_dict or safetensors file "
            "(load it with --arch)",
        )


class ReportFileError(BnInspectError):
    """A JSON report (an input of diff, a --baseline) cannot be read: missing, not JSON, another
    kind of document, a schema version this bn-inspect does not know, or a field of the wrong type."""


class MergeError(BnInspectError):
    """Reports that cannot merge into one (`bn-inspect merge`): of other models, modes, layer sets or
    input dtypes, written without exact moments, or one data set given twice."""


class TimelineFileError(BnInspectError):
    """A timeline file (`bn-inspect timeline`) cannot be read: missing, not JSON lines, another kind
    of file, written by a newer bn-inspect, corrupted, or a rank given twice."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: raised by the CLI's signal handler so every ``finally`` runs.

    A BaseException like KeyboardInterrupt, but not one: typer turns a KeyboardInterrupt into a
    silent exit 130, which would hide SIGTERM's 143 and the signal from the exception chain.

    Args:
        signal_number: the signal that arrived; the exit code is 128 + it (130, 143).
    """

    def __init__(self, signal_number: int) -> None:
        self.signal_number = signal_number
        super().__init__(signal_number)


class WatchError(BnInspectError):
    """``bn_inspect.watch`` cannot watch this model or loop: no BatchNorm layer, a model compiled
    before or inside the watch, a training forward in which no layer call was seen, bad settings."""
