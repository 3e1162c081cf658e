"""The README's console examples are real runs, so they cannot drift from what the commands print.

Each fenced block that starts with ``$ bn-inspect ...`` is run in this process, at the width its
``<!-- output at N columns -->`` comment names, from a folder that holds the shipped samples where
a clone has them, and compared with what the command prints: exactly, except that a number may
differ by one unit in its last printed place (tests/helpers.golden_mismatch). A line ``...``
leaves out lines of the output: the lines before it are the output's first lines, those after it
its last, and a part between two ``...`` lines appears in between, in order. ``$ echo $?`` and a
number after the output is the exit code. ``pytest --update-readme`` rewrites the blocks from the
runs, keeping each part's number of lines and the ``...`` lines where they are.
"""

from __future__ import annotations

import difflib
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO, SAMPLES, golden_mismatch, invoke

README_PATH = REPO / "README.md"
ELLIPSIS = "..."
EXIT_CODE = "$ echo $?"

# <!-- output at 120 columns ... -->, the fence, the command and its output, the closing fence.
_BLOCK = re.compile(r"<!-- output at (\d+) columns[^\n]*-->\n```\n(\$ bn-inspect [^\n]*\n.*?)```", re.DOTALL)
_UNMARKED = re.compile(r"(?<!-->\n)```\n\$ bn-inspect ")


def _corrupted(folder: Path) -> None:
    """The README's diff example: the digits CNN's state_dict with features.4's running variance times 4."""
    import torch

    state = torch.load(SAMPLES / "digits_cnn" / "state_dict.pt", weights_only=True)
    state["features.4.running_var"] = state["features.4.running_var"] * 4
    torch.save(state, folder / "corrupted.pt")


def _watched_run(folder: Path) -> None:
    """The README's timeline example: the digits net trained 40 steps under the watch, bn2's momentum 0
    (its statistics never move) and a NaN in the input at step 23."""
    import math

    import bn_inspect
    from tests.training import new_net, train

    model = new_net()
    model.bn2.momentum = 0.0

    def plant(step: int, _model: object, x: Any) -> Any:
        if step == 23:
            x = x.clone()
            x[0, 0, 0, 0] = math.nan
        return x

    with bn_inspect.watch(model, folder / "bn-watch.jsonl", every=10):
        train(model, 40, before_step=plant)


# Files that the README's examples name beside the shipped samples, and how each is made.
MADE_FILES: dict[str, Callable[[Path], None]] = {"corrupted.pt": _corrupted, "bn-watch.jsonl": _watched_run}


@dataclass(frozen=True)
class Example:
    """One console block: where it sits in the README, its width, command, shown output and exit code."""

    width: int
    command: str
    parts: tuple[tuple[str, ...], ...]
    head_shown: bool
    tail_shown: bool
    exit_code: int | None


def _example(match: re.Match[str]) -> Example:
    lines = match[2].rstrip("\n").split("\n")
    command, output = lines[0].removeprefix("$ "), lines[1:]
    exit_code = None
    if len(output) >= 2 and output[-2] == EXIT_CODE:
        exit_code, output = int(output[-1]), output[:-2]
    parts: list[tuple[str, ...]] = [()]
    for line in output:
        if line == ELLIPSIS:
            parts.append(())
        else:
            parts[-1] += (line,)
    return Example(
        width=int(match[1]),
        command=command,
        parts=tuple(parts),
        head_shown=bool(parts[0]),
        tail_shown=bool(parts[-1]),
        exit_code=exit_code,
    )


def examples(text: str) -> list[Example]:
    """Every ``$ bn-inspect`` console block of ``text`` that has its width comment."""
    return [_example(match) for match in _BLOCK.finditer(text)]


README = README_PATH.read_text(encoding="utf-8")
EXAMPLES = examples(README)


def _run(
    example: Example, folder: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, list[str], str]:
    """The command's exit code, the lines it printed on stdout and its stderr, run in ``folder`` at the block's width."""
    argv = shlex.split(example.command)
    assert argv[0] == "bn-inspect", example.command
    for name, make in MADE_FILES.items():
        if name in argv and not (folder / name).exists():
            make(folder)
    monkeypatch.chdir(folder)
    monkeypatch.setenv("COLUMNS", str(example.width))
    result = invoke(capsys, argv[1:])
    return result.code, [line.rstrip() for line in result.out.rstrip("\n").split("\n")], result.err


def _best(part: tuple[str, ...], printed: list[str], position: int) -> int:
    """Where, from ``position`` on, the printed lines look most like ``part``."""
    starts = range(position, max(position, len(printed) - len(part)) + 1)
    return max(starts, key=lambda s: difflib.SequenceMatcher(None, part, printed[s : s + len(part)]).ratio())


