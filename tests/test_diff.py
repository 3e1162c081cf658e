"""`bn-inspect diff`: two reports or model files compared layer by layer, against a float64 reference (#21)."""

from __future__ import annotations

import dataclasses
import html
import json
import math
import re
from collections import OrderedDict
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from torch import nn

from bn_inspect.analyses.inspection import inspect_model
from bn_inspect.output.export import diff_to_markdown
from bn_inspect.output.formats import Rendering, TableFormatter
from bn_inspect.report.diff import Tolerance, diff_reports
from bn_inspect.report.records import ModelInfo, Report
from bn_inspect.report.schemas import schema
from bn_inspect.text import Untrusted
from tests import models
from tests.helpers import DIGITS, GOLDEN, assert_one_error_line, check_golden, invoke

ARCH = ("--arch", "sample_models.architectures:DigitsCNN")


def _net(names: tuple[str, ...] = ("bn1", "bn2", "bn3"), channels: tuple[int, ...] = (3, 5, 5)) -> nn.Module:
    """BatchNorm2d on the input, then Conv2d -> BatchNorm2d pairs: the first layer sees the data itself."""
    parts: list[tuple[str, nn.Module]] = [(names[0], nn.BatchNorm2d(channels[0]))]
    for index in range(1, len(names)):
        parts.append((f"conv{index}", nn.Conv2d(channels[index - 1], channels[index], 1)))
        parts.append((names[index], nn.BatchNorm2d(channels[index])))
    torch.manual_seed(0)
    return models.randomize_norm_state(nn.Sequential(OrderedDict(parts))).double().eval()


def _data(mean: float = 1e4, std: float = 1e-2, seed: int = 0) -> torch.Tensor:
    return models.make_input((6, 3, 5, 7), mean=mean, std=std, seed=seed).double()


def _report(model: nn.Module, data: torch.Tensor, source: str = "data.npy") -> Report:
    return inspect_model(
        model, [data[:4], data[4:]], model_info=ModelInfo.of("model.pt", "module"), input_source=source
    )


def test_every_change_equals_a_float64_reference_on_large_means_and_tiny_variances() -> None:
    old_model = _net()
    new_model = _net()
    with torch.no_grad():
        # Running statistics of a large mean and a tiny variance, moved by fractions of a std.
        old_model.bn1.running_mean.fill_(1e4)
        old_model.bn1.running_var.copy_(torch.tensor([1e-4, 2e-4, 5e-5], dtype=torch.float64))
        new_model.bn1.running_mean.copy_(old_model.bn1.running_mean + torch.tensor([1e-3, -2e-3, 0.0]))
        new_model.bn1.running_var.copy_(old_model.bn1.running_var * torch.tensor([1.1, 0.5, 1.0]))
    old_data, new_data = _data(), _data(seed=1) * 1.000001 + 0.003
    diff = diff_reports(_report(old_model, old_data), _report(new_model, new_data))
    layer = next(c for c in diff.layers if c.new == Untrusted("bn1"))
    eps = old_model.bn1.eps
    rm_old, rv_old = (old_model.bn1.running_mean.numpy(), old_model.bn1.running_var.numpy())
    rm_new, rv_new = (new_model.bn1.running_mean.numpy(), new_model.bn1.running_var.numpy())
    assert layer.running is not None and layer.batch is not None
    np.testing.assert_allclose(layer.running.mean_change, (rm_new - rm_old) / np.sqrt(rv_old + eps), rtol=1e-9)
    np.testing.assert_allclose(layer.running.var_ratio, rv_new / rv_old, rtol=1e-12)
    # Batch statistics of the first layer are those of the data itself, per channel over N, H, W.
    old_x, new_x = (np.moveaxis(x.numpy(), 1, 0).reshape(3, -1) for x in (old_data, new_data))
    old_var, new_var = old_x.var(axis=1), new_x.var(axis=1)  # biased, as BatchNorm normalizes
    np.testing.assert_allclose(
        layer.batch.mean_change, (new_x.mean(axis=1) - old_x.mean(axis=1)) / np.sqrt(old_var + eps), rtol=1e-6
    )
    np.testing.assert_allclose(layer.batch.var_ratio, new_var / old_var, rtol=1e-6)
    assert layer.status == "changed" and diff.first_changed == Untrusted("bn1") and not diff.passed
    assert diff.layers[0].size >= diff.layers[-1].size


