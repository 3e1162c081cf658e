"""How a watched run ended, in its timeline's end record and in `bn-inspect timeline`: an exception, a refusal, nothing watched."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch
from torch import nn

import bn_inspect
from bn_inspect.errors import WatchError
from bn_inspect.report.schemas import timeline_record_schema
from bn_inspect.report.watch_records import end_record
from tests.helpers import invoke
from tests.training import new_net, records, train


def _raising_run(path: Path, message: str = "CUDA out of memory (simulated)") -> None:
    model = new_net()

    def explode(step: int, _model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if step == 6:
            raise RuntimeError(message)
        return x

    with pytest.raises(RuntimeError), bn_inspect.watch(model, path, every=2):
        train(model, 20, before_step=explode)


def test_a_block_that_raised_names_the_exception_in_its_end_record_and_the_command_notes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "raised.jsonl"
    _raising_run(path)
    end = records(path)[-1]
    assert end["exception"] == {"type": "RuntimeError", "message": "CUDA out of memory (simulated)"}
    assert (end["step"], end["steps"]) == (5, 6)
    validator = jsonschema.Draft202012Validator(timeline_record_schema())
    for record in records(path):
        validator.validate(record)
    result = invoke(capsys, ["timeline", path])
    assert result.code == 0, result.err
    assert "Note: the run ended with RuntimeError at step 5: CUDA out of memory (simulated)." in result.out
    document = json.loads(invoke(capsys, ["timeline", path, "--format", "json"]).out)
    assert document["notes"] == ["the run ended with RuntimeError at step 5: CUDA out of memory (simulated)"]


def test_a_clean_run_has_no_exception_and_no_note(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "clean.jsonl"
    model = new_net()
    with bn_inspect.watch(model, path, every=5):
        train(model, 6)
    assert "exception" not in records(path)[-1]
    document = json.loads(invoke(capsys, ["timeline", path, "--format", "json"]).out)
    assert document["notes"] == []


def test_a_block_without_a_training_forward_says_nothing_was_watched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "idle.jsonl"
    model = new_net().eval()
    with pytest.raises(WatchError, match="saw no training-mode forward"), bn_inspect.watch(model, path):
        model(torch.randn(4, 1, 8, 8))
    end = records(path)[-1]
    assert end["steps"] == 0 and end["exception"]["type"] == "WatchError"
    assert end["exception"]["message"].startswith("the watch saw no training-mode forward of the model")
    result = invoke(capsys, ["timeline", path])
    assert "Note: nothing was watched (0 steps); the watch ended with WatchError: the watch saw no" in " ".join(
        result.out.split()
    )


def test_a_model_compiled_inside_the_block_is_refused_and_the_timeline_says_nothing_was_watched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "compiled.jsonl"
    model = new_net()
    with pytest.raises(WatchError, match="compiled"), bn_inspect.watch(model, path):
        torch.compile(model)(torch.randn(4, 1, 8, 8))
    end = records(path)[-1]
    assert end["steps"] == 0 and end["exception"]["type"] == "WatchError"
    document = json.loads(invoke(capsys, ["timeline", path, "--format", "json"]).out)
    [note] = document["notes"]
    assert note.startswith("nothing was watched (0 steps); the watch ended with WatchError: the watched model is")


def test_a_long_or_multiline_message_is_its_first_line_cut_short(tmp_path: Path) -> None:
    record = end_record(3, 0, steps=4, samples=1, events=0, raised=ValueError("x" * 500 + "\nsecond line"))
    assert record["exception"] == {"type": "ValueError", "message": "x" * 199 + "…"}
    assert end_record(0, 0, steps=1, samples=0, events=0, raised=KeyboardInterrupt())["exception"] == {
        "type": "KeyboardInterrupt",
        "message": "",
    }


@pytest.mark.surface("read:timeline", "traceback")
@pytest.mark.surface("render:table", "inert")
def test_a_hostile_exception_in_an_end_record_is_shown_inert_and_a_malformed_one_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "raised.jsonl"
    _raising_run(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    end = json.loads(lines[-1])
    end["exception"] = {"type": "Evil\x1b[31mError", "message": "\x1b]8;;http://x\x07click\nme"}
    path.write_text("\n".join([*lines[:-1], json.dumps(end)]) + "\n", encoding="utf-8")
    result = invoke(capsys, ["timeline", path])
    assert "\x1b" not in result.out and "\x07" not in result.out
    assert "ended with Evil" in result.out
    end["exception"] = {"type": 3, "message": "m"}
    path.write_text("\n".join([*lines[:-1], json.dumps(end)]) + "\n", encoding="utf-8")
    result = invoke(capsys, ["timeline", path])
    assert result.code == 2
    assert 'the end record\'s exception has a "type" that is not a string' in result.err
