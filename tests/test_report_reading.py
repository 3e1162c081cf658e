"""A JSON inspect report reads back into the Report that wrote it; older versions read, others refused in one line (#21)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from bn_inspect.errors import ReportFileError
from bn_inspect.output.export import to_json
from bn_inspect.report.reading import load_report, read_diff_side, report_from_dict
from bn_inspect.report.records import (
    BufferDivergence,
    DistributedInfo,
    LayerDivergence,
    RankDivergence,
    RankShare,
    Report,
    SyncGroupInfo,
)
from bn_inspect.text import Untrusted
from tests.helpers import DIGITS, GOLDEN, invoke
from tests.test_outputs import family_report

# Written by bn-inspect at 46a6572 (before the fingerprints) on the digits sample.
OLDER = GOLDEN / "reports" / "digits_older.json"


def _round_trip(report: Report, tmp_path: Path) -> Report:
    path = tmp_path / "report.json"
    path.write_text(to_json(report))
    return load_report(path)


def test_a_report_with_nan_and_infinite_statistics_reads_back_equal(tmp_path: Path) -> None:
    report = family_report()
    assert any(math.isnan(v) for layer in report.layers for v in layer.batch_mean or ())
    # NaN != NaN: compared as documents, where NaN is "nan".
    assert _round_trip(report, tmp_path).to_dict() == report.to_dict()


def test_a_report_of_a_run_over_ranks_reads_back_equal(tmp_path: Path) -> None:
    divergence = RankDivergence(
        2,
        (
            LayerDivergence(
                Untrusted("bn"), Untrusted("BatchNorm2d"), (BufferDivergence("running_mean", math.nan, (1,), (0, 2)),)
            ),
        ),
    )
    distributed = DistributedInfo(
        2, "gloo", (RankShare(0, 2, 13), RankShare(1, 1, 1)), (SyncGroupInfo(Untrusted("0"), (0, 1), True),), divergence
    )
    report = family_report()
    ranked = Report(**{**report.__dict__, "distributed": distributed})
    back = _round_trip(ranked, tmp_path)
    assert back.to_dict() == ranked.to_dict() and back.distributed is not None
    assert (
        back.distributed.shares == distributed.shares
        and back.distributed.sync_batch_norm == distributed.sync_batch_norm
    )


def test_a_cli_report_reads_back_to_the_same_document(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = tmp_path / "golden.json"
    result = invoke(
        capsys,
        [
            "inspect",
            DIGITS / "torchscript.pt",
            "--input",
            DIGITS / "test_images.npy",
            "--output",
            target,
            "--format",
            "json",
        ],
    )
    assert result.code == 0, result.err
    assert load_report(target).to_dict() == json.loads(target.read_text())
    assert read_diff_side(target, "OLD") is not None and read_diff_side(DIGITS / "torchscript.pt", "NEW") is None
    from safetensors.torch import save_file

    save_file({"bn.running_mean": torch.zeros(3)}, tmp_path / "model.safetensors")
    assert read_diff_side(tmp_path / "model.safetensors", "NEW") is None


def test_a_report_written_before_the_fingerprints_reads_without_them() -> None:
    report = load_report(OLDER)
    assert "sha256" not in json.loads(OLDER.read_text())["model"]
    assert report.model.sha256 is None and report.input.first_batch_sha256 is None
    assert report.bn_inspect_version.raw == "" and report.torch_version.raw.startswith("2.")
    assert [layer.name.raw for layer in report.layers] == ["features.1", "features.4", "features.8"]
    assert report.input.num_samples == 450 and report.layers[0].running_var is not None
    # The earliest version-1 reports had no "kind".
    document = json.loads(OLDER.read_text())
    del document["kind"]
    assert report_from_dict(document) == report


def _document() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(OLDER.read_text())
    return document


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (
            lambda d: d.update(schema_version=3),
            "has schema_version 3, and this bn-inspect reads only version 1",
        ),
        (lambda d: d.update(schema_version="1"), "has schema_version '1'"),
        (lambda d: d.update(kind="check"), "is a 'check' document, which holds no per-layer statistics"),
        (lambda d: d.pop("schema_version"), "is not a bn-inspect report (no schema_version)"),
        (lambda d: d["layers"][0].update(running_var="high"), "field layers[0].running_var should be a list"),
        (
            lambda d: d["layers"][1]["batch_mean"].__setitem__(3, "NaN"),
            "field layers[1].batch_mean[3] should be a number",
        ),
        (lambda d: d["layers"][0].update(call=True), "field layers[0].call should be an integer"),
        (lambda d: d["input"].pop("num_samples"), "has no field input.num_samples"),
        (lambda d: d.update(layers={}), "field layers should be a list"),
    ],
)
def test_a_report_that_cannot_be_read_is_one_error_naming_the_problem(change: Any, fragment: str) -> None:
    document = _document()
    change(document)
    with pytest.raises(ReportFileError, match=None) as caught:
        report_from_dict(document, "old.json")
    assert fragment in caught.value.line() and "\n" not in caught.value.line()


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"{not json", "cannot read report"),
        (b"\xff\xfe{}", "cannot read report"),
        (b"[1, 2]", "not a bn-inspect report"),
    ],
)
def test_a_file_that_is_no_report_is_refused(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "r.json"
    path.write_bytes(content)
    with pytest.raises(ReportFileError, match=fragment):
        load_report(path)
    with pytest.raises(ReportFileError, match="does not exist"):
        load_report(tmp_path / "missing.json")
    with pytest.raises(ReportFileError, match="is a directory"):
        load_report(tmp_path)