def test_changes_are_sorted_by_size_and_the_first_changed_layer_is_in_execution_order() -> None:
    old_model, new_model = _net(), _net()
    with torch.no_grad():
        new_model.bn2.running_mean.add_(0.8 * old_model.bn2.running_var.sqrt())  # 0.8 std: just beyond 0.5
        new_model.bn3.running_var.mul_(9.0)  # far beyond 1.5
    data = _data(mean=0.0, std=1.0)
    diff = diff_reports(_report(old_model, data), _report(new_model, data), thresholds=None)
    assert [c.label.raw for c in diff.layers][:2] == ["bn3", "bn2"]
    assert diff.first_changed == Untrusted("bn2")
    assert [c.label.raw for c in diff.beyond] == ["bn3", "bn2"]
    # bn2's output moved with its running mean, so bn3's batch statistics moved too; bn1 saw the same data.
    assert next(c for c in diff.layers if c.label.raw == "bn1").size == 0
    assert diff_reports(_report(old_model, data), _report(new_model, data), Tolerance(1e3, 1e3)).passed


def _renamed_net() -> nn.Module:
    model = _net(("bn1", "norm_two", "bn3"))
    model.load_state_dict({k.replace("bn2.", "norm_two."): v for k, v in _net().state_dict().items()})
    return model


def test_a_layer_renamed_in_place_is_reported_as_renamed_not_removed_and_added() -> None:
    data = _data(mean=0.0, std=1.0)
    diff = diff_reports(_report(_net(), data), _report(_renamed_net(), data))
    by_status = {c.status: c for c in diff.layers}
    renamed = by_status["renamed"]
    assert (
        renamed.label.raw == "bn2 → norm_two"
        and renamed.old == Untrusted("bn2")
        and renamed.new == Untrusted("norm_two")
    )
    assert renamed.running is not None and renamed.running.max_abs_mean_change == 0
    assert {c.status for c in diff.layers} == {"renamed", "unchanged"}
    assert diff.first_changed == Untrusted("bn2 → norm_two") and not diff.passed


def test_added_removed_and_channel_count_changes_are_structural() -> None:
    data = _data(mean=0.0, std=1.0)
    base = _report(_net(), data)
    wider = _report(_net(channels=(3, 6, 5)), data)
    diff = diff_reports(base, wider)
    # bn3 sees other data through a wider conv: changed, not structural.
    assert {c.label.raw: c.status for c in diff.layers} == {"bn1": "unchanged", "bn2": "channels", "bn3": "changed"}
    assert next(c for c in diff.layers if c.status == "channels").old_channels == 5
    # A layer of another type at the same place is no rename.
    longer = _report(_net(("bn1", "bn2", "bn3", "bn4"), (3, 5, 5, 2)), data)
    assert {c.label.raw: c.status for c in diff_reports(base, longer).layers}["bn4"] == "added"
    shorter = diff_reports(longer, base)
    removed = next(c for c in shorter.layers if c.status == "removed")
    assert removed.old == Untrusted("bn4") and removed.position == 3 and shorter.first_changed == Untrusted("bn4")
    different = _report(_net(("bn1", "bn2", "other"), (3, 5, 4)), data)
    assert {c.status for c in diff_reports(base, different).layers} == {"unchanged", "added", "removed"}


