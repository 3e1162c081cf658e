"""The commands: each parses its options, calls one library function, and writes the result.

Their docstrings are the --help texts. torch, pandas and rich are imported inside the commands, so
that ``bn-inspect --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer

from bn_inspect.cli.app import EXIT_CHECK_FAILED, app
from bn_inspect.cli.console import observer_for
from bn_inspect.cli.options import (
    ArchKwargsOpt,
    ArchOpt,
    BaselineOpt,
    BatchesOpt,
    BatchSizeOpt,
    ChannelsLastOpt,
    CheckFormatOpt,
    CropOpt,
    DataBatchesOpt,
    DataBatchSizeOpt,
    DataInputOpt,
    DataOpt,
    DebugOpt,
    DepartureErrorOpt,
    DepartureWarningOpt,
    DeviceOpt,
    DropColumnOpt,
    ExplainOpt,
    FailOnOpt,
    FoldOpt,
    ForceOpt,
    GrayscaleOpt,
    IgnoreOpt,
    InputKeyOpt,
    InputOpt,
    LayerOpt,
    ListedModelArg,
    ListingFormatOpt,
    MaxDriftOpt,
    MaxDriftVarRatioOpt,
    MergedOutputOpt,
    MergedReportsArg,
    MethodOpt,
    MinValuesOpt,
    ModelArg,
    ModeOpt,
    NewModelOpt,
    NewSideArg,
    NoDataOpt,
    NormalizeOpt,
    OldSideArg,
    OutputOpt,
    PrecisionOpt,
    QuietOpt,
    RecalibratedModelArg,
    RecalibrationFormatOpt,
    RecalibrationReportOpt,
    ReportFormatOpt,
    ReportPageOpt,
    ResizeOpt,
    RunFormatOpt,
    SeedOpt,
    ShapeOpt,
    StrictDataOpt,
    StrictOpt,
    ThresholdOpt,
    ToleranceOpt,
    TrustPickleOpt,
    TrustRemoteCodeOpt,
    VarToleranceOpt,
    WorkersOpt,
    WriteBaselineOpt,
)
from bn_inspect.options import (
    CheckFormat,
    DeviceChoice,
    Explain,
    ListingFormat,
    Mode,
    OutputFormat,
    RecalibrationChoice,
    RunFormat,
    RunOptions,
)


@app.command("inspect")
def inspect_command(
    model: ModelArg = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    shape: ShapeOpt = None,
    input_file: InputOpt = None,
    input_key: InputKeyOpt = None,
    drop_column: DropColumnOpt = None,
    batch_size: BatchSizeOpt = None,
    batches: BatchesOpt = None,
    seed: SeedOpt = 0,
    mode: ModeOpt = Mode.EVAL,
    device: DeviceOpt = DeviceChoice.CPU,
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    normalize: NormalizeOpt = None,
    grayscale: GrayscaleOpt = False,
    channels_last: ChannelsLastOpt = False,
    workers: WorkersOpt = None,
    strict_data: StrictDataOpt = False,
    data: DataOpt = None,
    layer: LayerOpt = None,
    explain: ExplainOpt = Explain.GROUPED,
    output_format: ReportFormatOpt = OutputFormat.TABLE,
    output: OutputOpt = None,
    force: ForceOpt = False,
    report: ReportPageOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Run data through a model and show, per normalization layer, batch vs running statistics.

    Examples:

      bn-inspect inspect sample_models/digits_cnn/torchscript.pt --input sample_models/digits_cnn/test_images.npy

      bn-inspect inspect state_dict.pt --arch mypkg.models:resnet18 --arch-kwargs '{"num_classes": 10}' --shape 8,3,224,224

      bn-inspect inspect model.pt --input val.npy --batch-size 32 --mode train --layer 'layer1.*'

      bn-inspect inspect model.ts --shape 16,3,32,32 --format json --output report.json

      bn-inspect inspect model.pt --input val.npy --format markdown --output bn.md --report bn.html
    """
    from bn_inspect.analyses.runs import run_inspect
    from bn_inspect.output.formats import Rendering, check_destination, write_result

    check_destination(output_format.value, output)
    options = RunOptions.of(locals())
    patterns = tuple(layer or ())
    inspection = run_inspect(options, observer_for(options), patterns)
    if inspection is not None:
        rendering = Rendering(channel_patterns=patterns, explain=explain)
        write_result(inspection, output_format.value, output, rendering, page=report, force=force)


