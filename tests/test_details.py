"""The pictures and details of one layer: GroupNorm's groups drawn as recorded, and a layer without
per-channel statistics said in one line instead of an empty table."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from torch import nn

from bn_inspect.analyses.inspection import inspect_model
from bn_inspect.output.export import to_json, to_markdown
from bn_inspect.output.formats import Rendering, TableFormatter
from bn_inspect.output.html.pages import html_page
from bn_inspect.output.html.reduction import Reduction, reduction_svg
from bn_inspect.report import schemas
from bn_inspect.report.reading import report_from_dict
from bn_inspect.report.records import ModelInfo, Report
from tests import models

NCHW = ("N", "C", "H", "W")


class GroupNet(nn.Module):
    """Conv2d -> GroupNorm(groups, 16): input (N, 3, H, W)."""

    def __init__(self, num_groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 1)
        self.gn = nn.GroupNorm(num_groups, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gn(self.conv(x))


def group_report(num_groups: int) -> Report:
    model = models.randomize_norm_state(GroupNet(num_groups)).eval()
    return inspect_model(model, [models.make_input((8, 3, 4, 4))], model_info=ModelInfo.of("GroupNet", "module"))


# C = 16 draws 7 channels and an ellipsis; N is kept, so one row of the drawn ones is shaded.
@pytest.mark.parametrize(
    ("num_groups", "shaded", "edges", "key"),
    [
        (2, 7, 0, "a group of 8 channels"),
        (4, 4, 1, "a group of 4 channels"),
        (8, 2, 3, "a group of 2 channels"),
        (16, 1, 6, "a group of 1 channel"),
    ],
)
def test_group_norm_picture_shades_one_group_of_c_over_g_channels(
    num_groups: int, shaded: int, edges: int, key: str
) -> None:
    svg = reduction_svg(Reduction((8, 16, 4, 4), NCHW, (1, 2, 3), "group", num_groups), "r")
    assert svg.count('href="#r-on"') == shaded
    assert svg.count('class="group-edge"') == edges
    assert f"the values behind one mean and variance: {key}" in svg


@pytest.mark.parametrize("num_groups", [None, 0, 3, 17])
def test_a_group_count_missing_or_not_fitting_c_keeps_the_old_two_columns(num_groups: int | None) -> None:
    # None: a report written before num_groups; the others only a hand-edited report file holds.
    svg = reduction_svg(Reduction((8, 16, 4, 4), NCHW, (1, 2, 3), "group", num_groups), "r")
    assert svg.count('href="#r-on"') == 2


@pytest.mark.parametrize(("num_groups", "shaded"), [(2, 7), (4, 4), (8, 2), (16, 1)])
def test_inspect_records_the_group_count_and_the_page_draws_it(num_groups: int, shaded: int) -> None:
    report = group_report(num_groups)
    (layer,) = report.layers
    assert layer.num_groups == num_groups
    page = html_page(report)
    assert page.count('href="#reduction-0-on"') == shaded


def test_the_group_count_is_in_the_json_schema_and_reads_back() -> None:
    document = json.loads(to_json(group_report(4)))
    jsonschema.validate(document, schemas.schema("inspect"))
    assert document["schema_version"] == 1 and document["layers"][0]["num_groups"] == 4
    assert report_from_dict(document).layers[0].num_groups == 4
    del document["layers"][0]["num_groups"]  # a report written before the field
    jsonschema.validate(document, schemas.schema("inspect"))
    assert report_from_dict(document).layers[0].num_groups is None


def test_only_group_norm_records_a_group_count() -> None:
    report = inspect_model(
        models.randomize_norm_state(models.Family()).eval(),
        [models.make_input((3, 4, 5, 6))],
        model_info=ModelInfo.of("Family", "module"),
    )
    assert {layer.name.raw: layer.num_groups for layer in report.layers} == {
        "inorm": None,
        "inorm_plain": None,
        "gn": 2,
        "ln": None,
        "rms": None,
    }


def test_a_layer_without_per_channel_statistics_says_so_in_one_line() -> None:
    report = inspect_model(
        models.randomize_norm_state(models.Family()).eval(),
        [models.make_input((3, 4, 5, 6))],
        model_info=ModelInfo.of("Family", "module"),
    )
    text = TableFormatter().text(report, Rendering(width=200, channel_patterns=("gn", "ln", "inorm")))
    assert (
        "gn (GroupNorm): no per-channel statistics (its statistics are per sample and group of channels, "
        "not per channel)." in text.splitlines()
    )
    assert (
        "ln (LayerNorm): no per-channel statistics (its statistics are per sample or position, not per channel)."
        in (text.splitlines())
    )
    assert "gn (GroupNorm), per channel" not in text and "ln (LayerNorm), per channel" not in text
    # InstanceNorm's per-channel figures (averaged over samples) still get their table.
    assert "inorm (InstanceNorm2d), per channel" in text
    markdown = to_markdown(report, ("gn",))
    assert (
        "`gn` (`GroupNorm`): no per-channel statistics (its statistics are per sample and group of channels, "
        "not per channel)." in markdown.splitlines()
    )
    assert "| ch | batch mean |" not in markdown
