"""recalibrate's default method against check, and the provenance it records in the report and the model file."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bn_inspect.analyses.provenance import run_data
from bn_inspect.analyses.recalibration import recalibrate
from bn_inspect.model.provenance import RECORD_NAME, StoredRecord, read_stored_record, with_record_entry
from bn_inspect.options import RunOptions
from bn_inspect.report.provenance import RECORD_KIND
from sample_models.architectures import DigitsCNN
from tests import models
from tests.helpers import DIGITS, REPO, deadline, invoke

IMAGES = DIGITS / "train_images.npy"
OTHER = DIGITS / "test_images.npy"

ARCH = ("--arch", "tests.models:ResidualStack")


def residual_files(folder: Path) -> tuple[Path, Path]:
    """A ResidualStack state_dict whose statistics the data does not fit, and 60 samples of that data."""
    torch.manual_seed(0)
    model = models.randomize_norm_state(models.ResidualStack(), seed=3)
    model_path, data_path = folder / "residual.pt", folder / "images.npy"
    torch.save(model.state_dict(), model_path)
    generator = np.random.default_rng(5)
    images = generator.normal(size=(60, 3, 6, 6)) * np.array([1.0, 2.0, 0.5])[:, None, None] + 1.5
    np.save(data_path, images.astype(np.float32))
    return model_path, data_path


def eval_statistics(model: nn.Module, images: torch.Tensor) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Float64 reference: each BatchNorm's eval-mode input over all images, its mean and unbiased variance."""
    model = model.double().eval()
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(lambda _m, args, _o, name=name: inputs.__setitem__(name, args[0]))
        for name, module in model.named_modules()
        if isinstance(module, nn.BatchNorm2d)
    ]
    with torch.no_grad():
        model(images.double())
    for handle in handles:
        handle.remove()
    statistics = {}
    for name, x in inputs.items():
        values = x.transpose(0, 1).reshape(x.shape[1], -1)
        statistics[name] = (values.mean(1).numpy(), values.var(1, unbiased=True).numpy())
    return statistics


