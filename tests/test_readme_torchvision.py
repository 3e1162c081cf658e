"""Every `bn-inspect ... --arch torchvision...` command of the README runs as written (#29).

The commands run as a console script would, in a folder that looks like a clone (the shipped
sample_models) and holds what each names besides: a model file is the state_dict of a freshly built
``--arch`` model, an ``--input`` folder a few ImageFolder-style JPEG images, a ``--data`` file the
README's own code block of that name. torchvision imports only beside its own torch release, so
these run in the README's second environment (CI's second stage) and skip without torchvision.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, SAMPLES

README = (REPO / "README.md").read_text(encoding="utf-8")


def code_blocks(text: str) -> list[tuple[str, str]]:
    """Each fenced block of ``text``: its info string (``python``, or empty) and its body."""
    blocks, info, body = [], None, []
    for line in text.splitlines():
        if line.startswith("```"):
            if info is None:
                info, body = line[3:].strip(), []
            else:
                blocks.append((info, "\n".join(body)))
                info = None
        elif info is not None:
            body.append(line)
    return blocks


def readme_commands() -> list[str]:
    """The README's shell commands (continuation lines joined) that build a torchvision model with --arch."""
    commands = []
    for info, body in code_blocks(README):
        if info:
            continue
        for command in re.sub(r"\\\n\s*", "", body).splitlines():
            command = command.removeprefix("$ ")
            if command.startswith("bn-inspect ") and "--arch torchvision" in command:
                commands.append(command)
    return commands


COMMANDS = readme_commands()


def _option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def _make_model_file(path: Path, argv: list[str]) -> None:
    """The state_dict of the model --arch builds, with its --arch-kwargs."""
    import importlib

    import torch

    module_name, _, attribute = str(_option(argv, "--arch")).partition(":")
    build = getattr(importlib.import_module(module_name), attribute)
    model = build(**json.loads(_option(argv, "--arch-kwargs") or "{}"))
    torch.save(model.state_dict(), path)


def _make_images(folder: Path) -> None:
    """Four JPEG photos' stand-ins in two class folders, as torchvision's ImageFolder reads them."""
    import numpy as np
    from PIL import Image

    generator = np.random.default_rng(0)
    for index in range(4):
        kind = folder / f"class_{index % 2}"
        kind.mkdir(parents=True, exist_ok=True)
        pixels = generator.integers(0, 256, size=(280, 300, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(kind / f"image_{index}.jpg", quality=90)


def _readme_code(name: str) -> str:
    """The README's Python block that starts with ``# name``."""
    return next(body for info, body in code_blocks(README) if info == "python" and body.startswith(f"# {name}\n"))


def _prepare(folder: Path, argv: list[str]) -> None:
    """Put into ``folder`` each file the command names that a clone does not ship."""
    model = argv[2] if len(argv) > 2 and not argv[2].startswith("-") else None
    if model is not None and not (folder / model).exists():
        _make_model_file(folder / model, argv)
    images = _option(argv, "--input")
    data = _option(argv, "--data")
    if data is not None:
        source = data.partition(":")[0]
        (folder / source).write_text(_readme_code(source), encoding="utf-8")
        images = re.search(r'ImageFolder\("([^"]+)"', _readme_code(source))[1]  # type: ignore[index]
    if images is not None and not (folder / images).exists():
        _make_images(folder / images)


def test_the_readme_has_torchvision_examples() -> None:
    assert len(COMMANDS) >= 3, COMMANDS


@pytest.mark.zoo
@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS, ids=[re.sub(r"[^\w.]+", "-", c[19:])[:48] for c in COMMANDS])
def test_each_readme_torchvision_example_runs_as_written(command: str, tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    (tmp_path / "sample_models").symlink_to(SAMPLES, target_is_directory=True)
    argv = shlex.split(command)
    _prepare(tmp_path, argv)
    done = subprocess.run(
        [sys.executable, "-m", "bn_inspect", *argv[1:]],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "160"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode in (0, 1), done.stderr
    assert "Traceback" not in done.stderr and "Error:" not in done.stderr, done.stderr
    assert "layer1.0.bn1" in done.stdout and "BatchNorm2d" in done.stdout, done.stdout[-2000:]
