"""The Python API's results at a prompt: a repr of a few lines whatever the model's size, .table() as the
terminal shows it, and a model handed over in memory named by its class."""

from __future__ import annotations

import copy
import dataclasses
import json
import re

import jsonschema
import pytest
import torch
from torch import nn

import bn_inspect
from bn_inspect.output.export import to_markdown
from bn_inspect.output.formats import Rendering, TableFormatter
from bn_inspect.output.html.pages import html_page
from bn_inspect.report import schemas
from bn_inspect.report.diff import diff_reports
from bn_inspect.report.display import NotebookDisplay
from bn_inspect.report.records import ModelInfo
from tests import models
from tests.pages import HostileResults, hostile_results
from tests.test_hostile_renderers import _ACTING

NUM_LAYERS = 204
REPR_LIMIT = 2048


class DeepNet(nn.Module):
    """204 BatchNorm1d(16) in a row, with names as long as a deep model's (``stage_....block_....norm``)."""

    def __init__(self) -> None:
        super().__init__()
        self.norms = nn.ModuleDict(
            {f"stage_{i // 12:02d}_{'very_deep_block_' * 2}{i:03d}_norm": nn.BatchNorm1d(16) for i in range(NUM_LAYERS)}
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm in self.norms.values():
            x = norm(x)
        return x


@pytest.fixture(scope="module")
def deep() -> dict[str, NotebookDisplay]:
    """Each kind of result on DeepNet: its running statistics a little off, on shifted data."""
    model = models.randomize_norm_state(DeepNet()).eval()
    batches = [models.make_input((32, 16), mean=0.5, seed=seed) for seed in range(2)]
    report = bn_inspect.inspect_model(model, batches)
    other = bn_inspect.inspect_model(model, [b * 3 for b in batches])
    return {
        "report": report,
        "check": bn_inspect.check_model(model, batches),
        # One batch: compare-modes runs each layer's own pass, the slowest of the five on 204 layers.
        "comparison": bn_inspect.compare_modes(model, batches[:1]),
        "recalibration": bn_inspect.recalibrate(copy.deepcopy(model), batches),
        "diff": diff_reports(report, other),
    }


KINDS = ("report", "check", "comparison", "recalibration", "diff")


@pytest.mark.parametrize("kind", KINDS)
def test_the_repr_of_a_204_layer_result_stays_under_2_kb(kind: str, deep: dict[str, NotebookDisplay]) -> None:
    result = deep[kind]
    shown = repr(result)
    assert len(shown.encode("utf-8")) < REPR_LIMIT, len(shown)
    assert shown.startswith(f"<{type(result).__name__}: ") and shown.endswith(">")
    assert ".table()" in shown
    # The default dataclass repr would hold every per-channel list.
    assert "running_mean" not in shown and "(" in shown


def test_the_report_repr_says_the_verdict_and_the_worst_layers(deep: dict[str, NotebookDisplay]) -> None:
    report = deep["report"]
    assert isinstance(report, bn_inspect.Report)
    lines = repr(report).splitlines()
    assert lines[0].startswith("<Report: bn-inspect: ") and "layers depart; worst " in lines[0]
    assert lines[1] == (
        f" model DeepNet (in memory); {NUM_LAYERS} layer calls; <batches>: 64 samples in 2 batches; mode eval"
    )
    worst = sorted(report.layers, key=lambda layer: -(layer.departure.score if layer.departure else 0))[:5]
    names = re.findall(r"(norms\.\S+) [\d.e+-]+ \(", lines[2])
    assert names == [layer.label.raw for layer in worst]
    assert lines[2].endswith(f"and {NUM_LAYERS - 5} more")


def test_the_check_repr_says_pass_or_fail_and_the_first_findings(deep: dict[str, NotebookDisplay]) -> None:
    check = deep["check"]
    lines = repr(check).splitlines()
    assert re.match(r"<CheckReport: (PASSED|FAILED) \(fails on error\): [\d,]+ errors?, ", lines[0])
    assert sum(1 for line in lines if re.match(r" BN\d{3} (error|warning|info) ", line)) == 5


def test_a_hostile_name_is_cut_and_stays_inert_in_the_repr() -> None:
    name = "x" * 5000
    model = nn.Sequential()
    model.add_module(name, nn.BatchNorm1d(3))
    models.randomize_norm_state(model).eval()
    shown = repr(bn_inspect.inspect_model(model, [models.make_input((8, 3))]))
    assert len(shown.encode("utf-8")) < REPR_LIMIT and "x" * 59 + "…" in shown


@pytest.mark.surface("render:repr", "inert")
def test_hostile_results_have_inert_reprs() -> None:
    results: HostileResults = hostile_results()
    for field in dataclasses.fields(results):
        shown = repr(getattr(results, field.name))
        found = _ACTING.search(shown)
        assert found is None, (field.name, shown[max(0, found.start() - 40) : found.end() + 20])
        assert len(shown.encode("utf-8")) < REPR_LIMIT


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("width", [None, 80, 200])
def test_table_is_the_terminal_text_at_a_width(kind: str, width: int | None, deep: dict[str, NotebookDisplay]) -> None:
    result = deep[kind]
    text = result.table() if width is None else result.table(width)
    expected = TableFormatter().text(result, Rendering(width=width or 120))  # type: ignore[arg-type]
    assert text == expected
    assert max(len(line) for line in text.splitlines()) <= (width or 120)


def test_a_model_in_memory_is_named_by_its_class() -> None:
    model = models.calibrated_resnet()
    data = [models.resnet_data()[1]]
    report = bn_inspect.inspect_model(model, data)
    assert (report.model.source.raw, report.model.format.raw) == ("TinyResNet (in memory)", "module")
    assert bn_inspect.check_model(model, data).model.source.raw == "TinyResNet (in memory)"
    comparison = bn_inspect.compare_modes(model, data)
    assert comparison.model is not None and comparison.model.source.raw == "TinyResNet (in memory)"
    assert report.table().splitlines()[1] == "model TinyResNet (in memory)"
    traced = torch.jit.trace(model, data[0][:2])
    assert bn_inspect.inspect_model(traced, data).model.source.raw == "TinyResNet (in memory)"
    jsonschema.validate(json.loads(json.dumps(report.to_dict())), schemas.schema("inspect"))
    # Every output names it so, without the format: "(module)" would only repeat "(in memory)".
    assert "**Model** `TinyResNet (in memory)` · **input**" in to_markdown(report)
    assert "TinyResNet (in memory)</dd>" in html_page(report)
    assert "(module)" not in to_markdown(report) + html_page(comparison) + repr(report)


def test_a_given_model_info_is_kept() -> None:
    model = models.randomize_norm_state(models.ConvBN2d()).eval()
    info = ModelInfo.of("nets/convbn.pt", "state_dict")
    report = bn_inspect.inspect_model(model, [models.make_input((4, 3, 6, 6))], model_info=info)
    assert report.model == info
    assert report.table().splitlines()[1] == "model nets/convbn.pt (state_dict)"


def test_the_recalibration_table_claims_no_written_file(deep: dict[str, NotebookDisplay]) -> None:
    # The CLI's table ends with "Wrote new.pt"; the API's result wrote nothing.
    assert "Wrote" not in deep["recalibration"].table()