def _starts(example: Example, index: int, printed: list[str], position: int) -> list[int]:
    """Where part ``index`` may start: the first part at the top, the last at the bottom, others anywhere between."""
    part = example.parts[index]
    if index == 0:
        return [0]
    if index == len(example.parts) - 1:
        return [max(position, len(printed) - len(part))]
    return list(range(position, len(printed) - len(part) + 1))


def mismatch(example: Example, printed: list[str]) -> str | None:
    """Why the block's output is not what was printed, or None when each shown part is there, in order."""
    position = 0
    for index, part in enumerate(example.parts):
        if not part:
            continue
        agrees = (
            start
            for start in _starts(example, index, printed, position)
            if golden_mismatch("\n".join(part), "\n".join(printed[start : start + len(part)])) is None
        )
        found = next(agrees, None)
        if found is None:
            near = _starts(example, index, printed, position)[0] if index in (0, len(example.parts) - 1) else None
            near = _best(part, printed, position) if near is None else near
            why = golden_mismatch("\n".join(part), "\n".join(printed[near : near + len(part)]))
            where = "the block" if len(example.parts) == 1 else f"part {index + 1} of the block (between '...' lines)"
            return f"{where} differs from what the command printed: {why}"
        position = found + len(part)
    if len(example.parts) == 1 and len(printed) != len(example.parts[0]):
        return f"the block shows {len(example.parts[0])} lines; the command printed {len(printed)}"
    return None


def rewritten(example: Example, printed: list[str], code: int) -> str:
    """The block's text from this run: each part's lines where it now sits, the ``...`` lines kept, the exit code."""
    shown: list[str] = []
    position = 0
    for index, part in enumerate(example.parts):
        if index:
            shown.append(ELLIPSIS)
        if len(example.parts) == 1:
            shown += printed
        elif part:
            start = _starts(example, index, printed, position)[0] if index in (0, len(example.parts) - 1) else None
            start = _best(part, printed, position) if start is None else start
            shown += printed[start : start + len(part)]
            position = start + len(part)
    if example.exit_code is not None:
        shown += [EXIT_CODE, str(code)]
    return "\n".join([f"$ {example.command}", *shown]) + "\n"


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder that looks like a clone to the examples: its sample_models are the shipped ones."""
    folder = tmp_path_factory.mktemp("clone")
    (folder / "sample_models").symlink_to(SAMPLES, target_is_directory=True)
    return folder


def test_every_console_example_names_its_width() -> None:
    lines = [README.count("\n", 0, m.start()) + 2 for m in _UNMARKED.finditer(README)]
    assert not lines, f"README.md lines {lines}: put <!-- output at 120 columns --> on the line before the fence"
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("index", range(len(EXAMPLES)), ids=[e.command.split()[1] for e in EXAMPLES])
def test_the_readme_output_is_what_the_command_prints(
    index: int,
    clone: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    update_readme: bool,
) -> None:
    example = EXAMPLES[index]
    code, printed, err = _run(example, clone, capsys, monkeypatch)
    assert code in (0, 1), err
    if update_readme:
        # One test per block rewrites the file, so the blocks before this one may have changed length.
        text = README_PATH.read_text(encoding="utf-8")
        block = list(_BLOCK.finditer(text))[index]
        text = text[: block.start(2)] + rewritten(example, printed, code) + text[block.end(2) :]
        README_PATH.write_text(text, encoding="utf-8")
        return
    hint = "run pytest tests/test_readme_outputs.py --update-readme to rewrite the README's blocks"
    if example.exit_code is not None:
        assert code == example.exit_code, f"the README shows exit code {example.exit_code}; it was {code} ({hint})"
    why = mismatch(example, printed)
    assert why is None, f"{example.command} at {example.width} columns: {why}\n({hint})"


def test_shown_parts_are_found_in_order_and_rewritten_in_place() -> None:
    example = examples("<!-- output at 80 columns -->\n```\n$ bn-inspect x\n...\nb 1.5\nc\n...\nz\n$ echo $?\n1\n```")[
        0
    ]
    assert example.width == 80 and example.exit_code == 1
    # A number may differ by one unit in its last printed place; anything else is a mismatch.
    assert mismatch(example, ["a", "b", "b 1.6", "c", "d", "z"]) is None
    assert "differs from what the command printed" in str(mismatch(example, ["a", "b 1.7", "c", "z"]))
    assert "differs from what the command printed" in str(mismatch(example, ["a", "b 1.5", "c", "z", "after the end"]))
    assert rewritten(example, ["new head", "b 2", "c", "new", "z 2"], 2) == (
        "$ bn-inspect x\n...\nb 2\nc\n...\nz 2\n$ echo $?\n2\n"
    )
    whole = examples("<!-- output at 80 columns -->\n```\n$ bn-inspect y\none\ntwo\n```")[0]
    assert mismatch(whole, ["one", "two", "three"]) is not None
    assert rewritten(whole, ["one", "two", "three"], 0) == "$ bn-inspect y\none\ntwo\nthree\n"
