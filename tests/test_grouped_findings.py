"""check's findings for people: the findings of one rule as one paragraph with its layers (JSON keeps one per layer)."""

from __future__ import annotations

import html
import json
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bn_inspect.output.formats import FILE_WIDTH
from bn_inspect.output.grouped import listed_names
from tests import models
from tests.helpers import invoke

WIDTHS = ("60", "80", "120", "200", "piped")
NAMES = tuple(f"layer{stage}.{block}.bn1" for stage in (1, 2, 3) for block in range(6))


def _blocks() -> nn.Module:
    """18 Conv2d -> BatchNorm2d -> ReLU blocks named as a ResNet's (``layer1.0.bn1`` ... ``layer3.5.bn1``)."""
    stages = OrderedDict()
    for stage in (1, 2, 3):
        blocks = [
            nn.Sequential(OrderedDict([("conv", nn.Conv2d(4, 4, 1)), ("bn1", nn.BatchNorm2d(4)), ("relu", nn.ReLU())]))
            for _ in range(6)
        ]
        stages[f"layer{stage}"] = nn.Sequential(*blocks)
    torch.manual_seed(0)
    return models.randomize_norm_state(nn.Sequential(stages)).eval()


@pytest.fixture(scope="module")
def drifted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A TorchScript model, its data, other data (shifted by 5), and a baseline written on the first."""
    from bn_inspect.cli.main import run

    folder = tmp_path_factory.mktemp("grouped")
    paths = {name: folder / name for name in ("model.pt", "data.npy", "shifted.npy", "baseline.json")}
    torch.jit.script(_blocks()).save(str(paths["model.pt"]))
    data = models.make_input((16, 4, 6, 6)).numpy()
    np.save(paths["data.npy"], data)
    np.save(paths["shifted.npy"], data + 5.0)
    argv = ["check", paths["model.pt"], "--input", paths["data.npy"], "--write-baseline", paths["baseline.json"], "-q"]
    assert run([str(a) for a in argv]) in (0, 1)
    return paths


def _argv(paths: dict[str, Path], *extra: str | Path) -> list[str | Path]:
    return ["check", paths["model.pt"], "--input", paths["shifted.npy"], "--baseline", paths["baseline.json"], *extra]


def test_json_keeps_one_finding_per_layer(capsys: pytest.CaptureFixture[str], drifted: dict[str, Path]) -> None:
    result = invoke(capsys, _argv(drifted, "--format", "json"))
    assert result.code == 1
    drift = [f["layer"] for f in json.loads(result.out)["findings"] if f["code"] == "BN302"]
    assert tuple(drift) == NAMES


@pytest.mark.parametrize("width", WIDTHS)
def test_the_table_shows_one_row_per_rule_with_its_layers_compacted_to_the_width(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, drifted: dict[str, Path], width: str
) -> None:
    if width == "piped":
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", width)
    text = invoke(capsys, _argv(drifted)).out
    limit = FILE_WIDTH if width == "piped" else int(width)
    assert all(len(line) <= limit and line == line.rstrip() for line in text.splitlines())
    assert text.count("BN302") == 1 and "18 layers" in text
    # The row's words, without the rule name that the code column prints beside its second line.
    paragraph = " ".join(word for word in text.split("BN302")[1].split("\n\n")[0].split() if word != "data-drift")
    # The list is NAMES in order: the first few whole, then how many more; never a cut name.
    shown = re.match(r"(.*?) and (\d+) more\. In layer1\.0\.bn1: the batch statistics", paragraph)
    assert shown is not None, paragraph
    names = shown.group(1).split(", ")
    assert tuple(names) == NAMES[: len(names)] and int(shown.group(2)) == len(NAMES) - len(names)
    assert len(names) >= 2 and len(", ".join(names)) <= limit


def test_markdown_and_the_page_name_every_layer_of_the_group(
    capsys: pytest.CaptureFixture[str], drifted: dict[str, Path], tmp_path: Path
) -> None:
    markdown = invoke(capsys, _argv(drifted, "--format", "markdown")).out
    rows = [line for line in markdown.splitlines() if "BN302" in line]
    full = ", ".join(f"`{name}`" for name in NAMES[:-1]) + f" and `{NAMES[-1]}`"
    assert len(rows) == 1 and f"| 18 layers | {full}. In `layer1.0.bn1`: the batch statistics" in rows[0]
    page = tmp_path / "check.html"
    assert invoke(capsys, _argv(drifted, "--format", "html", "--output", page)).code == 1
    source = page.read_text(encoding="utf-8")
    paragraphs = [p for p in re.findall(r'<p class="finding">(.*?)</p>', source) if "BN302" in p]
    assert len(paragraphs) == 1
    links = re.findall(r'<a class="jump" href="#layer-(\d+)">([^<]*)</a>', paragraphs[0])
    assert [name for _, name in links[:18]] == list(NAMES) and [int(i) for i, _ in links[:18]] == list(range(18))
    assert "data-drift · 18 layers: layer1.0.bn1, layer1.1.bn1" in html.unescape(re.sub(r"<[^>]+>", "", paragraphs[0]))
    # Each finding keeps its row in the folded table.
    assert len(re.findall(r"<tr[^>]*>(?:(?!</tr>).)*>BN302<", source, re.S)) == 18


def test_a_list_longer_than_its_budget_shows_the_names_that_fit_and_counts_the_rest() -> None:
    assert listed_names([]) == "" and listed_names(["a"]) == "a" and listed_names(["a", "b"], 1) == "a and b"
    assert listed_names(["a", "b", "c"]) == "a, b and c"
    assert listed_names(list(NAMES), 40) == "layer1.0.bn1, layer1.1.bn1 and 16 more"
    assert listed_names(list(NAMES), 10) == "layer1.0.bn1 and 17 more"  # one name at least
    assert listed_names(["a", "b", "c"], 8) == "a, b and c"  # "a and 2 more" would be longer
    assert listed_names(["aa", "bb", "cc"], 9) == "aa, bb and cc"  # as long as "aa and 2 more": whole
    assert listed_names(["aaaa", "bbbb", "cccc"], 9) == "aaaa and 2 more"