def test_a_corrupted_middle_layer_is_one_stored_change_and_the_inputs_after_it_are_downstream() -> None:
    data = _data(mean=0.0, std=1.0)
    names, channels = ("bn1", "bn2", "bn3", "bn4"), (3, 5, 5, 5)
    healthy, corrupted = _net(names, channels), _net(names, channels)
    with torch.no_grad():
        corrupted.bn2.running_var.mul_(4.0)
    old = _report(healthy, data)
    diff = diff_reports(old, _report(corrupted, data))
    changed = {c.label.raw: c.changed for c in diff.layers}
    assert changed == {"bn1": None, "bn2": "stored", "bn3": "downstream-input", "bn4": "downstream-input"}
    # bn2's own input is upstream of its statistics: only what it normalizes, and what follows, moved.
    bn2 = next(c for c in diff.layers if c.label.raw == "bn2")
    assert bn2.batch is not None and bn2.batch.max_abs_mean_change == 0 and bn2.batch.worst_var_ratio == 1
    assert diff.headline == "1 layer's stored statistics changed; 2 downstream inputs changed"
    other_data = diff_reports(old, _report(healthy, _data(mean=0.5, std=2.0, seed=3)))
    assert {c.changed for c in other_data.layers} == {"input"}
    assert other_data.headline == "4 inputs changed with no stored or structural change before them"
    same = diff_reports(old, _report(healthy, data))
    assert same.headline == "No layer's stored statistics changed and no input changed"
    assert {c.changed for c in same.layers} == {None}
    wider_net = _net(channels=(3, 6, 5))
    wider_net.bn3.load_state_dict(_net().bn3.state_dict())  # bn3 stores what it stored: only its input moves
    wider = diff_reports(_report(_net(), data), _report(wider_net, data))
    assert {c.label.raw: c.changed for c in wider.layers} == {
        "bn1": None,
        "bn2": "structure",
        "bn3": "downstream-input",
    }
    assert wider.headline == "1 layer's channel count changed; 1 downstream input changed"


def test_without_batch_statistics_the_headline_says_only_what_stored_state_tells() -> None:
    data = _data(mean=0.0, std=1.0)
    corrupted = _net()
    with torch.no_grad():
        corrupted.bn1.running_mean.add_(corrupted.bn1.running_var.sqrt())

    def stored_only(report: Report) -> Report:
        layers = tuple(dataclasses.replace(layer, batch_mean=None, batch_var=None) for layer in report.layers)
        return dataclasses.replace(report, layers=layers)

    diff = diff_reports(stored_only(_report(_net(), data)), stored_only(_report(corrupted, data)))
    assert diff.headline == "1 layer's stored statistics changed; inputs not compared (no batch statistics on the data)"
    unchanged = diff_reports(stored_only(_report(_net(), data)), stored_only(_report(_net(), data)))
    assert unchanged.headline == (
        "No layer's stored statistics changed; inputs not compared (no batch statistics on the data)"
    )


def test_stored_statistics_moved_within_the_tolerance_are_not_called_unchanged() -> None:
    """Fails before the fix: the change column said "unchanged" and the headline "No layer's stored statistics changed"."""
    data = _data(mean=0.0, std=1.0)
    nudged = _net()
    with torch.no_grad():
        nudged.bn2.running_mean.add_(0.01 * nudged.bn2.running_var.sqrt())
        nudged.bn3.running_var.mul_(1.04)
    diff = diff_reports(_report(_net(), data), _report(nudged, data))
    assert diff.passed
    assert {c.label.raw: c.status for c in diff.layers} == {
        "bn1": "unchanged",
        "bn2": "within-tolerance",
        "bn3": "within-tolerance",
    }
    assert diff.headline.startswith("Stored statistics changed in 2 layers, all within the tolerance")
    table = TableFormatter().text(diff, Rendering(width=120))
    assert "within tolerance" in table and "No layer's stored statistics changed" not in table
    assert '"within tolerance": its running statistics moved, within the tolerance' in table
    assert "| within tolerance |" in diff_to_markdown(diff)
    jsonschema.validate(json.loads(json.dumps(diff.to_dict())), schema("diff"))
    beyond = _net()
    with torch.no_grad():
        beyond.bn1.running_var.mul_(1.04)
        beyond.bn3.running_var.mul_(4.0)
    mixed = diff_reports(_report(_net(), data), _report(beyond, data))
    assert mixed.headline == (
        "1 layer's stored statistics changed; 1 layer's stored statistics changed within the tolerance"
    )


