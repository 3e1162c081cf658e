"""The command-line options, declared once: every command that takes one uses the same declaration."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bn_inspect.options import (
    CheckFormat,
    DeviceChoice,
    Explain,
    FailOn,
    ListingFormat,
    Mode,
    OutputFormat,
    Precision,
    RecalibrationChoice,
    RunFormat,
    TimelineFailOn,
)


def _print_version(wanted: bool) -> None:
    """``bn-inspect --version``: this package's version and the installed torch's, read without importing torch."""
    if not wanted:
        return
    from importlib.metadata import PackageNotFoundError, version

    from bn_inspect.version import __version__

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "not installed"
    print(f"bn-inspect {__version__}\ntorch {torch_version}")
    raise typer.Exit()


VersionOpt = Annotated[
    bool,
    typer.Option("--version", callback=_print_version, is_eager=True, help="Show the version of bn-inspect and torch."),
]
ModelArg = Annotated[
    Path | None,
    typer.Argument(
        help="Model file: state_dict or checkpoint (.pt/.pth), safetensors, TorchScript or pickled model. "
        "Omit it with --arch to inspect a fresh architecture.",
        show_default=False,
    ),
]
ArchOpt = Annotated[
    str | None,
    typer.Option(
        "--arch",
        help="Callable that builds the model: package.module:callable or path/to/file.py:callable "
        "(imports and runs that code).",
    ),
]
ArchKwargsOpt = Annotated[
    str | None,
    typer.Option("--arch-kwargs", help="JSON object of keyword arguments for --arch, e.g. '{\"num_classes\": 10}'."),
]
TrustPickleOpt = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="Allow a pickle to import the classes it names, and an archive to unpickle or call file operators. "
        "This runs code from the file: only for files you trust.",
    ),
]
TrustRemoteCodeOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="For a Hugging Face model folder whose config.json names its own code (auto_map): import and run "
        "the folder's Python files to build the model. Only for folders you trust; nothing is downloaded.",
    ),
]
ShapeOpt = Annotated[str | None, typer.Option("--shape", help="Random normal input of this shape, e.g. 16,3,32,32.")]
InputOpt = Annotated[
    Path | None,
    typer.Option(
        "--input",
        help="Data: .pt/.pth (tensor, tuple/list or dict of tensors), .npy, .npz, .csv, .parquet, a folder of "
        "such shards, or images (a folder of JPEG/PNG/BMP/WebP/TIFF, searched recursively, or one image).",
    ),
]
InputKeyOpt = Annotated[str | None, typer.Option("--input-key", help="Array of an .npz (or entry of a dict .pt).")]
DropColumnOpt = Annotated[
    list[str] | None, typer.Option("--drop-column", help="Table column to leave out, e.g. a label (repeatable).")
]
BatchSizeOpt = Annotated[
    int | None,
    typer.Option("--batch-size", min=1, help="Samples per batch for --input (default 64) or an inferred shape (8)."),
]
BatchesOpt = Annotated[
    int | None, typer.Option("--batches", min=1, help="Run at most this many batches (default: all; 1 for --shape).")
]
# torch seeds any integer that fits in 64 bits, signed or not.
SeedOpt = Annotated[
    int,
    typer.Option("--seed", min=-(2**63), max=2**64 - 1, help="Seed for random input and for dropout in train mode."),
]
ModeOpt = Annotated[
    Mode,
    typer.Option("--mode", help="eval: as deployed (running statistics); train: as in training (batch statistics)."),
]
DeviceOpt = Annotated[DeviceChoice, typer.Option("--device", help="Where the model runs.")]
OutputOpt = Annotated[
    Path | None,
    typer.Option(
        "--output", help="Write the report to this new file (whole, at the end) instead of stdout; - is stdout."
    ),
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the traceback of any error.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no notes on stderr.")]
LayerOpt = Annotated[
    list[str] | None,
    typer.Option("--layer", help="Glob on qualified layer names that adds a per-channel table (repeatable)."),
]
ExplainOpt = Annotated[
    Explain,
    typer.Option(
        "--explain",
        help="How the table explains each layer's reduction: grouped (one sentence per pattern layers share) "
        "or all (one per layer call).",
    ),
]
ReportFormatOpt = Annotated[
    OutputFormat,
    typer.Option(
        "--format", help="table for people; json, csv or markdown for machines and CI; html: one page (with --output)."
    ),
]
CheckFormatOpt = Annotated[
    CheckFormat,
    typer.Option("--format", help="table for people; json, markdown or junit for CI; html: one page (with --output)."),
]
ListingFormatOpt = Annotated[
    ListingFormat, typer.Option("--format", help="table for people; json or markdown for machines and CI.")
]
NoDataOpt = Annotated[
    bool, typer.Option("--no-data", help="Run only the rules on stored state: no forward pass, no input needed.")
]
FailOnOpt = Annotated[
    FailOn | None, typer.Option("--fail-on", help="Lowest severity that fails the check (default error).")
]
DepartureWarningOpt = Annotated[
    float | None,
    typer.Option("--departure-warning", min=0, help="A layer's departure score from here on warns (default 0.83)."),
]
DepartureErrorOpt = Annotated[
    float | None,
    typer.Option("--departure-error", min=0, help="A layer's departure score from here on is an error (default 1.7)."),
]
MinValuesOpt = Annotated[
    int | None, typer.Option("--min-values", min=1, help="Fewer values per channel per batch warn (default 16).")
]
IgnoreOpt = Annotated[
    list[str] | None, typer.Option("--ignore", help="Rule code or name to leave out, e.g. BN106 (repeatable).")
]
FoldOpt = Annotated[
    bool,
    typer.Option(
        "--fold", help="Run the folding rules BN401-BN402: which BatchNorm folds into the Conv/Linear before it."
    ),
]
PrecisionOpt = Annotated[
    Precision | None,
    typer.Option(
        "--precision",
        help="Deployment format: the folding rules with BN402 as a warning, BN403 (precision headroom) and, "
        "with data, BN404 (output change when folded).",
    ),
]
StrictOpt = Annotated[
    bool | None, typer.Option("--strict/--no-strict", help="Untrained statistics (BN104) are an error.")
]
ThresholdOpt = Annotated[
    float,
    typer.Option(
        "--threshold",
        min=0,
        help="Relative output difference at which a layer counts as departing (default 0.1: train-mode "
        "batch statistics alone differ by a few percent from running ones on a healthy model).",
    ),
]
ListedModelArg = Annotated[Path, typer.Argument(help="Model file (any format bn-inspect reads).", show_default=False)]
RecalibratedModelArg = Annotated[
    Path, typer.Argument(help="Model file to recalibrate (it is never written).", show_default=False)
]
MergedReportsArg = Annotated[
    list[Path],
    typer.Argument(
        help="JSON reports of runs over parts of the data (inspect --format json), in the order of the parts.",
        show_default=False,
    ),
]
MergedOutputOpt = Annotated[
    Path, typer.Option("--output", help="Where to write the merged JSON report (a new file; - is stdout).")
]
NewModelOpt = Annotated[Path, typer.Option("--output", help="Where to write the recalibrated model (same format).")]
DataInputOpt = Annotated[
    Path | None,
    typer.Option("--input", help="Representative data: a file, a directory of shards or of images (required)."),
]
DataBatchSizeOpt = Annotated[
    int | None, typer.Option("--batch-size", min=1, help="Samples per batch of --input (default 64).")
]
DataBatchesOpt = Annotated[
    int | None, typer.Option("--batches", min=1, help="Use at most this many batches of --input (default: all).")
]
MethodOpt = Annotated[
    RecalibrationChoice,
    typer.Option(
        "--method",
        help="sequential (default): layer by layer in eval mode, exact for the deployed model and for check; "
        "precise: one pass with norm layers in train mode (PreciseBN, update_bn), faster but off in deep layers.",
    ),
]
ForceOpt = Annotated[
    bool,
    typer.Option("--force", help="Replace existing output files; without it an existing file is never replaced."),
]
RecalibrationFormatOpt = Annotated[
    RunFormat, typer.Option("--format", help="How to print the before/after report (html only into a file or pipe).")
]
# compare-modes and diff.
RunFormatOpt = Annotated[
    RunFormat,
    typer.Option(
        "--format", help="table for people; json or markdown for machines and CI; html: one page (with --output)."
    ),
]
RecalibrationReportOpt = Annotated[
    Path | None,
    typer.Option("--report", help="Also write the before/after report as one HTML page to this new file."),
]
OldSideArg = Annotated[
    Path,
    typer.Argument(
        help="The known-good side: a JSON report (inspect --format json, check --write-baseline) or a model file.",
        show_default=False,
    ),
]
NewSideArg = Annotated[
    Path, typer.Argument(help="The side to judge: a JSON report or a model file.", show_default=False)
]
ToleranceOpt = Annotated[
    float | None,
    typer.Option(
        "--tolerance",
        min=0,
        help="|Mean change| allowed, in OLD standard deviations (default 0.5; max-drift in [tool.bn-inspect]).",
    ),
]
VarToleranceOpt = Annotated[
    float | None,
    typer.Option(
        "--var-tolerance",
        min=1,
        help="Var ratio new/old allowed within [1/R, R] (default 1.5; max-drift-var-ratio in [tool.bn-inspect]).",
    ),
]
BaselineOpt = Annotated[
    Path | None,
    typer.Option(
        "--baseline",
        help="Known-good JSON report (inspect --format json or --write-baseline): adds the BN3xx drift rules.",
    ),
]
WriteBaselineOpt = Annotated[
    Path | None,
    typer.Option("--write-baseline", help="Record this run's report as a new baseline file (needs data)."),
]
MaxDriftOpt = Annotated[
    float | None,
    typer.Option("--max-drift", min=0, help="|Mean change| since --baseline allowed, in old std (default 0.5)."),
]
MaxDriftVarRatioOpt = Annotated[
    float | None,
    typer.Option(
        "--max-drift-var-ratio", min=1, help="Var ratio new/old since --baseline allowed in [1/R, R] (default 1.5)."
    ),
]
ReportPageOpt = Annotated[
    Path | None,
    typer.Option(
        "--report",
        help="Also write the result as one HTML page to this new file, from the same run as --output.",
    ),
]
ResizeOpt = Annotated[
    int | None, typer.Option("--resize", min=1, help="Images: resize the shorter side to N pixels (bilinear).")
]
CropOpt = Annotated[int | None, typer.Option("--crop", min=1, help="Images: crop the centre N×N pixels.")]
NormalizeOpt = Annotated[
    str | None,
    typer.Option("--normalize", help="Images: imagenet, none, MEAN,STD, or C means then C stds (default none)."),
]
GrayscaleOpt = Annotated[bool, typer.Option("--grayscale", help="Images: one channel (L) instead of RGB.")]
ChannelsLastOpt = Annotated[bool, typer.Option("--channels-last", help="Images: batches in channels-last memory.")]
WorkersOpt = Annotated[
    int | None,
    typer.Option("--workers", min=0, help="Processes that decode images (default: CPUs - 1, at most 8; 0: none)."),
]
StrictDataOpt = Annotated[
    bool, typer.Option("--strict-data", help="Stop at an image that cannot be decoded instead of skipping it.")
]
DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="Your data: package.module:function or path/to/file.py:function returning a Dataset, a DataLoader "
        "or an iterable of batches (imports and runs that code).",
    ),
]

TimelineFilesArg = Annotated[
    list[Path],
    typer.Argument(
        help="Timeline files of one watched run (bn_inspect.watch, BNWatch): one per rank, merged.",
        show_default=False,
    ),
]
TimelineFailOnOpt = Annotated[
    TimelineFailOn,
    typer.Option("--fail-on", help="Lowest severity of an event that exits 1: error, warning, info or never."),
]
