"""--format html: one self-contained page per result kind, built from the result alone, that can fetch nothing.

The page is parsed here (html.parser) for its structure, its escaping and its size; tests/test_html_browser.py
loads it in Chromium.
"""

from __future__ import annotations

import base64
import gzip
import html
import json
import os
import re
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

import bn_inspect
from bn_inspect.output.html.document import CONTENT_SECURITY_POLICY, script_json
from bn_inspect.output.html.pages import html_page
from bn_inspect.output.html.reduction import Reduction, family_reductions, reduction_svg
from bn_inspect.report.records import Report
from bn_inspect.text import Untrusted, inert
from tests.helpers import DIGITS, REPO, assert_one_error_line, invoke
from tests.pages import HOSTILE_NAMES, HostileResults, hostile_results, resnet50_report

MODEL = DIGITS / "torchscript.pt"
IMAGES = DIGITS / "test_images_unscaled.npy"


class Document(HTMLParser):
    """Every start tag with its attributes, the text outside scripts and styles, and each script's text."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self._open: str | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag in ("script", "style"):
            self._open = tag
            if tag == "script":
                self.scripts.append((dict(attrs), ""))

    def handle_endtag(self, tag: str) -> None:
        if tag == self._open:
            self._open = None

    def handle_data(self, data: str) -> None:
        if self._open == "script":
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)
        elif self._open is None:
            self.text.append(data)

    @property
    def data(self) -> dict[str, object]:
        """The page's JSON data block."""
        blocks = [text for attrs, text in self.scripts if attrs.get("id") == "bn-data"]
        assert len(blocks) == 1
        return json.loads(blocks[0])  # type: ignore[no-any-return]

    @property
    def visible_text(self) -> str:
        return "".join(self.text)


@pytest.fixture(scope="module")
def hostile() -> HostileResults:
    return hostile_results()


def _floats(typed: dict[str, str]) -> list[float]:
    assert typed["dtype"] == "f4"
    raw = base64.b64decode(typed["bdata"])
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def assert_fetches_nothing(page: Document) -> None:
    """No element names a URL: no src, no href but in-page anchors, the policy forbids every request."""
    policies = [
        attrs for tag, attrs in page.tags if tag == "meta" and attrs.get("http-equiv") == "Content-Security-Policy"
    ]
    assert [p["content"] for p in policies] == [CONTENT_SECURITY_POLICY]
    assert "default-src 'none'" in CONTENT_SECURITY_POLICY and "connect-src 'none'" in CONTENT_SECURITY_POLICY
    for tag, attrs in page.tags:
        assert "src" not in attrs and "srcset" not in attrs and "action" not in attrs, (tag, attrs)
        for name in ("href", "xlink:href"):
            assert attrs.get(name) is None or str(attrs[name]).startswith("#"), (tag, attrs)
        assert tag not in ("link", "iframe", "img", "object", "embed", "base", "form"), tag