def test_a_layer_that_now_normalizes_with_batch_statistics_fails_the_diff() -> None:
    """Any layer, not only an ONNX node: a BatchNorm without running statistics normalizes with the batch's."""
    data = _data(mean=0.0, std=1.0)
    batch_only = _net()
    batch_only.bn2 = nn.BatchNorm2d(5, track_running_stats=False).double().eval()
    diff = diff_reports(_report(_net(), data), _report(batch_only, data))
    assert not diff.passed and diff.first_changed == "bn2"
    bn2 = next(c for c in diff.layers if c.label.raw == "bn2")
    assert (bn2.changed, bn2.old_normalizes_with, bn2.new_normalizes_with) == ("normalization", "running", "batch")
    assert diff.headline.startswith("1 layer normalizes with batch statistics in NEW, running in OLD")
    back = diff_reports(_report(batch_only, data), _report(_net(), data))
    assert back.headline.startswith("1 layer normalizes with running statistics in NEW, batch in OLD")
    assert "uses running" in TableFormatter().text(back, Rendering(width=120))


def test_on_random_input_no_layer_is_said_to_depart_or_match() -> None:
    """Fails before the fix: the verdict column said "departs" on random input, which inspect and check do not judge."""
    data = _data()  # far from what the layers were calibrated on: every layer departs on it
    real = diff_reports(_report(_net(), data), _report(_net(), data))
    assert {c.new_verdict for c in real.layers} == {"departs"}
    random = diff_reports(
        _report(_net(), data, "random normal, seed 0"), _report(_net(), data, "random normal, seed 0")
    )
    assert {(c.old_verdict, c.new_verdict) for c in random.layers} == {(None, None)}
    assert "departs" not in TableFormatter().text(random, Rendering(width=120))


def test_a_tolerance_of_zero_allows_exactly_no_change() -> None:
    exact = Tolerance(0.0, 1.0)
    assert exact.size([0.0, -0.0], [1.0, 1.0]) == 0 and math.isinf(exact.size([1e-300], [1.0]))
    assert math.isinf(exact.size([0.0], [1.0 + 1e-15]))
    data = _data(mean=0.0, std=1.0)
    assert diff_reports(_report(_net(), data), _report(_net(), data), exact).passed


def test_a_nan_running_statistic_is_beyond_any_tolerance() -> None:
    data = _data(mean=0.0, std=1.0)
    broken = _net()
    with torch.no_grad():
        broken.bn3.running_var[0] = math.nan
    diff = diff_reports(_report(_net(), data), _report(broken, data), Tolerance(1e9, 1e9))
    assert [c.label.raw for c in diff.beyond] == ["bn3"] and math.isinf(diff.beyond[0].size)


def test_notes_say_when_the_reports_are_not_comparable() -> None:
    model = _net()
    data = _data(mean=0.0, std=1.0)
    old = _report(model, data)
    assert diff_reports(old, _report(model, data)).notes == ()
    other = diff_reports(old, _report(model, _data(mean=0.0, std=1.0, seed=5)))
    assert any("ran other data (another first batch)" in n for n in other.notes)
    train = inspect_model(model, [data], mode="train")
    assert any("OLD ran in eval mode and NEW in train mode" in n for n in diff_reports(old, train).notes)
    single = inspect_model(model.float(), [data.float()])
    notes = diff_reports(old, single).notes
    assert any("OLD ran in float64 and NEW in float32" in n for n in notes)
    assert not any("another first batch" in n for n in notes)  # the dtype note says it
    on_gpu = dataclasses.replace(old, device=Untrusted("cuda:0"))
    assert diff_reports(old, on_gpu).notes == ("OLD ran on cpu and NEW on cuda:0: expect rounding differences",)
    older = dataclasses.replace(old, input=dataclasses.replace(old.input, first_batch_sha256=None))
    assert any("no data fingerprint" in n for n in diff_reports(older, old).notes)


