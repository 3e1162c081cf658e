"""inspect's table output on a model with many norms of one shape: the verdict in the first line and
the last lines, the explanations grouped by pattern (every layer still answered), --explain all."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from bn_inspect.analyses.inspection import inspect_model
from bn_inspect.options import Explain
from bn_inspect.output.explained import explanation_groups, explanation_sentence
from bn_inspect.output.formats import Rendering, TableFormatter
from bn_inspect.report.records import ModelInfo, Report
from bn_inspect.text import Untrusted
from tests import models
from tests.helpers import assert_one_error_line, check_golden, invoke
from tests.test_tables import tokens

WIDTHS = ("60", "80", "120", "200", "piped")
INSPECT = ["inspect", "resnet.pt", "--input", "val.npy", "--batch-size", "64", "--quiet"]
SUMMARY = "bn-inspect: 2 of 14 layers depart; worst layer1.2.bn2 (departure 2, error)"
STEM_SHAPE = [
    "bn1",
    *(f"layer1.{block}.bn{index}" for block in range(4) for index in (1, 2)),
]
HALF_SIZE = ["layer2.0.downsample.1", "layer2.0.bn1", "layer2.0.bn2", "layer2.1.bn1", "layer2.1.bn2"]


def corrupted_resnet() -> torch.nn.Module:
    """The calibrated TinyResNet with layer1.2.bn1's running variance six times too large."""
    model = models.calibrated_resnet()
    with torch.no_grad():
        model.layer1[2].bn1.running_var.mul_(6)
    return model


def resnet_report() -> Report:
    data = models.resnet_data()[1]
    return inspect_model(
        corrupted_resnet(), [data[:64], data[64:]], model_info=ModelInfo.of("resnet.pt", "torchscript")
    )


@pytest.fixture(scope="module")
def resnet_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """resnet.pt (the corrupted TinyResNet, traced) and val.npy (the held-out half), written once."""
    folder = tmp_path_factory.mktemp("resnet")
    data = models.resnet_data()[1]
    torch.jit.trace(corrupted_resnet(), data[:2]).save(str(folder / "resnet.pt"))
    np.save(folder / "val.npy", data.numpy())
    return folder


