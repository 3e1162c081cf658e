"""Every JSON document a command writes validates against the schema of its kind, and each schema can fail."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from bn_inspect.report.schemas import SCHEMA_FILES, schema
from tests.helpers import DIGITS, GOLDEN, REPO, SAMPLES

MODEL = DIGITS / "torchscript.pt"
SHIFTED = DIGITS / "test_images_unscaled.npy"
MATCHING = DIGITS / "test_images.npy"
TRAIN = DIGITS / "train_images.npy"

# name: (kind, argv after the command, exit code); "{out}" stands for a fresh output file.
RUNS: dict[str, tuple[str, list[str | Path], int]] = {
    "inspect": ("inspect", ["inspect", MODEL, "--input", SHIFTED], 0),
    "inspect-cancer-csv": (
        "inspect",
        [
            "inspect",
            SAMPLES / "cancer_mlp" / "torchscript.pt",
            "--input",
            SAMPLES / "cancer_mlp" / "test.csv",
            "--drop-column",
            "label",
        ],
        0,
    ),
    "inspect-images": (
        "inspect",
        ["inspect", MODEL, "--input", DIGITS / "test_png", "--grayscale", "--resize", "8"],
        0,
    ),
    "check-images": ("check", ["check", MODEL, "--input", DIGITS / "test_png", "--grayscale"], 0),
    "check-findings": ("check", ["check", MODEL, "--input", SHIFTED], 1),
    "check-passing": ("check", ["check", MODEL, "--input", MATCHING], 0),
    "check-no-data": ("check", ["check", MODEL, "--no-data"], 0),
    "check-infinite-threshold": ("check", ["check", MODEL, "--input", SHIFTED, "--departure-error", "inf"], 0),
    "layers-state-dict": ("layers", ["layers", DIGITS / "state_dict.pt"], 0),
    "layers-torchscript": ("layers", ["layers", MODEL], 0),
    "compare-modes": ("compare-modes", ["compare-modes", MODEL, "--input", SHIFTED], 0),
    "diff": ("diff", ["diff", GOLDEN / "reports" / "digits_older.json", MODEL, "--input", SHIFTED], 1),
    # A watched run with a lag warning and a non-finite error (exit 1: an error event).
    "timeline": ("timeline", ["timeline", GOLDEN / "timelines" / "run.jsonl"], 1),
    "recalibrate-precise": (
        "recalibrate",
        ["recalibrate", MODEL, "--input", TRAIN, "--output", "{out}", "--method", "precise"],
        0,
    ),
    "recalibrate-sequential": (
        "recalibrate",
        ["recalibrate", MODEL, "--input", TRAIN, "--output", "{out}", "--method", "sequential"],
        0,
    ),
}


@pytest.fixture(scope="module")
def documents(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Each run's JSON document, each command run once for the whole file."""
    from bn_inspect.cli.main import run

    found = {}
    for name, (_, argv, expected_code) in RUNS.items():
        out = tmp_path_factory.mktemp(name) / "model.pt"
        args = [str(out) if arg == "{out}" else str(arg) for arg in argv] + ["--format", "json"]
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = run(args)
        assert code == expected_code, (name, code, stderr.getvalue())
        found[name] = json.loads(stdout.getvalue())
    return found


@pytest.mark.parametrize("name", sorted(RUNS))
def test_every_json_output_validates_against_the_schema_of_its_kind(
    name: str, documents: dict[str, dict[str, Any]]
) -> None:
    document = documents[name]
    kind = RUNS[name][0]
    assert document["kind"] == kind and document["schema_version"] == 1
    jsonschema.Draft202012Validator(schema(kind)).validate(document)


def test_the_runs_reach_the_branches_a_schema_must_allow(documents: dict[str, dict[str, Any]]) -> None:
    # Nullable and optional parts of the documents are exercised, not only their common case.
    assert documents["check-findings"]["findings"] and not documents["check-passing"]["findings"]
    assert {f["cause"] for f in documents["check-findings"]["findings"]} == {"input-scale"}
    assert documents["check-no-data"]["input"] is None
    assert documents["check-infinite-threshold"]["thresholds"]["error"] == "inf"
    assert documents["layers-state-dict"]["types_inferred"] is True
    assert documents["layers-state-dict"]["layers"][0]["eps"] is None
    assert documents["layers-torchscript"]["layers"][0]["eps"] is not None
    assert documents["compare-modes"]["output"] is not None
    assert documents["inspect-images"]["input"]["preprocessing"] == "resize 8, normalize none, grayscale"
    assert documents["check-images"]["input"]["preprocessing"] == "normalize none, grayscale"
    assert documents["inspect"]["input"]["preprocessing"] is None
    assert {documents[f"recalibrate-{m}"]["method"] for m in ("precise", "sequential")} == {"precise", "sequential"}


