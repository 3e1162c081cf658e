"""The README's promises: its Python example runs as written, and the quick start matches CI."""

from __future__ import annotations

import re

import pytest

from tests.helpers import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


def test_pytest_example_in_readme_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    block = next(b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "def test_" in b)
    namespace: dict[str, object] = {}
    monkeypatch.chdir(REPO)
    exec(compile(block, "README.md", "exec"), namespace)
    test = next(v for k, v in namespace.items() if k.startswith("test_"))
    test()  # type: ignore[operator]


def test_quick_start_is_two_commands_and_ci_runs_the_second() -> None:
    quick_start = README.split("## Quick start", 1)[1].split("```", 2)[1]
    commands = [line for line in quick_start.splitlines() if line.strip()]
    assert len(commands) == 2
    assert "bn-inspect inspect sample_models/" in commands[0]
    assert "pytest" in commands[1]
    assert commands[1] in (REPO / ".ci" / "run").read_text(encoding="utf-8")


def test_api_report_converts_to_dataframe() -> None:
    import torch

    from bn_inspect import check_model, inspect_model
    from tests import models

    model = models.randomize_norm_state(models.BN1dFeatures()).eval()
    frame = inspect_model(model, [torch.randn(16, 5)]).to_dataframe()
    assert list(frame["channel"]) == [0, 1, 2, 3, 4]
    findings = check_model(model, [torch.randn(4, 5)]).to_dataframe()
    assert "BN203" in set(findings["code"])


def test_the_cpu_install_pins_the_quick_starts_torch_with_its_torchvision() -> None:
    quick_start = README.split("## Quick start", 1)[1].split("```", 2)[1]
    pinned = re.findall(r"torch==(\d+)\.(\d+)\.\d+", quick_start)
    cpu_line = next(line for line in README.splitlines() if "download.pytorch.org/whl/cpu" in line)
    torch_pin = re.search(r"torch==(\d+)\.(\d+)\.\d+", cpu_line)
    vision_pin = re.search(r"torchvision==0\.(\d+)\.\d+", cpu_line)
    assert torch_pin is not None and vision_pin is not None
    assert set(pinned) == {torch_pin.groups()}
    # torchvision 0.N is made for torch 2.(N - 15): 0.19 for 2.4, 0.28 for 2.13.
    assert int(vision_pin.group(1)) - 15 == int(torch_pin.group(2)) and torch_pin.group(1) == "2"
    assert "the pin only keeps the install to the CPU build" not in README