def test_default_recalibration_passes_check_on_its_own_data_and_holds_the_eval_statistics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    model_path, data_path = residual_files(tmp_path)
    output = tmp_path / "recalibrated.pt"
    small = ("--batch-size", "4")
    assert invoke(capsys, ["check", model_path, *ARCH, "--input", data_path, *small]).code == 1
    result = invoke(capsys, ["recalibrate", model_path, *ARCH, "--input", data_path, *small, "--output", output])
    assert result.code == 0, result.err
    checked = invoke(capsys, ["check", output, *ARCH, "--input", data_path, *small, "--format", "json"])
    assert checked.code == 0, checked.out
    assert json.loads(checked.out)["findings"] == []

    recalibrated = models.ResidualStack()
    recalibrated.load_state_dict(torch.load(output, weights_only=True))
    images = torch.from_numpy(np.load(data_path))
    reference = eval_statistics(recalibrated, images)
    for name, module in recalibrated.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            mean, var = reference[name]
            np.testing.assert_allclose(module.running_mean.numpy(), mean, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(module.running_var.numpy(), var, rtol=1e-4)
            assert int(module.num_batches_tracked) == 15  # 60 samples in batches of 4

    # precise, on the same batches, describes train-mode inputs: the deepest layer's eval input is not that.
    precise = models.ResidualStack()
    precise.load_state_dict(torch.load(model_path, weights_only=True))
    recalibrate(precise, list(images.split(4)), method="precise")
    deepest = precise.blocks[2]["bn2"]
    ratio = eval_statistics(precise, images)["blocks.2.bn2"][1] / deepest.running_var.double().numpy()
    assert np.abs(ratio - 1).max() > 0.05


# --- provenance: the report, the model file, and check's note ------------------------------------

DIGITS_ARCH = ("--arch", "sample_models.architectures:DigitsCNN")


def safetensors_copy(folder: Path) -> Path:
    from safetensors.torch import save_file

    path = folder / "digits.safetensors"
    save_file(torch.load(DIGITS / "state_dict.pt", weights_only=True), str(path), metadata={"owner": "kept"})
    return path


def load_recalibrated(path: Path, model_file: str) -> dict[str, torch.Tensor]:
    """The recalibrated file, loaded as a user would, with PyTorch's own loaders (strict for a state_dict)."""
    if model_file == "torchscript.pt":
        return dict(torch.jit.load(str(path)).state_dict())
    if model_file == "pickle.pt":
        return dict(torch.load(path, weights_only=False).state_dict())
    if model_file == "safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, weights_only=True)
    model = DigitsCNN()
    model.load_state_dict(state, strict=True)
    return dict(model.state_dict())


@pytest.mark.parametrize("model_file", ["torchscript.pt", "state_dict.pt", "pickle.pt", "safetensors"])
def test_the_recalibrated_file_holds_the_provenance_and_loads_as_before(
    model_file: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    source = safetensors_copy(tmp_path) if model_file == "safetensors" else DIGITS / model_file
    extra = {"torchscript.pt": (), "pickle.pt": ("--trust-pickle",)}.get(model_file, DIGITS_ARCH)
    output = tmp_path / f"new_{source.name}"
    argv = ["recalibrate", source, *extra, "--input", IMAGES, "--batches", "3", "--output", output, "--format", "json"]
    result = invoke(capsys, argv)
    assert result.code == 0, result.err
    provenance = json.loads(result.out)["provenance"]
    assert provenance["source_model"] == str(source)
    assert provenance["method"] == "sequential"
    assert provenance["data"] == {"paths": [str(IMAGES)], "folder": str(REPO), "options": [], "num_samples": 192}
    assert len(provenance["source_sha256"]) == 64

    stored = read_stored_record(output)
    assert stored.ignored_because is None and stored.record is not None
    assert stored.record.to_json() == {"kind": RECORD_KIND, "record_version": 1, **provenance}
    assert read_stored_record(source).record is None
    state = load_recalibrated(output, model_file)
    assert int(state["features.1.num_batches_tracked"]) == 3
    if model_file == "safetensors":
        from safetensors import safe_open

        with safe_open(str(output), framework="pt") as handle:
            assert handle.metadata()["owner"] == "kept"


def test_the_table_markdown_and_page_name_the_source_model_the_data_and_the_method(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("COLUMNS", "200")
    source = DIGITS / "torchscript.pt"
    common = ["recalibrate", source, "--input", IMAGES, "--batches", "2", "--method", "precise"]
    table = invoke(capsys, [*common, "--output", tmp_path / "a.pt", "--report", tmp_path / "a.html"])
    assert table.code == 0, table.err
    assert f"Source model: {source} (sha256 " in table.out
    assert f"Data: {IMAGES} (128 samples)" in table.out
    assert "method precise" in table.out
    page = (tmp_path / "a.html").read_text(encoding="utf-8")
    assert "source model" in page and str(source) in page and f"{IMAGES} (128 samples)" in page
    markdown = invoke(capsys, [*common, "--output", tmp_path / "b.pt", "--format", "markdown"])
    assert f"- source model: `{source}`" in markdown.out
    assert "- method: precise" in markdown.out


def test_check_says_when_it_runs_other_data_than_the_recalibration_and_nothing_when_the_same(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    output = tmp_path / "new.pt"
    given = ["--input", str(IMAGES.relative_to(REPO)), "--batches", "3"]
    assert invoke(capsys, ["recalibrate", DIGITS / "torchscript.pt", *given, "--output", output]).code == 0

    same = invoke(capsys, ["check", output, "--input", IMAGES, "--batches", "3", "--format", "json"])
    assert same.code == 0 and json.loads(same.out)["notes"] == []
    assert "recalibrated by bn-inspect" not in same.err

    said = f"statistics were recalibrated by bn-inspect on {IMAGES.relative_to(REPO)} (192 samples)"
    for other, uses in [
        (["--input", IMAGES, "--batches", "2"], f"this run uses {IMAGES} (128 samples)"),
        (["--input", OTHER, "--batches", "3"], f"this run uses {OTHER} (192 samples)"),
    ]:
        checked = invoke(capsys, ["check", output, *other, "--format", "json"])
        assert json.loads(checked.out)["notes"] == [f"{said}; {uses}"]
        inspected = invoke(capsys, ["inspect", output, *other, "--format", "json"])
        assert f"note: {said}; {uses}." in inspected.err.splitlines()


def test_run_data_names_the_options_that_change_the_values() -> None:
    options = RunOptions(input_file=Path("photos"), resize=36, crop=32, normalize="imagenet", grayscale=True)
    data = run_data(options, 10)
    assert data is not None
    assert data.describe() == "photos (10 samples, --resize 36, --crop 32, --normalize imagenet, --grayscale)"
    assert not data.same_as(run_data(replace(options, grayscale=False), 10))  # type: ignore[arg-type]
    assert data.same_as(run_data(replace(options, input_file=Path("photos/../photos")), 10))  # type: ignore[arg-type]
    assert run_data(RunOptions(shape="1,3,8,8"), 10) is None


# --- read:recalibration-record: forged, oversized, malformed ------------------------------------


def forged(folder: Path, payload: bytes, *, name: str = RECORD_NAME) -> Path:
    """The digits state_dict saved with ``payload`` as its recalibration record."""
    import io

    buffer = io.BytesIO()
    torch.save(torch.load(DIGITS / "state_dict.pt", weights_only=True), buffer)
    path = folder / "forged.pt"
    path.write_bytes(with_record_entry(buffer.getvalue(), payload))
    return path


def record_of(paths: list[str], **changes: object) -> bytes:
    document = {
        "kind": RECORD_KIND,
        "record_version": 1,
        "bn_inspect_version": "0.1.0",
        "method": "sequential",
        "source_model": "model.pt",
        "source_sha256": None,
        "data": {"paths": paths, "folder": "/", "options": [], "num_samples": 5},
        **changes,
    }
    return json.dumps(document).encode("utf-8")


@pytest.mark.surface("read:recalibration-record", "traceback", "memory")
@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{" * 100_000, "over the 65,536-byte budget"),
        (b"[" * 60_000, "not JSON (RecursionError)"),
        (b"\xff\xfe not utf-8", "not JSON (UnicodeDecodeError)"),
        (b'{"kind": "something else"}', "not a bn-inspect recalibration record"),
        (record_of(["a"], record_version=99), "a record version this bn-inspect does not know"),
        (record_of(["a" * 5000]), "paths is not a string of at most 4096 characters"),
        (record_of(["a"] * 65), "paths is not a list of at most 64 strings"),
        (record_of(["a"], data={"paths": ["a"], "folder": "/", "options": [], "num_samples": -1}), "num_samples is"),
        (b'{"num_samples": NaN}', "not JSON (ValueError)"),
    ],
    ids=["oversized", "deep", "not-utf8", "other-kind", "other-version", "long-path", "many-paths", "bad-count", "nan"],
)
def test_a_malformed_record_is_ignored_with_one_note(
    payload: bytes, reason: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = forged(tmp_path, payload)
    with deadline(60):
        result = invoke(capsys, ["check", model, *DIGITS_ARCH, "--input", IMAGES, "--batches", "1"])
    assert result.code == 0, result.err
    notes = [line for line in result.err.splitlines() if "recalibration record" in line]
    assert len(notes) == 1 and notes[0].startswith(
        f"note: {model} holds a bn-inspect recalibration record that is ignored: "
    )
    assert reason in notes[0]
    assert "Traceback" not in result.err + result.out


@pytest.mark.surface("read:recalibration-record", "memory", "hang")
def test_a_record_entry_that_declares_a_huge_size_or_is_a_pipe_is_not_read(tmp_path: Path) -> None:
    import io
    import zipfile

    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer)
    with zipfile.ZipFile(buffer, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"archive/{RECORD_NAME}", b" " * (8 * 2**20))  # 8 MiB of blanks, a few KiB deflated
    bomb = tmp_path / "bomb.pt"
    bomb.write_bytes(buffer.getvalue())
    assert bomb.stat().st_size < 2**20
    with deadline(30):
        stored = read_stored_record(bomb)
        assert stored.record is None and stored.ignored_because == "8,388,608 bytes, over the 65,536-byte budget"
        fifo = tmp_path / "model.pt"
        os.mkfifo(fifo)
        assert read_stored_record(fifo) == StoredRecord()


@pytest.mark.surface("read:recalibration-record", "traceback")
@pytest.mark.surface("render:table", "inert")
@pytest.mark.surface("render:markdown", "inert")
@pytest.mark.surface("render:html", "inert")
@pytest.mark.surface("render:stderr", "inert")
def test_a_forged_record_is_shown_inert_in_every_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hostile = "\x1b]8;;https://evil\x07<script>alert(1)</script>|`x`*\u202e\n::error::"
    model = forged(tmp_path, record_of([hostile]))
    common = ["check", model, *DIGITS_ARCH, "--input", IMAGES, "--batches", "1"]
    table = invoke(capsys, common)
    inspected = invoke(capsys, ["inspect", model, *DIGITS_ARCH, "--input", IMAGES, "--batches", "1"])
    markdown = invoke(capsys, [*common, "--format", "markdown"])
    page_path = tmp_path / "page.html"
    assert invoke(capsys, [*common, "--format", "html", "--output", page_path]).code == 0
    page = page_path.read_text(encoding="utf-8")
    for text in (table.out, inspected.err, markdown.out, page):
        assert "statistics were recalibrated by bn-inspect on" in text
        assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
        assert "\n::error::" not in text
    assert "<script>alert" not in page and "&lt;script&gt;alert" in page and "\\x1b" in page
    assert "\\<script\\>" in markdown.out


# --- the verdict of the report: no green page over layers that still depart ---------------------


def test_layers_that_still_depart_after_recalibration_turn_the_verdict_and_name_the_method(tmp_path: Path) -> None:
    import io

    from rich.console import Console

    from bn_inspect.output.html.run_pages import recalibration_page
    from bn_inspect.output.render_runs import render_recalibration

    model = models.randomize_norm_state(models.ResidualStack(), seed=3)
    images = torch.from_numpy(np.load(residual_files(tmp_path)[1]))
    exact = recalibrate(model, list(images.split(4)))
    assert all(entry.departure_after is not None and entry.departure_after < 0.05 for entry in exact.layers)
    assert exact.departing_after(0.83) == ()
    # As the ResNet-18 after precise: the last layer's eval input 17.6 times its new variance,
    # a mean distance of sqrt(17.6) - 1 = 3.2 running stds, far past the warning level.
    last = replace(exact.layers[-1], worst_var_ratio_after=17.6, departure_after=20.0)
    drifted = replace(exact, method="precise", layers=(*exact.layers[:-1], last))
    assert drifted.departing_after(0.83) == ("blocks.2.bn2",)

    def table(result: object) -> str:
        console = Console(file=io.StringIO(), width=120, no_color=True, record=True)
        console.print(render_recalibration(result, "new.pt", 120))  # type: ignore[arg-type]
        return console.export_text()

    said = "In eval mode on these data, 1 layer (blocks.2.bn2) still departs from the new statistics as check"
    assert said in " ".join(table(drifted).split())
    assert "--method precise takes statistics in train mode" in " ".join(table(drifted).split())
    assert "still depart" not in table(exact)
    assert 'class="verdict verdict-departs"' in recalibration_page(drifted).body
    assert 'class="verdict verdict-within"' in recalibration_page(exact).body
