"""`bn-inspect timeline` on timelines the real bn_inspect.watch wrote: real training with planted faults, and a killed run."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import torch
from torch import nn

import bn_inspect
from bn_inspect.report.schemas import schema, timeline_record_schema
from bn_inspect.report.timeline_reading import read_timelines
from tests.helpers import REPO, invoke
from tests.training import new_net, records, train


def _faulty_run(path: Path) -> None:
    """60 steps of the digits net: bn2's momentum 0 (statistics frozen), a NaN in the input at step 33."""
    model = new_net()
    model.bn2.momentum = 0.0

    def plant(step: int, _model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if step == 33:
            x = x.clone()
            x[0, 0, 0, 0] = math.nan
        return x

    with bn_inspect.watch(model, path, every=10):
        train(model, 60, before_step=plant)


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("watch") / "bn-watch.jsonl"
    _faulty_run(path)
    return path


def test_every_line_the_watch_writes_validates_against_the_record_schema(faulty: Path) -> None:
    validator = jsonschema.Draft202012Validator(timeline_record_schema())
    for record in records(faulty):
        validator.validate(record)


def test_the_reader_keeps_what_the_watch_wrote(faulty: Path) -> None:
    written = records(faulty)
    timeline = read_timelines([faulty])
    found = [(r["step"], r["code"], r["layer"], r["severity"]) for r in written if r["record"] == "event"]
    assert [(e.step, e.code, e.layer, e.severity.value) for e in timeline.events] == found
    assert ("BN501" in {e.code for e in timeline.events}) and ("BN502" in {e.code for e in timeline.events})
    nan = next(e for e in timeline.events if e.code == "BN501")
    assert (nan.step, nan.layer) == (33, "bn1")
    samples = [r for r in written if r["record"] == "sample" and r["phase"] == "train"]
    for series in timeline.series:
        entries = [next(e for e in s["layers"] if e["layer"] == series.layer.raw) for s in samples]
        assert list(series.steps) == [s["step"] for s in samples]
        assert list(series.departures) == [e["departure"] for e in entries]
        assert list(series.running_mean_norms) == [e["running_mean_norm"] for e in entries]
    assert timeline.is_complete and timeline.last_step == 59 and timeline.num_samples == 6
    first = timeline.first_bad
    assert first is not None and first.step == min(e.step for e in timeline.events if e.severity.value != "info")


def test_the_command_fails_on_the_nan_and_names_the_first_bad_step(
    faulty: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = invoke(capsys, ["timeline", faulty])
    assert result.code == 1 and result.err == ""
    assert "BN501" in result.out and "BN502" in result.out
    assert invoke(capsys, ["timeline", faulty, "--fail-on", "never"]).code == 0
    document = json.loads(invoke(capsys, ["timeline", faulty, "--format", "json"]).out)
    jsonschema.Draft202012Validator(schema("timeline")).validate(document)
    # bn1 is NaN from step 33 on: its series has no score there, and its largest is before.
    bn1 = next(layer for layer in document["layers"] if layer["layer"] == "bn1")
    assert all(d is None for s, d in zip(bn1["steps"], bn1["departures"], strict=True) if s >= 40)
    assert bn1["max_step"] < 33
    page = tmp_path / "timeline.html"
    assert invoke(capsys, ["timeline", faulty, "--format", "html", "--output", page]).code == 1
    assert "fig-heatmap" in page.read_text(encoding="utf-8")


_KILLED_RUN = """
import sys, bn_inspect
from tests.training import new_net, train
model = new_net()
with bn_inspect.watch(model, sys.argv[1], every=1):
    train(model, 100_000)
"""


def test_a_run_killed_mid_training_is_read_up_to_its_last_whole_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bn-watch.jsonl"
    process = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(path)], cwd=REPO, env={**os.environ})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not path.exists() or path.read_bytes().count(b"\n") < 8):
            time.sleep(0.2)
        assert path.exists() and path.read_bytes().count(b"\n") >= 8, "the run wrote too little"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    result = invoke(capsys, ["timeline", path, "--format", "json"])
    assert result.code == 0, result.err
    document = json.loads(result.out)
    assert document["complete"] is False
    assert any("has no end record: the run was killed or is still running" in note for note in document["notes"])
    whole = path.read_bytes().count(b"\n")
    # Every whole line is read: the header, then one sample a step (no event on a healthy run).
    assert document["samples"] == whole - 1