@pytest.fixture
def resnet_folder(resnet_files: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working folder holds resnet.pt and val.npy, so that printed paths do not depend on the machine."""
    monkeypatch.chdir(resnet_files)
    return resnet_files


_OUTPUTS: dict[tuple[str, ...], str] = {}


def output(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, width: str, *extra: str) -> str:
    """What inspect prints at ``width`` columns (or piped), run once per width and options."""
    key = (width, *extra)
    if key not in _OUTPUTS:
        if width == "piped":
            monkeypatch.delenv("COLUMNS", raising=False)
        else:
            monkeypatch.setenv("COLUMNS", width)
        result = invoke(capsys, [*INSPECT, *extra])
        assert result.code == 0, result.err
        _OUTPUTS[key] = result.out
    return _OUTPUTS[key]


def bullets(text: str) -> list[str]:
    """The explanation bullets, each joined back into one line."""
    section = text.split("How each layer's statistics were computed\n", 1)[1].split("\n\n", 1)[0]
    section = section.split("\n--explain all names", 1)[0]
    return [" ".join(part.split()) for part in section.split("• ")[1:]]


@pytest.mark.parametrize("width", WIDTHS)
def test_inspect_output_matches_golden(
    width: str,
    resnet_folder: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    update_golden: bool,
) -> None:
    check_golden(f"tables/inspect-resnet_{width}.txt", output(capsys, monkeypatch, width), update_golden)


@pytest.mark.parametrize("width", WIDTHS)
def test_the_verdict_is_the_first_line_and_the_last_paragraph(
    width: str, resnet_folder: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = output(capsys, monkeypatch, width)
    lines = text.splitlines()
    # 60 columns fold the summary between words, never inside a name or a number.
    assert " ".join(lines[: 2 if width == "60" else 1]) == SUMMARY
    last = " ".join(text.rstrip("\n").split("\n\n")[-1].split())
    assert last.startswith("First departure from the running statistics, in execution order: layer1.2.bn1:")
    assert "The largest: layer1.2.bn2, departure 2 (error)." in last and text.endswith(".\n")


@pytest.mark.parametrize("width", WIDTHS[:-1])
def test_no_width_splits_a_name_or_a_number(
    width: str, resnet_folder: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = tokens(output(capsys, monkeypatch, "piped"))
    text = output(capsys, monkeypatch, width)
    assert tokens(text) <= whole, sorted(tokens(text) - whole)
    assert {*STEM_SHAPE, *HALF_SIZE} <= tokens(text)
    assert all(len(line) <= int(width) and line == line.rstrip() for line in text.splitlines())


def test_layers_of_one_shape_share_one_sentence_that_answers_for_each(
    resnet_folder: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    said = bullets(output(capsys, monkeypatch, "120"))
    assert said == [
        "bn1, layer1.0.bn1 and 7 more (BatchNorm2d) each got (64, 8, 8, 8) = (N, C, H, W): 8 means and 8 variances, "
        "each over N×H×W = 64×8×8 = 4,096 values (dims 0, 2, 3 reduced; C kept). Over 2 batches: 8,192 values per "
        "channel in all.",
        "layer2.0.downsample.1, layer2.0.bn1 and 3 more (BatchNorm2d) each got (64, 16, 4, 4) = (N, C, H, W): 16 "
        "means and 16 variances, each over N×H×W = 64×4×4 = 1,024 values (dims 0, 2, 3 reduced; C kept). Over 2 "
        "batches: 2,048 values per channel in all.",
    ]
    assert "--explain all names every layer call in a sentence of its own." in output(capsys, monkeypatch, "120")


def test_explain_all_gives_each_layer_call_its_own_sentence(
    resnet_folder: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    said = bullets(output(capsys, monkeypatch, "120", "--explain", "all"))
    assert [sentence.split(" (BatchNorm2d) got ")[0] for sentence in said] == [*STEM_SHAPE, *HALF_SIZE]
    assert said[3] == (
        "layer1.1.bn1 (BatchNorm2d) got (64, 8, 8, 8) = (N, C, H, W): 8 means and 8 variances, each over "
        "N×H×W = 64×8×8 = 4,096 values (dims 0, 2, 3 reduced; C kept). Over 2 batches: 8,192 values per channel in all."
    )
    assert "--explain all names" not in output(capsys, monkeypatch, "120", "--explain", "all")


def test_an_unknown_explain_choice_is_one_error_line(resnet_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = invoke(capsys, [*INSPECT, "--explain", "some"])
    assert result.code == 2
    assert_one_error_line(result, "--explain")


def test_every_layer_is_in_exactly_one_group_with_its_own_sentence() -> None:
    report = resnet_report()
    groups = explanation_groups(report.layers)
    assert [[layer.label.raw for layer in group.layers] for group in groups] == [STEM_SHAPE, HALF_SIZE]
    for group in groups:
        for layer in group.layers:
            # The group's sentence, with the layer's name, is the layer's own explanation.
            assert f"{layer.label.raw} ({layer.type.raw}) got {group.rest}" == layer.explanation.raw


def test_names_are_listed_up_to_three_and_counted_beyond() -> None:
    report = resnet_report()
    stem = [layer for layer in report.layers if layer.label.raw in STEM_SHAPE]
    for count, listed in [
        (2, "bn1 and layer1.0.bn1"),
        (3, "bn1, layer1.0.bn1 and layer1.0.bn2"),
        (4, "bn1, layer1.0.bn1 and 2 more"),
    ]:
        (group,) = explanation_groups(stem[:count])
        assert explanation_sentence(group, Untrusted.inert).startswith(f"{listed} (BatchNorm2d) each got (64, 8, 8, 8)")
    (alone,) = explanation_groups(stem[:1])
    assert explanation_sentence(alone, Untrusted.inert) == stem[0].explanation.raw


def test_an_explanation_that_does_not_open_with_its_name_stays_alone() -> None:
    # A report file's explanation is whatever the file says: it is never merged with another's.
    import dataclasses

    report = resnet_report()
    odd = dataclasses.replace(report.layers[1], explanation=Untrusted("hand-written"))
    groups = explanation_groups([report.layers[0], odd, report.layers[2]])
    assert [len(group.layers) for group in groups] == [2, 1]
    assert explanation_sentence(groups[1], Untrusted.inert) == "hand-written"


def test_rendering_explain_all_is_the_api_default_off() -> None:
    report = resnet_report()
    grouped = TableFormatter().text(report, Rendering(width=120))
    every = TableFormatter().text(report, Rendering(width=120, explain=Explain.ALL))
    assert grouped.count("• ") == 2 and every.count("• ") == 14
    assert re.search(r"^bn-inspect: 2 of 14 layers depart", grouped) is not None
