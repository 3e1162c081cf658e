"""`bn-inspect merge`: the reports of runs over parts of the data equal the report of one run over all of it."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bn_inspect.analyses.inspection import inspect_model
from bn_inspect.analyses.merging import merge_report_files, merge_reports
from bn_inspect.report.reading import load_report, write_report
from bn_inspect.report.schemas import schema
from tests.helpers import Result, assert_one_error_line, deadline, invoke
from tests.models import BN1dFeatures, BN1dSequence, BN3dVolume, ConvBN2d, Family, make_input, randomize_norm_state

# Shard sizes with batch size 4: batches of 4 and remainders, and a shard of one sample.
SHARDS = (5, 7, 1, 3)
BATCH_SIZE = "4"
RTOL = 1e-12
HANG_S = 20
# What differs between one run and the merge of its parts by design: where the input came from.
BY_DESIGN = {"source", "merged_from"}

CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "bn1d-features": (BN1dFeatures, (5,)),
    "bn1d-sequence": (BN1dSequence, (6, 7)),
    "bn2d": (ConvBN2d, (3, 6, 5)),
    "bn3d": (BN3dVolume, (3, 4, 3, 2)),
    "instance-norm": (Family, (4, 6, 5)),
}


def _cli(capsys: pytest.CaptureFixture[str], argv: list[str | Path]) -> Result:
    with deadline(HANG_S):
        return invoke(capsys, argv)


def _model_file(folder: Path, build: Callable[[], nn.Module], dtype: torch.dtype, seed: int = 0) -> Path:
    model = randomize_norm_state(build(), seed).to(dtype).eval()
    path = folder / f"model-{seed}.pt"
    # A whole pickled module (read with --trust-pickle): TorchScript hides InstanceNorm from the capture.
    torch.save(model, path)
    return path


def _shards(folder: Path, sample_shape: tuple[int, ...], dtype: torch.dtype) -> list[Path]:
    """SHARDS samples around 1e3 with spreads of 1e-2 to 1 per channel, one .npy per shard, in name order."""
    data = make_input((sum(SHARDS), *sample_shape), mean=1e3, std=0.5, seed=3).double()
    data = data * torch.logspace(-2, 0, sample_shape[0], dtype=torch.float64).view(
        1, -1, *[1] * (len(sample_shape) - 1)
    )
    folder.mkdir()
    paths = []
    for index, part in enumerate(data.to(dtype).split(SHARDS)):
        paths.append(folder / f"shard-{index}.npy")
        np.save(paths[-1], part.numpy())
    return paths


def _inspect(capsys: pytest.CaptureFixture[str], model: Path, data: Path, output: Path, *extra: str) -> Path:
    argv: list[str | Path] = ["inspect", model, "--trust-pickle", "--input", data, "--batch-size", BATCH_SIZE]
    result = _cli(capsys, [*argv, *extra, "--format", "json", "--output", output, "--quiet"])
    assert result.code == 0, result.err
    return output


def _assert_same(one: Any, merged: Any, where: str = "") -> None:
    """Equal documents, numbers to RTOL: the merge's float64 folds differ from one run's only in order."""
    if isinstance(one, dict):
        assert set(one) | {"merged_from"} == set(merged) | {"merged_from"}, where
        for key in one.keys() - BY_DESIGN:
            _assert_same(one[key], merged[key], f"{where}.{key}")
    elif isinstance(one, list):
        assert len(one) == len(merged), where
        for index, (a, b) in enumerate(zip(one, merged, strict=True)):
            _assert_same(a, b, f"{where}[{index}]")
    elif isinstance(one, float) and isinstance(merged, float):
        assert math.isclose(one, merged, rel_tol=RTOL), (where, one, merged)
    else:
        assert one == merged, where


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return request.param  # type: ignore[no-any-return]


@pytest.mark.parametrize("case", CASES)
def test_merged_parts_equal_one_run_over_all_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, dtype: torch.dtype
) -> None:
    build, sample_shape = CASES[case]
    model = _model_file(tmp_path, build, dtype)
    shards = _shards(tmp_path / "all", sample_shape, dtype)
    _inspect(capsys, model, tmp_path / "all", tmp_path / "one.json")
    parts = [_inspect(capsys, model, shard, tmp_path / f"part-{i}.json") for i, shard in enumerate(shards)]
    result = _cli(capsys, ["merge", *parts, "--output", tmp_path / "merged.json"])
    assert result.code == 0, result.err
    single, merged = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "merged.json"))
    _assert_same(single, merged)
    assert merged["input"]["num_samples"] == sum(SHARDS)
    assert [part["path"] for part in merged["merged_from"]] == [str(p) for p in parts]
    fingerprints = [json.loads(p.read_text())["input"]["first_batch_sha256"] for p in parts]
    assert [part["first_batch_sha256"] for part in merged["merged_from"]] == fingerprints
    jsonschema.Draft202012Validator(schema("inspect")).validate(merged)
    # The same verdict: every layer's departure tier, the first divergent layer and the worst score.
    one_report, merged_report = load_report(tmp_path / "one.json"), load_report(tmp_path / "merged.json")
    assert [getattr(layer.departure, "tier", None) for layer in merged_report.layers] == [
        getattr(layer.departure, "tier", None) for layer in one_report.layers
    ]
    first = [getattr(report.first_divergent(), "label", None) for report in (one_report, merged_report)]
    assert first[0] == first[1]
    worst = [report.worst_departure() for report in (one_report, merged_report)]
    assert worst[0] is not None and worst[1] is not None
    assert (worst[0][0].label, worst[0][1].tier) == (worst[1][0].label, worst[1][1].tier)


@pytest.mark.parametrize("case", ["bn1d-features", "bn3d", "instance-norm"])
def test_merged_statistics_equal_a_float64_reference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    """The first layer sees the data itself: its merged statistics against numpy in float64 over all shards."""
    build, sample_shape = CASES[case]
    model = _model_file(tmp_path, build, torch.float64)
    shards = _shards(tmp_path / "all", sample_shape, torch.float64)
    parts = [_inspect(capsys, model, shard, tmp_path / f"part-{i}.json") for i, shard in enumerate(shards)]
    assert _cli(capsys, ["merge", *parts, "--output", tmp_path / "merged.json"]).code == 0
    first = "inorm" if case == "instance-norm" else "bn"
    layer = next(
        layer for layer in json.loads((tmp_path / "merged.json").read_text())["layers"] if layer["name"] == first
    )
    data = np.concatenate([np.load(shard) for shard in shards])
    if case == "instance-norm":
        # InstanceNorm: the average over samples of each sample's own mean and biased variance.
        flat = data.reshape(*data.shape[:2], -1)
        mean, var = flat.mean(axis=2).mean(axis=0), flat.var(axis=2).mean(axis=0)
    else:
        axes = (0, *range(2, data.ndim))
        mean, var = data.mean(axis=axes), data.var(axis=axes)
    np.testing.assert_allclose(layer["batch_mean"], mean, rtol=RTOL)
    np.testing.assert_allclose(layer["batch_var"], var, rtol=1e-10)


def test_a_part_of_empty_batches_adds_nothing(tmp_path: Path) -> None:
    """A part whose batches hold no sample (N = 0) merges as nothing, in float32 and float64."""
    model = randomize_norm_state(ConvBN2d()).eval()
    batches = [make_input((n, 3, 6, 5), mean=2.0, std=1.5, seed=n) for n in (3, 0, 0, 5, 2)]
    groups = [batches[:1], batches[1:3], batches[3:]]
    one = inspect_model(model, batches).to_dict()
    paths = []
    for index, group in enumerate(groups):
        paths.append(tmp_path / f"part-{index}.json")
        write_report(paths[-1], inspect_model(model, group))
    merged = merge_report_files(paths)
    assert json.loads((tmp_path / "part-1.json").read_text())["layers"][0]["values_per_channel"] == 0
    _assert_same(one, merged.to_dict())


@settings(max_examples=20, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 6), min_size=2, max_size=7),
    cuts=st.sets(st.integers(1, 6), max_size=4),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_any_split_of_the_batches_merges_into_one_run(sizes: list[int], cuts: set[int], dtype: torch.dtype) -> None:
    """Batches of any sizes (empty ones too), cut into parts anywhere: the parts' reports merge into one run's."""
    model = randomize_norm_state(ConvBN2d()).to(dtype).eval()
    batches = [make_input((n, 3, 4, 3), mean=50.0, std=0.1, seed=i).to(dtype) for i, n in enumerate(sizes)]
    bounds = [0, *sorted(c for c in cuts if c < len(batches)), len(batches)]
    parts = [inspect_model(model, batches[a:b]) for a, b in itertools.pairwise(bounds)]
    merged = merge_reports(parts, [f"part-{i}" for i in range(len(parts))])
    _assert_same(inspect_model(model, batches).to_dict(), merged.to_dict())


@pytest.fixture
def parts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, list[Path]]:
    """A float32 ConvBN2d model file and the reports of its three shards."""
    model = _model_file(tmp_path, ConvBN2d, torch.float32)
    shards = _shards(tmp_path / "all", (3, 6, 5), torch.float32)
    return model, [_inspect(capsys, model, shard, tmp_path / f"part-{i}.json") for i, shard in enumerate(shards)]


def test_check_baseline_and_diff_read_a_merged_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], parts: tuple[Path, list[Path]]
) -> None:
    model, reports = parts
    merged, one = tmp_path / "merged.json", tmp_path / "one.json"
    assert _cli(capsys, ["merge", *reports, "--output", merged]).code == 0
    _inspect(capsys, model, tmp_path / "all", one)
    diff = _cli(capsys, ["diff", merged, one, "--format", "json"])
    assert diff.code == 0, diff.err
    assert json.loads(diff.out)["passed"] is True
    findings = []
    for baseline in (merged, one):
        argv: list[str | Path] = [
            "check",
            model,
            "--trust-pickle",
            "--input",
            tmp_path / "all",
            "--batch-size",
            BATCH_SIZE,
        ]
        result = _cli(capsys, [*argv, "--baseline", baseline, "--format", "json"])
        findings.append([(f["code"], f["layer"], f["call"]) for f in json.loads(result.out)["findings"]])
    assert findings[0] == findings[1]
    assert not any(code.startswith("BN3") for code, _, _ in findings[0])


def test_check_write_baseline_records_the_moments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], parts: tuple[Path, list[Path]]
) -> None:
    model, _ = parts
    baseline = tmp_path / "baseline.json"
    _cli(
        capsys, ["check", model, "--trust-pickle", "--input", tmp_path / "all", "--write-baseline", baseline, "--quiet"]
    )
    layers = json.loads(baseline.read_text())["layers"]
    assert all(layer["moments"]["kind"] == "channel" for layer in layers)
    assert all(layer["moments"]["count"] == layer["values_per_channel"] for layer in layers)


def _edited(path: Path, target: Path, edit: Callable[[dict[str, Any]], object]) -> Path:
    document = json.loads(path.read_text())
    edit(document)
    target.write_text(json.dumps(document))
    return target


def _without_moments(document: dict[str, Any]) -> None:
    for layer in document["layers"]:
        del layer["moments"]


def _set_input_dtype(document: dict[str, Any]) -> None:
    document["input"]["dtype"] = "float64"


@pytest.mark.surface("read:merge-part", "traceback")
@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        (_without_moments, ["holds no exact moments for layer bn1", "with this bn-inspect"]),
        (lambda d: d.update(mode="train"), ["is of another mode than", "(train, not eval)"]),
        (_set_input_dtype, ["is of another input dtype than", "(float64, not float32)"]),
        (lambda d: d["layers"].pop(), ["is of other layers than", "(1 layer calls, not 2)"]),
        (
            lambda d: d["layers"][1].update(name="other"),
            ["is of other layers than", "(other (BatchNorm2d, 4 channels), not bn2"],
        ),
        (lambda d: d.update(not_executed=["bn3"]), ["is of other layers than", "(never called: bn3, not none)"]),
        (lambda d: d["model"].update(sha256="0" * 64), ["is of another model than", "(0000000000000000, not"]),
        (
            lambda d: d["layers"][0]["running_var"].__setitem__(0, 7.0),
            ["a model with other stored statistics", "(layer bn1 differs)"],
        ),
    ],
    ids=["no-moments", "mode", "dtype", "fewer-layers", "other-layer", "never-called", "model", "stored-statistics"],
)
def test_reports_of_another_run_are_refused_in_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    parts: tuple[Path, list[Path]],
    edit: Callable[[dict[str, Any]], object],
    fragments: list[str],
) -> None:
    _, reports = parts
    other = _edited(reports[1], tmp_path / "other.json", edit)
    result = _cli(capsys, ["merge", reports[0], other, "--output", tmp_path / "merged.json"])
    assert result.code == 2
    assert_one_error_line(result, *fragments)
    assert not (tmp_path / "merged.json").exists()


@pytest.mark.surface("read:merge-part", "traceback")
@pytest.mark.parametrize("other_run", ["model", "mode"])
def test_a_real_run_of_another_model_or_mode_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], parts: tuple[Path, list[Path]], other_run: str
) -> None:
    model, reports = parts
    shard = tmp_path / "all" / "shard-1.npy"
    if other_run == "model":
        other = _inspect(capsys, _model_file(tmp_path, ConvBN2d, torch.float32, seed=1), shard, tmp_path / "other.json")
    else:
        other = _inspect(capsys, model, shard, tmp_path / "other.json", "--mode", "train")
    result = _cli(capsys, ["merge", reports[0], other, "--output", tmp_path / "merged.json"])
    assert result.code == 2
    assert_one_error_line(result, f"report {other} is of another {other_run} than {reports[0]}")


@pytest.mark.surface("read:merge-part", "traceback")
def test_a_truncated_report_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], parts: tuple[Path, list[Path]]
) -> None:
    _, reports = parts
    truncated = tmp_path / "truncated.json"
    truncated.write_text(reports[1].read_text()[:-300])
    result = _cli(capsys, ["merge", reports[0], truncated, "--output", tmp_path / "merged.json"])
    assert result.code == 2
    assert_one_error_line(result, f"cannot read report {truncated} as JSON")


@pytest.mark.surface("read:merge-part", "traceback")
@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda d: d["layers"][0]["moments"]["m2"].pop(), "layers[0].moments.m2 holds 7 values"),
        (lambda d: d["layers"][0]["moments"].update(count=-1), "layers[0].moments should be non-negative counts"),
        (lambda d: d["layers"][0]["moments"].update(kind="group"), 'layers[0].moments.kind should be "channel"'),
        (lambda d: d["layers"][0]["moments"].update(mean=None), "layers[0].moments.mean holds no values"),
    ],
    ids=["length", "negative", "kind", "missing"],
)
def test_broken_moments_are_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    parts: tuple[Path, list[Path]],
    edit: Callable[[dict[str, Any]], object],
    fragment: str,
) -> None:
    _, reports = parts
    broken = _edited(reports[1], tmp_path / "broken.json", edit)
    result = _cli(capsys, ["merge", reports[0], broken, "--output", tmp_path / "merged.json"])
    assert result.code == 2
    assert_one_error_line(result, f"report {broken}", fragment)


@pytest.mark.surface("read:merge-part", "traceback")
def test_one_report_twice_is_refused_as_double_counting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], parts: tuple[Path, list[Path]]
) -> None:
    _, reports = parts
    result = _cli(capsys, ["merge", reports[0], reports[1], reports[0], "--output", tmp_path / "merged.json"])
    assert result.code == 2
    assert_one_error_line(result, f"report {reports[0]} is given twice", "count its data twice")
    copy = tmp_path / "copy.json"
    copy.write_text(reports[1].read_text())
    result = _cli(capsys, ["merge", reports[0], reports[1], copy, "--output", tmp_path / "merged.json"])
    assert result.code == 2
    assert_one_error_line(result, f"reports {reports[1]} and {copy} hold the same data")


@pytest.mark.surface("write:result", "clobber")
def test_the_output_is_never_an_input_nor_an_existing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], parts: tuple[Path, list[Path]]
) -> None:
    _, reports = parts
    before = reports[0].read_bytes()
    result = _cli(capsys, ["merge", *reports, "--output", reports[0], "--force"])
    assert result.code == 2
    assert_one_error_line(result, str(reports[0]))
    assert reports[0].read_bytes() == before
    existing = tmp_path / "existing.json"
    existing.write_text("keep")
    result = _cli(capsys, ["merge", *reports, "--output", existing])
    assert result.code == 2
    assert existing.read_text() == "keep"
    assert _cli(capsys, ["merge", *reports, "--output", existing, "--force"]).code == 0
    assert json.loads(existing.read_text())["input"]["num_samples"] == sum(SHARDS)


@pytest.mark.surface("read:merge-part", "hang")
def test_a_part_that_is_a_pipe_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], parts: tuple[Path, list[Path]]
) -> None:
    _, reports = parts
    pipe = tmp_path / "pipe.json"
    import os

    os.mkfifo(pipe)
    result = _cli(capsys, ["merge", reports[0], pipe, "--output", tmp_path / "merged.json"])
    assert result.code == 2
    assert_one_error_line(result, f"report {pipe} is a named pipe, not a regular file")


@pytest.mark.surface("read:merge-part", "memory")
def test_a_part_over_the_report_budget_is_refused_before_it_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], parts: tuple[Path, list[Path]]
) -> None:
    _, reports = parts
    big = tmp_path / "big.json"
    with big.open("wb") as stream:
        stream.write(b'{"schema_version": 1, "layers": [')
        stream.truncate(120 * 10**6)
    result = _cli(capsys, ["merge", reports[0], big, "--output", tmp_path / "merged.json"])
    assert result.code == 2
    assert_one_error_line(result, f"report {big} is 120,000,000 bytes, over the")


@pytest.mark.surface("render:stderr", "inert")
def test_a_layer_name_from_a_report_is_inert_in_the_refusal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], parts: tuple[Path, list[Path]]
) -> None:
    _, reports = parts
    hostile = _edited(
        reports[1], tmp_path / "hostile.json", lambda d: d["layers"][1].update(name="bn2\x1b]0;pwned\x07")
    )
    result = _cli(capsys, ["merge", reports[0], hostile, "--output", tmp_path / "merged.json"])
    assert result.code == 2
    assert_one_error_line(result, "is of other layers than", "bn2\\x1b]0;pwned\\x07")
    assert "\x1b" not in result.err and "\x07" not in result.err
