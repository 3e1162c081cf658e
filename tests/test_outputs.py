"""What people and machines read: golden rendered tables, the JSON schema, CSV and Markdown."""

from __future__ import annotations

import io
import json
import math

import jsonschema
import numpy as np
import pandas as pd
import pytest
import torch
from rich.console import Console

from bn_inspect.analyses.inspection import inspect_model
from bn_inspect.model.loading import load_model
from bn_inspect.output.export import format_number, to_csv, to_json, to_markdown
from bn_inspect.output.render import departure_bar, render_report
from bn_inspect.report import schemas
from bn_inspect.report.records import ModelInfo, Report
from tests import models
from tests.helpers import DIGITS, check_golden, golden_mismatch


def digits_report() -> Report:
    loaded = load_model(DIGITS / "state_dict.pt", arch="sample_models.architectures:DigitsCNN")
    images = torch.from_numpy(np.load(DIGITS / "test_images.npy"))
    return inspect_model(
        loaded.module,
        [images[:200], images[200:]],
        model_info=ModelInfo.of("sample_models/digits_cnn/state_dict.pt", loaded.format, loaded.arch),
        input_source="sample_models/digits_cnn/test_images.npy",
    )


def family_report() -> Report:
    model = models.randomize_norm_state(models.Family()).eval()
    x = models.make_input((3, 4, 5, 6), mean=10.0)
    x[0, 1, 0, 0] = float("nan")
    return inspect_model(model, [x], model_info=ModelInfo.of("tests/models.py:Family", "module"))


def shifted_report() -> Report:
    model = models.randomize_norm_state(models.ConvBN2d()).eval()
    return inspect_model(
        model, [models.make_input((4, 3, 6, 6), mean=3.0)], model_info=ModelInfo.of("ConvBN2d", "module")
    )


REPORTS = {"digits": digits_report, "family": family_report, "shifted": shifted_report}


def rendered(report: Report, width: int, patterns: tuple[str, ...] = ()) -> str:
    console = Console(file=io.StringIO(), width=width, no_color=True, highlight=False, record=True)
    console.print(render_report(report, patterns, width))
    return "\n".join(line.rstrip() for line in console.export_text().splitlines()) + "\n"


@pytest.mark.parametrize("width", [120, 80])
@pytest.mark.parametrize("name", sorted(REPORTS))
def test_rendered_table_matches_golden(name: str, width: int, update_golden: bool) -> None:
    patterns = ("features.1",) if name == "digits" else ("bn1",) if name == "shifted" else ()
    check_golden(f"{name}_{width}.txt", rendered(REPORTS[name](), width, patterns), update_golden)


@pytest.mark.parametrize("name", sorted(REPORTS))
def test_markdown_matches_golden(name: str, update_golden: bool) -> None:
    check_golden(f"{name}.md", to_markdown(REPORTS[name](), ("bn1",)), update_golden)


def schema() -> dict:
    return schemas.schema("inspect")


@pytest.mark.parametrize("name", sorted(REPORTS))
def test_json_validates_against_schema_and_round_trips(name: str) -> None:
    report = REPORTS[name]()
    document = json.loads(to_json(report))
    jsonschema.validate(document, schema())
    assert document["schema_version"] == 1
    for entry, layer in zip(document["layers"], report.layers, strict=True):
        assert entry["name"] == layer.name.raw
        if layer.batch_mean is not None:
            values = [float(v) for v in entry["batch_mean"]]
            assert all(
                a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(values, layer.batch_mean, strict=True)
            )


def test_schema_rejects_a_document_without_layers() -> None:
    document = json.loads(to_json(shifted_report()))
    del document["layers"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, schema())


def test_non_finite_values_are_strings_in_json() -> None:
    document = json.loads(to_json(family_report()))
    inorm = document["layers"][0]
    assert inorm["batch_mean"][1] == "nan"
    assert "nonfinite-input" in inorm["flags"]


def test_csv_has_one_row_per_layer_call_and_channel() -> None:
    report = digits_report()
    frame = pd.read_csv(io.StringIO(to_csv(report)))
    assert len(frame) == sum(layer.num_channels or 0 for layer in report.layers)
    first = report.layers[0]
    rows = frame[frame["layer"] == first.name.raw].sort_values("channel")
    np.testing.assert_array_equal(rows["batch_mean"].to_numpy(), np.array(first.batch_mean))
    np.testing.assert_array_equal(rows["mean_shift_z"].to_numpy(), np.array(first.mean_shift_z))


def test_csv_keeps_layers_without_channel_statistics() -> None:
    frame = pd.read_csv(io.StringIO(to_csv(family_report())))
    assert set(frame["layer"]) == {"inorm", "inorm_plain", "gn", "ln", "rms"}
    assert frame.loc[frame["layer"] == "gn", "channel"].isna().all()


def test_number_format_and_departure_bar() -> None:
    assert format_number(None) == "—"
    assert format_number(float("nan")) == "nan"
    assert format_number(12345.678) == "12,346"
    assert format_number(-0.0123456) == "-0.01235"
    assert format_number(4021.7, 3) == "4,022"
    assert format_number(1.5e-7) == "1.500e-07"
    assert format_number(2.5e8) == "2.500e+08"
    assert departure_bar(0.0).plain == "······"
    assert departure_bar(100.0).plain == "██████"
    assert departure_bar(float("inf")).plain == "██████"
    assert departure_bar(float("nan")).plain == "??????"


@pytest.mark.parametrize(
    ("golden", "actual", "agrees"),
    [
        ("max 2,125,639 (x)", "max 2,125,640 (x)", True),
        ("ratio 1.02e-05", "ratio 1.03e-05", True),
        ("ratio 1.02e-05", "ratio 1.04e-05", False),
        ("mean 0.451", "mean 0.453", False),
        ("layer1.bn  12", "layer1.bn 12", False),
        ("untrained 3", "running 3", False),
    ],
)
def test_golden_comparison_forgives_only_the_last_printed_digit(golden: str, actual: str, agrees: bool) -> None:
    assert (golden_mismatch(golden, actual) is None) is agrees