@pytest.mark.parametrize("kind", sorted(SCHEMA_FILES))
def test_each_schema_is_a_valid_draft_2020_12_schema_named_for_its_kind(kind: str) -> None:
    found = schema(kind)
    jsonschema.Draft202012Validator.check_schema(found)
    assert found["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert found["$id"].endswith("/" + SCHEMA_FILES[kind])
    assert found["title"] == f"bn-inspect {kind}"
    assert found["properties"]["kind"]["const"] == kind


def test_an_unknown_kind_names_the_kinds_there_are() -> None:
    with pytest.raises(KeyError, match="compare-modes"):
        schema("report")


def _drop(path: tuple[str | int, ...]) -> Any:
    def mutate(document: Any) -> None:
        *parents, last = path
        for key in parents:
            document = document[key]
        del document[last]

    return mutate


def _set(path: tuple[str | int, ...], value: Any) -> Any:
    def mutate(document: Any) -> None:
        *parents, last = path
        for key in parents:
            document = document[key]
        document[last] = value

    return mutate


# Real mistakes a schema must catch: per run, a missing required field, a wrong type, an unknown value.
BROKEN = {
    "inspect": [
        _drop(("layers",)),
        _drop(("layers", 0, "running_var")),
        _set(("layers", 0, "call"), "0"),
        _set(("layers", 0, "batch_mean", 0), "NaN"),
        _set(("kind",), "check"),
        _set(("mode",), "training"),
        _set(("model", "sha256"), "95DB7D92"),
        _drop(("input", "first_batch_sha256")),
        _drop(("bn_inspect_version",)),
    ],
    "check-findings": [
        _drop(("passed",)),
        _drop(("findings", 0, "severity")),
        _set(("findings", 0, "severity"), "fatal"),
        _set(("findings", 0, "channels"), "0-15"),
        _set(("fail_on",), "info"),
        _set(("thresholds", "min_values"), 16.5),
        _set(("model", "format"), "onnx"),
        _set(("verdict",), "failed"),
        _set(("findings", 0, "cause"), "input scale"),
        _set(("findings", 0, "cause_sentence"), 1),
    ],
    "check-no-data": [_drop(("input",)), _set(("input",), "none"), _set(("kind",), "inspect")],
    "layers-torchscript": [
        _drop(("types_inferred",)),
        _drop(("layers", 0, "eval_uses")),
        _set(("layers", 0, "eval_uses"), "both"),
        _set(("layers", 0, "affine"), "yes"),
        _set(("layers", 0, "extra"), 1),
        _set(("schema_version",), 2),
    ],
    "compare-modes": [
        _drop(("gap_opens_at",)),
        _drop(("layers", 0, "own_rel_diff")),
        _set(("layers", 0, "output_rel_diff"), None),
        _set(("output", "argmax_change_fraction"), 1.5),
        _set(("num_samples",), "450"),
    ],
    "timeline": [
        _drop(("first_bad_step",)),
        _set(("events", 0, "severity"), "fatal"),
        _set(("layers", 0, "max_step"), "70"),
        _set(("fail_on",), "critical"),
        _set(("validations", 0, "largest", "departure"), "0.5"),
        _set(("layers", 0, "extra"), 1),
    ],
    "diff": [
        _drop(("first_changed",)),
        _set(("layers", 0, "status"), "moved"),
        _set(("layers", 0, "running", "mean_change", 0), "NaN"),
        _set(("old", "input", "first_batch_sha256"), "abc"),
        _set(("tolerance", "max_var_ratio"), None),
    ],
    "recalibrate-sequential": [
        _drop(("num_waves",)),
        _drop(("layers", 0, "new_running_var")),
        _set(("method",), "exact"),
        _set(("layers", 0, "new_running_mean"), None),
        _set(("skipped",), [{"name": "bn", "type": "BatchNorm2d"}]),
    ],
}


@pytest.mark.parametrize(
    ("name", "index"), [(name, index) for name, mutations in BROKEN.items() for index in range(len(mutations))]
)
def test_each_schema_rejects_a_broken_document(name: str, index: int, documents: dict[str, dict[str, Any]]) -> None:
    document = copy.deepcopy(documents[name])
    BROKEN[name][index](document)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema(RUNS[name][0])).validate(document)


def test_every_command_with_json_output_has_a_schema_run_here() -> None:
    assert {kind for kind, _, _ in RUNS.values()} == set(SCHEMA_FILES)
    assert set(BROKEN) <= set(RUNS) and {RUNS[name][0] for name in BROKEN} == set(SCHEMA_FILES)


def test_the_schemas_ship_in_a_built_wheel(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / part, source / part)
    shutil.copytree(REPO / "bn_inspect", source / "bn_inspect", ignore=shutil.ignore_patterns("__pycache__"))
    environment = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            tmp_path / "dist",
            source,
        ],
        check=True,
        env=environment,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("bn_inspect-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"bn_inspect/report/{file}" for file in SCHEMA_FILES.values()} <= names
    assert "bn_inspect/report/schemas.py" in names


def test_a_report_with_skipped_images_validates_and_a_negative_count_does_not(tmp_path: Path) -> None:
    from PIL import Image

    from bn_inspect.cli.main import run

    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(3):
        Image.new("L", (8, 8), color=index * 40).save(folder / f"{index}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        assert run(["inspect", str(MODEL), "--input", str(folder), "--grayscale", "--format", "json"]) == 0
    document = json.loads(stdout.getvalue())
    assert document["input"]["num_skipped_files"] == 1
    assert document["input"]["skipped_files"] == [str(folder / "broken.png")]
    validator = jsonschema.Draft202012Validator(schema("inspect"))
    validator.validate(document)
    document["input"]["num_skipped_files"] = -1
    assert not validator.is_valid(document)