def test_inspect_page_shows_every_layer_with_its_numbers_and_reduction(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "report.html"
    result = invoke(capsys, ["inspect", MODEL, "--input", IMAGES, "--format", "html", "--output", output, "--quiet"])
    assert result.code == 0 and result.out == "" and result.err == ""
    json_result = invoke(capsys, ["inspect", MODEL, "--input", IMAGES, "--format", "json", "--quiet"])
    layers = json.loads(json_result.out)["layers"]
    page = Document(output.read_text(encoding="utf-8"))
    assert_fetches_nothing(page)
    text = page.visible_text
    for layer in layers:
        assert layer["name"] in text
        assert layer["explanation"] in text  # the sentence beside the picture is the report's own
    assert "First departure from the running statistics" in text and "features.1" in text
    assert "torch 2." in text and "bn-inspect 0." in text
    figures = page.data["figures"]
    assert isinstance(figures, dict)
    profile = figures["fig-profile"]["data"]
    assert [round(v, 3) for v in profile[0]["y"]] == [round(float(layer_score(layer)), 3) for layer in layers]
    # Per-channel dots: batch against running mean, as float32 of the report's values.
    dots = figures["fig-0-mean"]["data"][-1]
    assert _floats(dots["y"]) == pytest.approx(layers[0]["batch_mean"], rel=1e-6)
    assert _floats(dots["x"]) == pytest.approx(layers[0]["running_mean"], rel=1e-6)
    assert set(figures) == {"fig-profile", *(f"fig-{i}-{s}" for i in range(len(layers)) for s in ("mean", "var"))}
    svgs = [attrs for tag, attrs in page.tags if tag == "svg" and attrs.get("class") == "reduction"]
    assert len(svgs) == len(layers) + len(family_reductions((1, 1, 1)))


def layer_score(layer: dict[str, object]) -> float:
    return float(layer["departure"]["score"])  # type: ignore[index]


@pytest.mark.parametrize("kind", ["report", "check", "comparison", "recalibration", "diff"])
def test_hostile_layer_names_render_as_text_on_every_page(hostile: HostileResults, kind: str) -> None:
    text = html_page(getattr(hostile, kind), model_output="<u>new</u>.pt")
    page = Document(text)
    assert_fetches_nothing(page)
    # Only the page's own three scripts: data, Plotly.js packed, the page script; no tag a name could open.
    assert [attrs.get("id") for attrs, _ in page.scripts] == ["bn-data", "bn-plotly", None]
    for raw in ("<script>alert", "<img src=x", "<b>hostile", "<u>new", "\u2028", "\x1b"):
        assert raw not in text.replace(_plotly_and_page_script(page), "")
    for name in HOSTILE_NAMES:
        assert inert(name) in page.visible_text
    data_block = next(text for attrs, text in page.scripts if attrs.get("id") == "bn-data")
    assert "<" not in data_block and ">" not in data_block and "&" not in data_block


def _plotly_and_page_script(page: Document) -> str:
    return "".join(text for attrs, text in page.scripts if attrs.get("id") != "bn-data")


def test_script_json_cannot_end_its_script_block() -> None:
    text = script_json({"name": "</script><!--\u2028&amp;"})
    assert re.search(r"[<>&\u2028\u2029]", text) is None
    assert json.loads(text) == {"name": "</script><!--\u2028&amp;"}


def test_plotly_js_travels_packed_and_unpacks_to_the_packages_file() -> None:
    import importlib.util

    text = html_page(hostile_results().report)
    page = Document(text)
    packed = [(attrs, body) for attrs, body in page.scripts if attrs.get("id") == "bn-plotly"]
    assert len(packed) == 1 and packed[0][0]["type"] == "application/gzip-base64"  # data, never run as it is
    spec = importlib.util.find_spec("plotly")
    assert spec is not None and spec.submodule_search_locations is not None
    bundle = Path(next(iter(spec.submodule_search_locations))) / "package_data" / "plotly.min.js"
    assert gzip.decompress(base64.b64decode(packed[0][1])) == bundle.read_bytes()
    assert len(text.encode("utf-8")) < bundle.stat().st_size / 2  # the page is smaller than Plotly.js alone
    assert html_page(hostile_results().report) == text  # the same bytes from run to run


def test_resnet50_sized_page_stays_under_6_mb() -> None:
    report = resnet50_report()
    text = html_page(report)
    assert len(text.encode("utf-8")) < 3_500_000  # 6 MB is issue #19's cap; packed Plotly.js leaves room
    page = Document(text)
    assert sum(1 for tag, attrs in page.tags if tag == "details") == 53
    assert all(layer.label.raw in page.visible_text for layer in report.layers)


@pytest.mark.parametrize(
    ("shape", "names", "reduced", "family", "shaded"),
    [
        ((8, 64, 56, 56), ("N", "C", "H", "W"), (0, 2, 3), "batch", 3),  # one channel, over every sample drawn
        ((8, 64, 56, 56), ("N", "C", "H", "W"), (2, 3), "instance", 1),  # one sample's channel
        ((8, 64, 56, 56), ("N", "C", "H", "W"), (1, 2, 3), "group", 2),  # one sample's group of channels
        ((8, 64, 56, 56), ("N", "C", "H", "W"), (1, 2, 3), "layer", 7),  # one sample, every channel
        ((8, 64, 56, 56), ("N", "C", "H", "W"), (1,), "layer", 7),  # LayerNorm2d: one position across C
        ((4, 10, 32), ("N", "T", "D"), (2,), "layer", 1),  # a token
        ((4, 3), ("N", "C"), (0,), "batch", 4),  # BatchNorm1d on (N, C): all four samples drawn
    ],
)
def test_reduction_picture_shades_the_values_of_one_statistic(
    shape: tuple[int, ...], names: tuple[str, ...], reduced: tuple[int, ...], family: str, shaded: int
) -> None:
    svg = reduction_svg(Reduction(shape, names, reduced, family), "r")
    assert svg.count('href="#r-on"') == shaded
    assert f"{names[1]} = {shape[1]:,}" in svg and f"{names[0]} = {shape[0]:,}" in svg
    if len(shape) == 4:
        assert "each block: H×W = 56×56" in svg
    Document(svg)  # well-formed enough to parse


def test_a_kept_spatial_dim_shades_one_position_only() -> None:
    svg = reduction_svg(Reduction((8, 64, 56, 56), ("N", "C", "H", "W"), (1,), "layer"), "r")
    on = re.search(r'<g id="r-on">(.*?)</g>', svg)
    assert on is not None and 'fill="#e8a33d"' in on.group(1)
    assert re.search(r'<rect width="8.6+7" height="8.6+7" fill="#e8a33d"/>', on.group(1))


@pytest.mark.parametrize("command", ["check", "compare-modes"])
def test_check_and_compare_modes_write_pages(command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "page.html"
    result = invoke(capsys, [command, MODEL, "--input", IMAGES, "--format", "html", "--output", output, "--quiet"])
    assert result.code == (1 if command == "check" else 0) and result.err == ""
    page = Document(output.read_text(encoding="utf-8"))
    assert_fetches_nothing(page)
    for name in ("features.1", "features.4", "features.8"):
        assert name in page.visible_text
    if command == "check":
        assert "Failed: 3 findings at or above error" in page.visible_text
        links = [attrs["href"] for tag, attrs in page.tags if tag == "a" and attrs.get("class") == "jump"]
        assert links.count("#layer-0") >= 2  # the finding and the first departure link to the layer
    else:
        assert "The train/eval gap opens at features.1." in page.visible_text
        assert page.data["figures"]["fig-gap"]["layout"]["annotations"][0]["text"] == "gap opens: features.1"  # type: ignore[index]


def test_recalibrate_writes_its_before_after_page_to_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, report = tmp_path / "new.pt", tmp_path / "before-after.html"
    train = DIGITS / "train_images.npy"
    result = invoke(
        capsys, ["recalibrate", MODEL, "--input", train, "--output", model, "--report", report, "--batches", "3"]
    )
    assert result.code == 0 and "features.1" in result.out  # the table still goes to stdout
    page = Document(report.read_text(encoding="utf-8"))
    assert_fetches_nothing(page)
    assert str(model) in page.visible_text and "features.8" in page.visible_text
    figures = page.data["figures"]
    assert [trace["name"] for trace in figures["fig-shift"]["data"]] == ["before", "after"]  # type: ignore[index]


def test_recalibrate_format_html_goes_to_a_pipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train = DIGITS / "train_images.npy"
    result = invoke(
        capsys,
        ["recalibrate", MODEL, "--input", train, "--output", tmp_path / "n.pt", "--batches", "2", "--format", "html"],
    )
    assert result.code == 0 and result.out.startswith("<!DOCTYPE html>") and "features.4" in result.out


@pytest.mark.parametrize(
    ("report", "fragment"),
    [
        ("INPUT", "is the --input file"),
        ("OUTPUT", "--report and --output name the same file"),
        ("MISSING/r.html", "does not exist"),
    ],
)
def test_recalibrate_report_path_is_protected(
    report: str, fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = tmp_path / "train.npy"
    train.write_bytes((DIGITS / "train_images.npy").read_bytes())
    paths = {"INPUT": train, "OUTPUT": tmp_path / "new.pt"}
    target = paths.get(report, tmp_path / report)
    before = train.read_bytes()
    result = invoke(
        capsys, ["recalibrate", MODEL, "--input", train, "--output", tmp_path / "new.pt", "--report", target]
    )
    assert result.code == 2
    assert_one_error_line(result, "--report", fragment)
    assert train.read_bytes() == before and not (tmp_path / "new.pt").exists()


def test_html_output_is_written_atomically_and_refuses_a_pipe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = tmp_path / "page.html"
    os.mkfifo(fifo)
    result = invoke(capsys, ["inspect", MODEL, "--input", IMAGES, "--format", "html", "--output", fifo, "--quiet"])
    assert result.code == 2
    assert_one_error_line(result, "named pipe")
    output = tmp_path / "old.html"
    output.write_text("old")
    argv = ["inspect", MODEL, "--input", IMAGES, "--format", "html", "--output", output, "--force", "-q"]
    assert invoke(capsys, argv).code == 0
    assert output.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.html", "page.html"]  # no temporary file left


class Terminal:
    """A stdout that says it is a terminal."""

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("command", ["inspect", "check", "compare-modes"])
def test_html_to_a_terminal_is_refused_before_the_run(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdout", Terminal())
    result = invoke(capsys, [command, "missing-model.pt", "--format", "html"])
    assert result.code == 2
    assert_one_error_line(result, "--format html", "--output report.html")


def test_html_to_a_pipe_is_the_page(capsys: pytest.CaptureFixture[str]) -> None:
    result = invoke(capsys, ["inspect", MODEL, "--input", IMAGES, "--format", "html", "--quiet"])
    assert result.code == 0 and result.out.startswith("<!DOCTYPE html>") and result.out.rstrip().endswith("</html>")


def test_layers_listing_has_no_html_format(capsys: pytest.CaptureFixture[str]) -> None:
    result = invoke(capsys, ["layers", MODEL, "--format", "html"])
    assert result.code == 2 and "html" in result.err


def test_only_html_loads_the_page_code_and_nothing_imports_plotly(tmp_path: Path) -> None:
    code = (
        "import sys, io, contextlib; from bn_inspect.cli.main import run\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    run(['--help'])\n"
        f"    run(['inspect', {str(MODEL)!r}, '--shape', '2,1,8,8', '--format', 'json', '--quiet'])\n"
        # notebook.py (the small renderer hook) comes with the package; the page code does not.
        "before = sorted(m for m in sys.modules if m.startswith(('bn_inspect.output.html.', 'plotly')))\n"
        f"run(['inspect', {str(MODEL)!r}, '--shape', '2,1,8,8', '--format', 'html', '--output', {str(tmp_path / 'p.html')!r}, '-q'])\n"
        "after = sorted(m for m in sys.modules if m.startswith(('bn_inspect.output.html.', 'plotly')))\n"
        "print(before, 'bn_inspect.output.html.pages' in after, any(m.startswith('plotly') for m in after))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "['bn_inspect.output.html.notebook'] True False"


def test_page_is_built_from_the_report_alone(hostile: HostileResults) -> None:
    # The same report, copied field by field, gives the same page: nothing but the record is read.
    report = hostile.report
    copy = Report(**{name: getattr(report, name) for name in report.__dataclass_fields__})
    assert html_page(copy) == html_page(report)


@pytest.mark.parametrize("kind", ["report", "check", "comparison", "recalibration", "diff"])
def test_results_draw_their_page_in_a_notebook(hostile: HostileResults, kind: str) -> None:
    result = getattr(hostile, kind)
    shown = result._repr_html_()
    frame = Document(shown)
    assert [tag for tag, _ in frame.tags] == ["iframe"]
    attrs = frame.tags[0][1]
    assert attrs["sandbox"] == "allow-scripts"  # its scripts run, apart from the notebook's document
    page = str(attrs["srcdoc"])
    assert page == html_page(result)
    assert "<script>alert" not in shown and "<img" not in shown
    for name in HOSTILE_NAMES:
        assert html.escape(inert(name)) in page


def test_without_a_renderer_a_result_shows_its_repr() -> None:
    # report/ alone, without bn_inspect/__init__.py (which registers the renderer): the package is
    # stood in for by a bare module, so nothing is registered and the notebook falls back to repr.
    code = (
        "import sys, types\n"
        "package = types.ModuleType('bn_inspect')\n"
        f"package.__path__ = [{str(REPO / 'bn_inspect')!r}]\n"
        "sys.modules['bn_inspect'] = package\n"
        "from bn_inspect.report.display import NotebookDisplay\n"
        "print(NotebookDisplay()._repr_html_(), 'bn_inspect.output' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "None False"


def _every_layer_kind() -> list[tuple[str, Report]]:
    from tests import models

    nan_input = models.make_input((8, 5), mean=1.0)
    nan_input[0, 2] = float("nan")
    cases = [
        ("family", models.Family(), [models.make_input((4, 4, 6, 6), mean=2.0)]),
        ("channel-norms", models.ChannelNorms(), [models.make_input((2, 3, 8, 8))]),
        ("bn3d", models.BN3dVolume(), [models.make_input((2, 3, 4, 4, 4), mean=1.0)]),
        ("shared", models.SharedBN(), [models.make_input((4, 3, 5, 5), mean=3.0)]),
        ("nan", models.BN1dFeatures(), [nan_input]),
        ("empty", models.BN1dFeatures(), [torch.zeros(0, 5), torch.zeros(0, 5)]),
        ("untracked", models.Untracked(), [models.make_input((4, 3, 5, 5), mean=1.0)]),
    ]
    return [(name, bn_inspect.inspect_model(model.eval(), batches)) for name, model, batches in cases]


def test_every_layer_family_and_odd_statistic_gets_a_page() -> None:
    for name, report in _every_layer_kind():
        text = html_page(report)
        page = Document(text)
        figures = page.data["figures"]  # strict JSON: no NaN or Infinity reached it
        assert isinstance(figures, dict)
        for index, layer in enumerate(report.layers):
            assert layer.label.raw in page.visible_text, name
            assert escaped_sentence(layer.explanation) in text, name
            has_plots = layer.batch_mean is not None
            assert (f"fig-{index}-mean" in figures) is has_plots, (name, layer.label)
        svgs = sum(1 for tag, attrs in page.tags if tag == "svg" and attrs.get("class") == "reduction")
        shapes = sum(1 for layer in report.layers if layer.input_shape)
        assert svgs >= shapes, name


def escaped_sentence(sentence: Untrusted) -> str:
    return sentence.html()


def test_check_without_data_gets_a_page(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "check.html"
    result = invoke(capsys, ["check", MODEL, "--no-data", "--format", "html", "--output", output])
    assert result.code == 0
    page = Document(output.read_text(encoding="utf-8"))
    assert "none (--no-data)" in page.visible_text and "Passed" in page.visible_text
    assert "features.4" in page.visible_text


def test_diff_page_shows_both_sides_the_change_profile_and_each_layers_channels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = tmp_path / "old.json"
    assert (
        invoke(
            capsys, ["inspect", MODEL, "--input", DIGITS / "test_images.npy", "--format", "json", "--output", old, "-q"]
        ).code
        == 0
    )
    argv = ["diff", old, MODEL, "--input", IMAGES, "--quiet"]
    output = tmp_path / "diff.html"
    result = invoke(capsys, [*argv, "--format", "html", "--output", output])
    assert result.code == 1 and result.out == "" and result.err == ""  # the exit code is the verdict's
    diff = json.loads(invoke(capsys, [*argv, "--format", "json"]).out)
    page = Document(output.read_text(encoding="utf-8"))
    assert_fetches_nothing(page)
    text = page.visible_text
    for side in ("old", "new"):
        assert diff[side]["model"]["sha256"] in text and diff[side]["input"]["first_batch_sha256"] in text
    for note in diff["notes"]:
        assert f"Note: {note}." in text
    assert (
        "Failed: 3 inputs changed with no stored or structural change before them (3 of 3 layer calls beyond the "
        "tolerance)." in text
    ) and "|mean change| ≤ 0.5 old std" in text
    layers = sorted(diff["layers"], key=lambda layer: layer["position"])
    for layer in layers:
        assert layer["new"] in text
    figures = page.data["figures"]
    assert isinstance(figures, dict)
    profile = figures["fig-profile"]
    running_mean, batch_mean, running_var, batch_var = profile["data"]
    assert batch_mean["y"] == pytest.approx([layer["batch"]["max_abs_mean_change"] for layer in layers])
    assert batch_var["y"] == pytest.approx([layer["batch"]["worst_var_ratio"] for layer in layers])
    assert running_mean["y"] == [0, 0, 0] and running_var["y"] == [1, 1, 1]  # the same model file
    assert profile["layout"]["annotations"][0]["text"] == f"first changed: {diff['first_changed']}"
    assert [shape["y0"] for shape in profile["layout"]["shapes"][:3]] == pytest.approx([0.5, 1.5, 1 / 1.5])
    # Per channel: the batch mean change and var ratio of every layer, as float32 of the diff's values.
    for i, layer in enumerate(layers):
        running, batch = figures[f"fig-{i}-mean"]["data"]
        assert _floats(batch["y"]) == pytest.approx(layer["batch"]["mean_change"], rel=1e-6)
        assert _floats(running["y"]) == pytest.approx(layer["running"]["mean_change"], abs=1e-6)
        assert _floats(figures[f"fig-{i}-var"]["data"][1]["y"]) == pytest.approx(layer["batch"]["var_ratio"], rel=1e-6)
    opened = [attrs["id"] for tag, attrs in page.tags if tag == "details" and "open" in attrs]
    assert opened == ["layer-0"]  # the first changed layer, features.1
    assert "No layer was added, removed or renamed." in text


def test_diff_page_lists_added_removed_and_renamed_layers(hostile: HostileResults) -> None:
    page = Document(html_page(hostile.diff))
    removed = inert(HOSTILE_NAMES[-1])
    structure = page.visible_text.split("Added, removed and renamed layers")[1].split("Each layer's channels")[0]
    assert f"{removed} (BatchNorm2d): removed from OLD" in structure
    # A removed layer has no statistics on one side: its detail says so, and no plot is made up for it.
    figures = page.data["figures"]
    assert isinstance(figures, dict)
    assert set(figures) == {"fig-profile", *(f"fig-{i}-{s}" for i in range(3) for s in ("mean", "var"))}
    assert "No statistics to compare channel by channel for this layer call." in page.visible_text


def test_diff_format_html_to_a_terminal_is_refused_before_the_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdout", Terminal())
    result = invoke(capsys, ["diff", "missing-old.json", "missing-new.json", "--format", "html"])
    assert result.code == 2
    assert_one_error_line(result, "--format html", "--output report.html")
