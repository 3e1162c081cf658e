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


def _section(title: str) -> str:
    """The README's text from the heading ``title`` to the next heading of any level."""
    return re.split(r"\n#+ ", README.split(f"\n{title}\n", 1)[1], maxsplit=1)[0]


def test_each_quick_start_command_creates_and_activates_a_virtual_environment() -> None:
    # Debian's system Python is externally managed and has no `python` outside a venv (#29).
    quick_start = README.split("## Quick start", 1)[1].split("```", 2)[1]
    for command in (line for line in quick_start.splitlines() if line.strip()):
        assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && python -m pip install "), command


def test_the_quick_start_says_what_the_tests_cost_and_offers_the_subsets() -> None:
    section = _section("## Quick start")
    assert re.search(r"about [\d,]+ tests, took about \d+ minutes on a 2-core machine", " ".join(section.split()))
    assert "550 MB of downloads" in section
    assert 'python -m pytest -m "not slow"' in section and "python -m pytest tests/" in section
    # What leaving out `slow` leaves out is named: every test file that marks a test slow.
    marks_slow = re.compile(r"^(@pytest\.mark\.slow$|pytestmark = .*pytest\.mark\.slow\b)", re.MULTILINE)
    slow = sorted(
        p.name for p in (REPO / "tests").glob("test_*.py") if marks_slow.search(p.read_text(encoding="utf-8"))
    )
    assert slow and all(f"tests/{name}" in section for name in slow), slow


def test_the_torchvision_examples_have_the_install_path_that_ci_tests() -> None:
    section = _section("### `--arch torchvision.models:...`: torchvision in a second environment")
    install, example = section.split("```", 2)[1].strip().splitlines()
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert install in ci and install.startswith("python3 -m venv .zoo-venv && . .zoo-venv/bin/activate && ")
    assert example.startswith("bn-inspect inspect --arch torchvision.models:")
    torch_pin = re.search(r"torch==2\.(\d+)\.\d+", install)
    vision_pin = re.search(r"torchvision==0\.(\d+)\.\d+", install)
    assert torch_pin is not None and vision_pin is not None
    assert int(vision_pin.group(1)) - 15 == int(torch_pin.group(1))
    # CI runs the README's torchvision examples in that environment, after that install.
    assert ci.index(install) < ci.index("tests/test_readme_torchvision.py")
    assert re.search(r"about [\d.]+ GB installed", section) and re.search(r"about \d+ minutes", section)


def test_api_report_converts_to_dataframe() -> None:
    import torch

    from bn_inspect import check_model, inspect_model
    from tests import models

    model = models.randomize_norm_state(models.BN1dFeatures()).eval()
    frame = inspect_model(model, [torch.randn(16, 5)]).to_dataframe()
    assert list(frame["channel"]) == [0, 1, 2, 3, 4]
    findings = check_model(model, [torch.randn(4, 5)], mode="train").to_dataframe()
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
