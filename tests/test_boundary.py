"""The boundary itself: the opener judges the opened descriptor, the writer policy stages and commits together."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bn_inspect.boundary.reading import Source, current_manifest, identity_of, open_checked, run_manifest
from bn_inspect.boundary.writing import Destination, OutputSet, output_file, run_outputs, write_output
from bn_inspect.errors import InputError, OutputError
from bn_inspect.text import Untrusted
from tests.helpers import deadline


def _open(path: Path, max_bytes: int | None = None):  # type: ignore[no-untyped-def]
    return open_checked(path, Source.INPUT_FILE, noun="input file", error=InputError, max_bytes=max_bytes)


def test_a_named_pipe_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "data.npy"
    os.mkfifo(fifo)
    refused = pytest.raises(InputError, match=r"input file .*data\.npy is a named pipe, not a regular file")
    with deadline(10), refused, _open(fifo):
        pass


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: p, r"does not exist"),
        (lambda p: (p.mkdir(), p)[1], r"is a directory"),
        (lambda p: Path("/dev/zero"), r"/dev/zero is a character device, not a regular file"),
    ],
    ids=["missing", "directory", "device"],
)
def test_what_is_not_a_regular_file_is_one_clear_error(tmp_path: Path, make, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError, match=match), _open(make(tmp_path / "x")):
        pass


def test_the_size_budget_is_checked_before_any_byte_is_read(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    big.write_bytes(b"x" * 1001)
    with pytest.raises(InputError, match=r"1,001 bytes, over the 1,000-byte budget"), _open(big, max_bytes=1000):
        pass
    with _open(big, max_bytes=1001) as opened:
        assert opened.read_bytes() == b"x" * 1001


def test_the_opened_file_is_the_one_read_even_after_its_path_is_swapped(tmp_path: Path) -> None:
    good, evil = tmp_path / "good", tmp_path / "evil"
    good.write_bytes(b"checked")
    evil.write_bytes(b"swapped")
    with _open(good) as opened:
        os.replace(evil, good)
        assert Path(opened.library_path()).read_bytes() == b"checked"
        with opened.stream() as stream:
            assert stream.read() == b"checked"


def test_what_is_opened_is_recorded_by_inode_in_the_runs_manifest(tmp_path: Path) -> None:
    data = tmp_path / "data.npy"
    data.write_bytes(b"1")
    link = tmp_path / "alias"
    os.link(data, link)
    with run_manifest() as manifest:
        with _open(data):
            pass
        identity = identity_of(link)
        assert identity is not None
        entry = manifest.entry_for(identity)
        assert entry is not None and entry.source is Source.INPUT_FILE
        with run_manifest() as joined:
            assert joined is manifest
    assert current_manifest() is not manifest and not current_manifest().entries


def test_an_output_never_replaces_a_file_the_run_reads_even_with_force(tmp_path: Path) -> None:
    data = tmp_path / "data.npy"
    data.write_bytes(b"input")
    with run_manifest():
        with _open(data):
            pass
        with pytest.raises(OutputError, match=r"--output .*data\.npy is the --input file .*, which this run reads"):
            write_output(data, "report", Destination.RESULT, force=True)
    assert data.read_bytes() == b"input"


def test_without_force_an_existing_output_is_refused_and_with_force_replaced(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    write_output(target, "one", Destination.RESULT, force=False)
    with pytest.raises(OutputError, match=r"--output .* already exists. Pass --force"):
        write_output(target, "two", Destination.RESULT, force=False)
    write_output(target, "two", Destination.RESULT, force=True)
    assert target.read_text() == "two"


def test_outputs_appear_only_at_commit_and_all_or_none(tmp_path: Path) -> None:
    report, page = tmp_path / "out.md", tmp_path / "page.html"
    with run_outputs() as outputs:
        write_output(report, "md", Destination.RESULT, force=False)
        write_output(page, "html", Destination.PAGE, force=False)
        assert not report.exists() and not page.exists()
        outputs.commit()
    assert report.read_text() == "md" and page.read_text() == "html"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.md", "page.html"]


def test_a_target_created_before_the_commit_fails_the_commit_before_any_rename(tmp_path: Path) -> None:
    report, page = tmp_path / "out.md", tmp_path / "page.html"
    with run_outputs() as outputs:
        write_output(report, "md", Destination.RESULT, force=False)
        write_output(page, "html", Destination.PAGE, force=False)
        page.write_text("someone else's")
        with pytest.raises(OutputError, match=r"--report .*page\.html already exists"):
            outputs.commit()
    assert not report.exists() and page.read_text() == "someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.html"]


def test_a_failed_run_leaves_no_output_and_no_temporary(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), run_outputs():
        write_output(tmp_path / "out.md", "md", Destination.RESULT, force=False)
        raise RuntimeError("the run failed")
    assert list(tmp_path.iterdir()) == []


def test_two_outputs_of_one_run_may_not_share_a_path(tmp_path: Path) -> None:
    with run_outputs():
        write_output(tmp_path / "x.html", "a", Destination.RESULT, force=True)
        with pytest.raises(OutputError, match=r"--report .*x\.html is also --output of this run"):
            write_output(tmp_path / "x.html", "b", Destination.PAGE, force=True)


def test_an_interrupt_names_exactly_the_outputs_in_place(tmp_path: Path) -> None:
    outputs = OutputSet()
    assert outputs.interrupted_line() == "interrupted; nothing written."
    report = tmp_path / "out.md"
    with run_outputs() as outputs:
        write_output(report, "md", Destination.RESULT, force=False)
        outputs.commit()
    assert outputs.interrupted_line() == f"interrupted; written before the interrupt: {report}; nothing else."


def test_an_exception_inside_a_staged_write_removes_its_temporary(tmp_path: Path) -> None:
    staged = output_file(tmp_path / "model.pt", Destination.MODEL, force=False)
    with pytest.raises(KeyboardInterrupt), staged as stream:
        stream.write(b"partial")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_target_that_is_a_named_pipe_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "out.md"
    os.mkfifo(fifo)
    with deadline(10), pytest.raises(OutputError, match=r"--output .*out\.md is a named pipe"):
        write_output(fifo, "md", Destination.RESULT, force=True)


def test_untrusted_text_has_one_safe_form_per_format() -> None:
    name = Untrusted("a|b\x1b[31m<i>\n::error::x")
    assert name.inert() == "a|b\\x1b[31m<i>\\n::error::x"
    assert f"{name}" == name.inert() and str(name) == name.inert()
    assert name.markdown() == "a\\|b\\\\x1b\\[31m\\<i\\>\\\\n::error::x"
    assert name.html() == "a|b\\x1b[31m&lt;i&gt;\\n::error::x"
    assert name.raw == "a|b\x1b[31m<i>\n::error::x"
    assert (
        Untrusted("a") == Untrusted("a")
        and Untrusted("a") == "a"
        and {Untrusted("a"): 1}["a"] == 1
        and sorted([Untrusted("b"), Untrusted("a")])[0].raw == "a"
    )
