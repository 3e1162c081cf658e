"""What the commands decide, tested as library code: options, check settings, refused outputs, runs, formats."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bn_inspect.analyses.checking import check_settings
from bn_inspect.analyses.runs import list_layers, run_inspect, run_recalibrate
from bn_inspect.analyses.session import SilentObserver, check_outputs, is_stdout
from bn_inspect.boundary.reading import run_manifest
from bn_inspect.config import CheckConfig
from bn_inspect.errors import InputError, OutputError
from bn_inspect.options import CheckFormat, FailOn, ListingFormat, OutputFormat, RecalibrationChoice, RunOptions
from bn_inspect.output.formats import FORMATTERS, write_result
from tests.helpers import DIGITS, REPO


def test_run_options_take_the_command_parameters_they_know() -> None:
    options = RunOptions.of({"model": Path("m.pt"), "drop_column": ["label"], "threshold": 0.2, "seed": 3})
    assert (options.model, options.drop_column, options.seed, options.shape) == (Path("m.pt"), ("label",), 3, None)


def test_check_settings_take_flags_over_the_config_over_the_defaults() -> None:
    config = CheckConfig(departure_warning=0.5, departure_error=3.0, fail_on="warning", ignore=("BN106",))
    settings = check_settings(config, departure_warning=0.7, min_values=4, ignore=["BN105"])
    assert settings.thresholds.warning == 0.7  # the flag
    assert settings.thresholds.error == 3.0  # the config
    assert settings.thresholds.info == 0.5  # the default
    assert settings.thresholds.min_values == 4
    assert settings.fail_on is FailOn.WARNING
    assert settings.ignore == ["BN106", "BN105"]


def test_check_settings_refuse_an_unknown_rule() -> None:
    with pytest.raises(InputError, match=r"--ignore BN999: no such rule"):
        check_settings(CheckConfig(), ignore=["BN999"])


def test_check_settings_refuse_a_config_fail_on_that_is_not_one() -> None:
    with pytest.raises(InputError, match=r"fail-on 'never' in pyproject.toml"):
        check_settings(CheckConfig(source=Path("pyproject.toml"), fail_on="never"))


def test_check_outputs_refuses_every_file_the_options_name_for_reading(tmp_path: Path) -> None:
    shards, nets = tmp_path / "shards", tmp_path / "nets"
    shards.mkdir()
    nets.mkdir()
    for path in (tmp_path / "m.pt", shards / "a.npy", shards / "b.npy", nets / "cnn.py"):
        path.touch()
    options = RunOptions(model=tmp_path / "m.pt", input_file=shards, arch=f"{nets / 'cnn.py'}:Net", force=True)
    refused = {
        tmp_path / "m.pt": "the model file",
        shards / "b.npy": "a shard of the --input folder",
        nets / "cnn.py": "the --arch source",
    }
    for target, role in refused.items():
        with run_manifest(), pytest.raises(OutputError, match=rf"^--output {target} is {role} {target}, which"):
            check_outputs(replace(options, output=target))
    # A module spec names no file: finding it would mean importing it.
    with run_manifest():
        check_outputs(RunOptions(arch="torchvision.models:resnet18", output=tmp_path / "x.json"))


def test_stdout_is_no_output_or_a_dash() -> None:
    assert is_stdout(None) and is_stdout(Path("-")) and not is_stdout(Path("report.json"))


def test_run_inspect_gives_the_report_the_command_prints() -> None:
    options = RunOptions(model=DIGITS / "torchscript.pt", input_file=DIGITS / "test_images.npy", batches=2)
    report = run_inspect(options, SilentObserver())
    assert report is not None and [layer.name.raw for layer in report.layers] == [
        "features.1",
        "features.4",
        "features.8",
    ]
    assert report.input.num_batches == 2


class CountingObserver(SilentObserver):
    """Records each progress bar the run asks for: its total and how many batches went through it."""

    def __init__(self) -> None:
        self.bars: list[tuple[int | None, int]] = []

    def progress(self, batches: Iterator[Any], total: int | None) -> Iterator[Any]:
        self.bars.append((total, 0))
        for batch in batches:
            self.bars[-1] = (total, self.bars[-1][1] + 1)
            yield batch


@pytest.mark.parametrize("method", list(RecalibrationChoice))
def test_run_recalibrate_shows_progress_over_every_pass(tmp_path: Path, method: RecalibrationChoice) -> None:
    options = RunOptions(
        model=DIGITS / "torchscript.pt", input_file=DIGITS / "train_images.npy", batches=3, output=tmp_path / "new.pt"
    )
    observer = CountingObserver()
    result = run_recalibrate(options, method, False, observer)
    assert result is not None and len(observer.bars) == result.num_passes
    assert all(total == 3 for total, _ in observer.bars) and observer.bars[0] == (3, 3)


def test_list_layers_infers_the_layers_of_a_bare_state_dict() -> None:
    listing = list_layers(RunOptions(model=DIGITS / "state_dict.pt"), SilentObserver())
    assert listing.types_inferred and [state.name.raw for state in listing.layers] == [
        "features.1",
        "features.4",
        "features.8",
    ]


def test_every_format_spelling_has_a_formatter() -> None:
    spellings = {f.value for enum in (OutputFormat, CheckFormat, ListingFormat) for f in enum}
    assert spellings == set(FORMATTERS)


def test_a_result_written_to_a_file_is_what_stdout_gets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    listing = list_layers(RunOptions(model=DIGITS / "state_dict.pt"), SilentObserver())
    write_result(listing, "json", None)
    write_result(listing, "json", tmp_path / "layers.json")
    assert capsys.readouterr().out == (tmp_path / "layers.json").read_text(encoding="utf-8")
    assert json.loads((tmp_path / "layers.json").read_text(encoding="utf-8"))["layers"][0]["name"] == "features.1"


def test_a_single_process_never_imports_the_distributed_room() -> None:
    code = (
        "import sys, io, contextlib; from bn_inspect.cli.main import run\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    assert run(['inspect', {str(DIGITS / 'torchscript.pt')!r}, '--input', {str(DIGITS / 'test_images.npy')!r},"
        " '--batches', '2', '--format', 'json', '--quiet']) == 0\n"
        "print(sorted(m for m in sys.modules if m.startswith('bn_inspect.distributed.')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.strip() == "[]"