def test_names_from_the_file_are_escaped_in_markdown_and_inert_in_the_table() -> None:
    data = _data(mean=0.0, std=1.0)
    old = _report(_net(), data)
    hostile = "bn2|`x`\x1b[31m"
    renamed = _net(("bn1", hostile, "bn3"))
    renamed.load_state_dict({k.replace("bn2.", hostile + "."): v for k, v in _net().state_dict().items()})
    diff = diff_reports(old, _report(renamed, data))
    markdown = diff_to_markdown(diff)
    row = next(line for line in markdown.splitlines() if line.startswith("| ") and "renamed" in line)
    # GitHub ends a cell at every | not escaped, inside code spans too; the escape character shows as text.
    assert "\x1b" not in markdown and "bn2\\|`x`\\x1b[31m" in row and row.count(" | ") == 9
    table = TableFormatter().text(diff, Rendering(width=200))
    assert "\x1b" not in table and "\\x1b[31m" in table


def test_markdown_matches_golden(update_golden: bool) -> None:
    data = _data(mean=0.0, std=1.0)
    old_model, new_model = _net(), _renamed_net()
    with torch.no_grad():
        new_model.bn3.running_var.mul_(3.0)
    diff = diff_reports(_report(old_model, data), _report(new_model, data))
    check_golden("diff.md", diff_to_markdown(diff), update_golden)


@pytest.fixture(scope="module")
def digits_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bn_inspect.cli.main import run

    path = tmp_path_factory.mktemp("diff") / "golden.json"
    assert (
        run(
            [
                "inspect",
                str(DIGITS / "torchscript.pt"),
                "--input",
                str(DIGITS / "test_images.npy"),
                "--format",
                "json",
                "--output",
                str(path),
                "-q",
            ]
        )
        == 0
    )
    return path


def test_a_report_against_itself_passes_with_exit_0(capsys: pytest.CaptureFixture[str], digits_report: Path) -> None:
    result = invoke(capsys, ["diff", digits_report, digits_report, "--format", "json"])
    assert result.code == 0 and result.err == ""
    document = json.loads(result.out)
    assert document["passed"] is True and document["first_changed"] is None
    assert {layer["status"] for layer in document["layers"]} == {"unchanged"}
    assert any("same model file" in note for note in document["notes"])


def test_model_files_run_the_same_data_and_a_shift_exits_1(
    capsys: pytest.CaptureFixture[str], digits_report: Path
) -> None:
    same = invoke(
        capsys,
        [
            "diff",
            DIGITS / "state_dict.pt",
            DIGITS / "torchscript.pt",
            *ARCH,
            "--input",
            DIGITS / "test_images.npy",
            "-q",
        ],
    )
    assert same.code == 0, same.err
    assert "0 of 3 layer calls beyond the tolerance" in same.out
    shifted = invoke(
        capsys,
        [
            "diff",
            digits_report,
            DIGITS / "torchscript.pt",
            "--input",
            DIGITS / "test_images_unscaled.npy",
            "--format",
            "markdown",
            "-q",
        ],
    )
    assert shifted.code == 1, shifted.err
    assert "## bn-inspect diff: ❌ beyond tolerance" in shifted.out and "ran other data" in shifted.out
    loose = invoke(
        capsys,
        [
            "diff",
            digits_report,
            DIGITS / "torchscript.pt",
            "--input",
            DIGITS / "test_images_unscaled.npy",
            "--tolerance",
            "100",
            "--var-tolerance",
            "1000",
            "-q",
        ],
    )
    assert loose.code == 0, loose.out