@app.command("check")
def check_command(
    model: ModelArg = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    shape: ShapeOpt = None,
    input_file: InputOpt = None,
    input_key: InputKeyOpt = None,
    drop_column: DropColumnOpt = None,
    batch_size: BatchSizeOpt = None,
    batches: BatchesOpt = None,
    seed: SeedOpt = 0,
    mode: ModeOpt = Mode.EVAL,
    device: DeviceOpt = DeviceChoice.CPU,
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    normalize: NormalizeOpt = None,
    grayscale: GrayscaleOpt = False,
    workers: WorkersOpt = None,
    strict_data: StrictDataOpt = False,
    data: DataOpt = None,
    no_data: NoDataOpt = False,
    fail_on: FailOnOpt = None,
    departure_warning: DepartureWarningOpt = None,
    departure_error: DepartureErrorOpt = None,
    min_values: MinValuesOpt = None,
    ignore: IgnoreOpt = None,
    strict: StrictOpt = None,
    fold: FoldOpt = False,
    precision: PrecisionOpt = None,
    baseline: BaselineOpt = None,
    write_baseline: WriteBaselineOpt = None,
    force: ForceOpt = False,
    max_drift: MaxDriftOpt = None,
    max_drift_var_ratio: MaxDriftVarRatioOpt = None,
    output_format: CheckFormatOpt = CheckFormat.TABLE,
    output: OutputOpt = None,
    report: ReportPageOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Check a model's normalization layers for broken state; exit 1 when a finding reaches --fail-on.

    Thresholds can be pinned under [tool.bn-inspect] in pyproject.toml; flags override them. --baseline adds the
    drift rules BN301-BN303 (--write-baseline records one); --no-data checks the stored state alone; --fold and
    --precision add BN401-BN404. Example: bn-inspect check model.pt --input val.npy --baseline golden.json
    """
    from bn_inspect.analyses.checking import check_gate
    from bn_inspect.analyses.runs import run_check
    from bn_inspect.output.formats import check_destination, write_result

    check_destination(output_format.value, output)
    options = RunOptions.of(locals())
    checked = run_check(options, check_gate(locals(), Path.cwd()), observer_for(options), no_data=no_data)
    if checked.report is not None:
        write_result(checked.report, output_format.value, output, page=report, force=force)
    if not checked.passed:
        raise typer.Exit(EXIT_CHECK_FAILED)


@app.command("layers")
def layers_command(
    model: ListedModelArg,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    output_format: ListingFormatOpt = ListingFormat.TABLE,
    output: OutputOpt = None,
    force: ForceOpt = False,
    debug: DebugOpt = False,
) -> None:
    """List every normalization layer and what it stores, without running any data.

    A bare state_dict needs no --arch: layers are found by their running_mean/running_var keys
    (their exact classes are then inferred, and eps and momentum unknown).

    Examples:

      bn-inspect layers sample_models/digits_cnn/state_dict.pt

      bn-inspect layers sample_models/digits_cnn/torchscript.pt --format json
    """
    from bn_inspect.analyses.runs import list_layers
    from bn_inspect.output.formats import write_result

    options = RunOptions.of(locals())
    write_result(list_layers(options, observer_for(options)), output_format.value, output, force=force)


@app.command("compare-modes")
def compare_modes_command(
    model: ModelArg = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    shape: ShapeOpt = None,
    input_file: InputOpt = None,
    input_key: InputKeyOpt = None,
    drop_column: DropColumnOpt = None,
    batch_size: BatchSizeOpt = None,
    batches: BatchesOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = DeviceChoice.CPU,
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    normalize: NormalizeOpt = None,
    grayscale: GrayscaleOpt = False,
    workers: WorkersOpt = None,
    strict_data: StrictDataOpt = False,
    data: DataOpt = None,
    threshold: ThresholdOpt = 0.1,
    output_format: RunFormatOpt = RunFormat.TABLE,
    output: OutputOpt = None,
    force: ForceOpt = False,
    report: ReportPageOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Run the same batches in eval and in train mode and show, per layer, where the outputs part.

    "Fine in train mode, bad in eval": each normalization layer's output is compared between the
    modes (relative difference), with its input's difference and its own share, and the first
    layer where the gap opens is named. Dropout is off in both modes. The model is restored.

    Examples:

      bn-inspect compare-modes sample_models/digits_cnn/torchscript.pt --input sample_models/digits_cnn/test_images.npy

      bn-inspect compare-modes model.pt --arch mypkg.models:net --input val.npy --threshold 0.02 --format json
    """
    from bn_inspect.analyses.runs import run_compare_modes
    from bn_inspect.output.formats import check_destination, write_result

    check_destination(output_format.value, output)
    options = RunOptions.of(locals())
    comparison = run_compare_modes(options, threshold, observer_for(options))
    write_result(comparison, output_format.value, output, page=report, force=force)


@app.command("recalibrate")
def recalibrate_command(
    model: RecalibratedModelArg,
    output: NewModelOpt,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    input_file: DataInputOpt = None,
    input_key: InputKeyOpt = None,
    drop_column: DropColumnOpt = None,
    batch_size: DataBatchSizeOpt = None,
    batches: DataBatchesOpt = None,
    device: DeviceOpt = DeviceChoice.CPU,
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    normalize: NormalizeOpt = None,
    grayscale: GrayscaleOpt = False,
    workers: WorkersOpt = None,
    strict_data: StrictDataOpt = False,
    method: MethodOpt = RecalibrationChoice.SEQUENTIAL,
    force: ForceOpt = False,
    output_format: RecalibrationFormatOpt = RunFormat.TABLE,
    report: RecalibrationReportOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Recompute every layer's running mean and (unbiased) variance from your data; write a new file.

    The new statistics are the exact population statistics of every value each layer sees over
    the data. The input file is never overwritten; the output is a new file (--force replaces one),
    written whole with the --report page when the run ends, in the input's format (state_dict,
    checkpoint, safetensors, TorchScript or pickle).

    Examples:

      bn-inspect recalibrate sample_models/digits_cnn/torchscript.pt --input sample_models/digits_cnn/train_images.npy --output digits_recalibrated.pt

      bn-inspect recalibrate state_dict.pt --arch mypkg.models:net --input train_shards/ --method sequential --output new.pt --report before-after.html
    """
    from bn_inspect.analyses.runs import run_recalibrate
    from bn_inspect.output.formats import Rendering, check_destination, write_result

    check_destination(output_format.value, None)
    options = RunOptions.of(locals())
    result = run_recalibrate(options, method, force, observer_for(options))
    if result is not None:
        # --output is the new model: the before/after report goes to stdout, and as a page to --report.
        rendering = Rendering(model_output=str(output))
        write_result(result, output_format.value, None, rendering, page=report, force=force)


@app.command("diff")
def diff_command(
    old: OldSideArg,
    new: NewSideArg,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    shape: ShapeOpt = None,
    input_file: InputOpt = None,
    input_key: InputKeyOpt = None,
    drop_column: DropColumnOpt = None,
    batch_size: BatchSizeOpt = None,
    batches: BatchesOpt = None,
    seed: SeedOpt = 0,
    mode: ModeOpt = Mode.EVAL,
    device: DeviceOpt = DeviceChoice.CPU,
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    normalize: NormalizeOpt = None,
    grayscale: GrayscaleOpt = False,
    channels_last: ChannelsLastOpt = False,
    workers: WorkersOpt = None,
    strict_data: StrictDataOpt = False,
    data: DataOpt = None,
    tolerance: ToleranceOpt = None,
    var_tolerance: VarToleranceOpt = None,
    output_format: RunFormatOpt = RunFormat.TABLE,
    output: OutputOpt = None,
    force: ForceOpt = False,
    report: ReportPageOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Compare two reports or model files layer by layer; exit 1 when a change is beyond the tolerance.

    OLD and NEW are JSON reports (inspect --format json) or model files; model files run the same
    data (--input, --shape). Mean changes are in OLD standard deviations, var changes are ratios
    new/old; added, removed, renamed layers and channel counts always count as beyond.

    Examples:

      bn-inspect diff golden.json new.json

      bn-inspect diff golden.json candidate.pt --input val.npy --format markdown

      bn-inspect diff old.pt new.pt --arch mypkg.models:net --input val.npy --tolerance 0.2 --var-tolerance 1.2
    """
    from bn_inspect.analyses.checking import check_gate
    from bn_inspect.analyses.runs import run_diff
    from bn_inspect.output.formats import check_destination, write_result

    check_destination(output_format.value, output)
    gate = check_gate({"max_drift": tolerance, "max_drift_var_ratio": var_tolerance}, Path.cwd())
    options = RunOptions.of(locals())
    diff = run_diff(old, new, options, gate.tolerance, gate.thresholds, observer_for(options))
    if diff is not None:
        write_result(diff, output_format.value, output, page=report, force=force)
        if not diff.passed:
            raise typer.Exit(EXIT_CHECK_FAILED)


@app.command("merge")
def merge_command(
    reports: MergedReportsArg, output: MergedOutputOpt, force: ForceOpt = False, debug: DebugOpt = False
) -> None:
    """Merge the JSON reports of runs over parts of the data into the report of one run over all of it.

    Each report must come from this bn-inspect (it records each layer's exact moments), with the
    same model file, --mode and input dtype. The statistics are those of one run over the parts'
    batches in the order given, to float64 rounding; check --baseline and diff read the result.
    docs/merging.md shows a Slurm array and Ray Data.

    Examples:

      bn-inspect merge part-0.json part-1.json part-2.json --output all.json

      bn-inspect check model.pt --input new.npy --baseline all.json
    """
    from bn_inspect.analyses.merging import merge_report_files
    from bn_inspect.output.formats import write_result

    write_result(merge_report_files(reports), "json", output, force=force)
