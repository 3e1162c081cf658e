"""The watch's timeline writer (write:timeline) under hostile targets: it creates a new file or refuses in one line.

A timeline is appended to while training runs, so it cannot be staged and renamed like the other
outputs; the policy is applied when it is created: nothing that exists at the path, in any form,
is opened, followed, appended to or replaced.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

import bn_inspect
from bn_inspect.errors import BnInspectError
from tests.helpers import deadline

FIX = "Give each run a new path (a run's timeline is never appended to or replaced)"


def model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))


def refused_line(target: Path) -> str:
    with pytest.raises(BnInspectError) as caught, deadline(10):
        bn_inspect.watch(model(), target).__enter__()
    line = caught.value.line()
    assert "\n" not in line
    return line


@pytest.mark.surface("write:timeline", "clobber")
def test_a_symlink_to_a_system_file_is_refused_and_the_file_untouched(tmp_path: Path) -> None:
    victim = tmp_path / "passwd"
    victim.write_text("root:x:0:0:root:/root:/bin/bash\n")
    link = tmp_path / "bn-watch.jsonl"
    link.symlink_to(victim)
    assert refused_line(link) == f"timeline {link} already exists as a symbolic link. {FIX}"
    assert victim.read_text() == "root:x:0:0:root:/root:/bin/bash\n"


@pytest.mark.surface("write:timeline", "clobber")
def test_a_dangling_symlink_is_refused_and_not_created_through(tmp_path: Path) -> None:
    link = tmp_path / "bn-watch.jsonl"
    link.symlink_to(tmp_path / "elsewhere.txt")
    assert refused_line(link) == f"timeline {link} already exists as a symbolic link. {FIX}"
    assert not (tmp_path / "elsewhere.txt").exists()


@pytest.mark.surface("write:timeline", "clobber")
def test_an_existing_file_that_is_not_a_timeline_is_refused_and_kept(tmp_path: Path) -> None:
    target = tmp_path / "notes.jsonl"
    target.write_text("my notes\n")
    assert refused_line(target) == f"timeline {target} already exists. {FIX}"
    assert target.read_text() == "my notes\n"


@pytest.mark.surface("write:timeline", "clobber")
def test_another_runs_timeline_is_neither_appended_to_nor_replaced(tmp_path: Path) -> None:
    target = tmp_path / "bn-watch.jsonl"
    net = model()
    with bn_inspect.watch(net, target, every=1):
        net(torch.randn(4, 1, 5, 5))
    before = target.read_bytes()
    assert refused_line(target) == f"timeline {target} already exists. {FIX}"
    assert target.read_bytes() == before


@pytest.mark.surface("write:timeline", "clobber")
def test_the_source_of_an_imported_module_is_refused(tmp_path: Path) -> None:
    # Existing, so refused before the import check: either way the module's source is untouched.
    source = Path(bn_inspect.__file__)
    before = source.read_bytes()
    assert refused_line(source) == f"timeline {source} already exists. {FIX}"
    assert source.read_bytes() == before


@pytest.mark.surface("write:timeline", "hang")
def test_a_named_pipe_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "bn-watch.jsonl"
    os.mkfifo(fifo)
    assert refused_line(fifo) == f"timeline {fifo} already exists as a named pipe. {FIX}"


@pytest.mark.surface("write:timeline", "traceback")
@pytest.mark.parametrize("problem", ["directory", "missing-folder", "device"])
def test_a_target_that_cannot_be_a_timeline_is_one_line(problem: str, tmp_path: Path) -> None:
    if problem == "directory":
        target = tmp_path / "runs"
        target.mkdir()
        expected = f"timeline {target} already exists as a directory. {FIX}"
    elif problem == "missing-folder":
        target = tmp_path / "runs" / "bn-watch.jsonl"
        expected = f"timeline {target}: folder {target.parent} does not exist. Create it or choose another path"
    else:
        target = Path("/dev/null")
        expected = f"timeline {target} already exists as a character device. {FIX}"
    assert refused_line(target) == expected