def test_every_format_says_one_layer_stored_statistics_changed_and_one_input_downstream(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    state = torch.load(DIGITS / "state_dict.pt")
    state["features.4.running_var"] = state["features.4.running_var"] * 4
    corrupted = tmp_path / "corrupted.pt"
    torch.save(state, corrupted)
    argv = ["diff", DIGITS / "state_dict.pt", corrupted, *ARCH, "--input", DIGITS / "test_images.npy", "-q"]
    said = "1 layer's stored statistics changed; 1 downstream input changed"
    table = invoke(capsys, argv)
    assert table.code == 1 and f"{said}." in table.out
    rows = {line.split()[0]: line.split()[3] for line in table.out.splitlines() if line.startswith("features.")}
    assert rows == {"features.1": "unchanged", "features.4": "stored", "features.8": "downstream"}
    assert '"stored": its running statistics moved; "downstream": only its input on the data moved' in table.out
    markdown = invoke(capsys, [*argv, "--format", "markdown"]).out
    assert f"**{said}.**" in markdown and "| `features.8` | BatchNorm2d | **downstream** |" in markdown
    document = json.loads(invoke(capsys, [*argv, "--format", "json"]).out)
    jsonschema.Draft202012Validator(schema("diff")).validate(document)
    assert document["headline"] == said
    assert {layer["new"]: layer["changed"] for layer in document["layers"]} == {
        "features.1": None,
        "features.4": "stored",
        "features.8": "downstream-input",
    }
    page = tmp_path / "diff.html"
    assert invoke(capsys, [*argv, "--format", "html", "--output", page]).code == 1
    text = html.unescape(re.sub(r"<[^>]+>", "", page.read_text(encoding="utf-8")))
    assert f"Failed: {said.lower()} (2 of 3 layer calls beyond the tolerance)." in text


def test_the_tolerance_comes_from_pyproject_unless_a_flag_says_otherwise(
    capsys: pytest.CaptureFixture[str], digits_report: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.bn-inspect]\nmax-drift = 100\nmax-drift-var-ratio = 1000\n")
    monkeypatch.chdir(tmp_path)
    argv = ["diff", digits_report, DIGITS / "torchscript.pt", "--input", DIGITS / "test_images_unscaled.npy", "-q"]
    assert invoke(capsys, argv).code == 0
    assert invoke(capsys, [*argv, "--tolerance", "0.5"]).code == 1


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["diff", "missing.json", "{report}"], ["OLD file missing.json does not exist"]),
        (
            ["diff", "{report}", "{report}", "--input", DIGITS / "test_images.npy"],
            ["two JSON reports run no data, so --input would be ignored"],
        ),
        (["diff", "{v3}", "{report}"], ["has schema_version 3", "Write the report again with this bn-inspect"]),
        (["diff", "{report}", "{report}", "--output", "{report}"], ["--output"]),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(
    capsys: pytest.CaptureFixture[str],
    digits_report: Path,
    tmp_path: Path,
    argv: list[str | Path],
    fragments: list[str],
) -> None:
    v3 = tmp_path / "v3.json"
    v3.write_text(json.dumps({**json.loads(digits_report.read_text()), "schema_version": 3}))
    filled = [str(a).replace("{report}", str(digits_report)).replace("{v3}", str(v3)) for a in argv]
    result = invoke(capsys, filled)
    assert result.code == 2
    assert_one_error_line(result, *fragments)


def test_a_report_without_fingerprints_is_compared_with_a_note(
    capsys: pytest.CaptureFixture[str], digits_report: Path
) -> None:
    result = invoke(capsys, ["diff", GOLDEN / "reports" / "digits_older.json", digits_report, "--format", "json"])
    assert result.code == 0, result.out
    assert any("no data fingerprint" in note for note in json.loads(result.out)["notes"])
