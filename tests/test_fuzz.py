"""Fuzzing: mutated sample checkpoints and input files never crash bn-inspect, never hang it.

Every mutant goes through the CLI entry point ``run(argv)``: the exit code must be 0 (the damage
missed everything that matters; stdout is then a whole JSON report) or 2 (refused with exactly one
``Error: ...`` line on stderr), never 1 or 3, never a traceback, and no case may take more than
20 s. Mutations are drawn from a seeded RNG, one per case, so any failure is reproduced by its
suite, seed and case number alone:

    BN_INSPECT_FUZZ_CASES=20000 python -m pytest tests/test_fuzz.py      # a longer run
    BN_INSPECT_FUZZ_SEED=7 python -m pytest tests/test_fuzz.py           # another draw

The cases run in-process, one after another, inside a driver process (``python -c ... drive``)
rather than inside pytest itself: a damaged file can crash the interpreter (a segfault in torch,
see test_torchscript_archive_with_an_empty_storage_record) or hang it in C code where no signal
handler runs. The driver announces each case before running it, so the test names the case that
killed or stalled it and starts a new driver after it. Stderr is captured at the file-descriptor
level too, so warnings printed by native code count as the extra lines they would be.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import DIGITS, REPO, SAMPLES, invoke

# Left out of the quick subset (`-m "not slow"`): hypothesis searches many shapes and dtypes (about 30 s).
pytestmark = pytest.mark.slow

FUZZ_CASES = int(os.environ.get("BN_INSPECT_FUZZ_CASES", "2000"))
INPUT_CASES = max(50, FUZZ_CASES // 20)  # per input format: the input side is fuzzed lightly
FUZZ_SEED = int(os.environ.get("BN_INSPECT_FUZZ_SEED", "20240601"))
CASE_TIME_LIMIT_S = 20.0  # SIGALRM inside the driver: a slower case is a hang
STALL_LIMIT_S = 60.0  # no word from the driver for this long: stuck in C code, killed
STARTUP_LIMIT_S = 120.0  # for a driver to start and say its first word
PATH = "@PATH@"  # stands for the mutant's path in a case's argv

ARCHS = {
    "digits_cnn": "sample_models.architectures:DigitsCNN",
    "cancer_mlp": "sample_models.architectures:CancerMLP",
    "signal_cnn1d": "sample_models.architectures:SignalCNN1d",
    "volume_cnn3d": "sample_models.architectures:VolumeCNN3d",
}
SHAPES = {"digits_cnn": "2,1,8,8", "cancer_mlp": "4,30", "signal_cnn1d": "2,1,64", "volume_cnn3d": "2,1,8,8,8"}


@dataclass(frozen=True)
class Source:
    """A shipped model file."""

    model: str
    kind: str  # state_dict, torchscript, pickle
    data: bytes


def _sources() -> list[Source]:
    return [
        Source(model, kind, (SAMPLES / model / f"{kind}.pt").read_bytes())
        for model in sorted(ARCHS)
        for kind in ("state_dict", "torchscript", "pickle")
    ]


# --- mutations of model files ------------------------------------------------------------------

ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07")


def _structural_offsets(data: bytes) -> list[int]:
    """Offsets of zip record headers (local, central directory, end records) and pickle starts."""
    offsets = []
    for signature in (*ZIP_SIGNATURES, b"\x80\x02", b"\x80\x04"):
        start = data.find(signature)
        while start != -1:
            offsets.append(start)
            start = data.find(signature, start + 1)
    return offsets or [0]


def _offset(rng: random.Random, data: bytes) -> int:
    """A position to damage: half uniform, half just after a structural header.

    Uniform positions mostly land in tensor payloads, which the CRC check catches; headers hold the
    sizes, offsets, names, flags and CRCs that decide how the rest is read.
    """
    if rng.random() < 0.5:
        return rng.randrange(len(data))
    return min(len(data) - 1, rng.choice(_structural_offsets(data)) + rng.randrange(64))


def truncate(rng: random.Random, data: bytes, other: bytes) -> tuple[bytes, str]:
    cut = rng.randrange(1, len(data)) if rng.random() < 0.7 else len(data) - rng.randrange(1, 200)
    return data[: max(cut, 1)], f"truncate at {cut}"


def flip(rng: random.Random, data: bytes, other: bytes) -> tuple[bytes, str]:
    damaged = bytearray(data)
    positions = sorted({_offset(rng, data) for _ in range(rng.randint(1, 8))})
    for position in positions:
        damaged[position] ^= rng.randrange(1, 256)
    return bytes(damaged), f"flip bytes {positions}"


def splice(rng: random.Random, data: bytes, other: bytes) -> tuple[bytes, str]:
    head, tail = rng.randrange(1, len(data)), rng.randrange(len(other))
    return data[:head] + other[tail:], f"splice head {head} + other tail from {tail}"


def zero(rng: random.Random, data: bytes, other: bytes) -> tuple[bytes, str]:
    start = _offset(rng, data)
    length = rng.choice([1, 2, 4, 8, 16, 64, 512, 4096])
    damaged = bytearray(data)
    damaged[start : start + length] = bytes(len(damaged[start : start + length]))
    return bytes(damaged), f"zero {length} bytes at {start}"


def duplicate(rng: random.Random, data: bytes, other: bytes) -> tuple[bytes, str]:
    start = _offset(rng, data)
    chunk = data[start : start + rng.choice([1, 4, 30, 64, 256, 2048])]
    at = rng.choice([start, rng.randrange(len(data) + 1)])
    return data[:at] + chunk + data[at:], f"duplicate {len(chunk)} bytes from {start} at {at}"


MUTATIONS: dict[str, Callable[[random.Random, bytes, bytes], tuple[bytes, str]]] = {
    "truncate": truncate,
    "flip": flip,
    "splice": splice,
    "zero": zero,
    "duplicate": duplicate,
}


# --- mutations of input files ------------------------------------------------------------------


def _npy_seed() -> bytes:
    stream = io.BytesIO()
    np.save(stream, np.ascontiguousarray(np.load(DIGITS / "test_images.npy")[:24]))
    return stream.getvalue()


def _csv_bytes() -> bytes:
    lines = (SAMPLES / "cancer_mlp" / "test.csv").read_bytes().splitlines(keepends=True)
    return b"".join(lines[:25])


def mutate_input(rng: random.Random, data: bytes, kind: str) -> tuple[bytes, str]:
    # In a .npy most of the interest is in the header (magic, version, header length, the dict's
    # dtype, fortran_order and shape): the first 128 bytes.
    def pick() -> int:
        if kind == "npy" and rng.random() < 0.7:
            return rng.randrange(min(128, len(data)))
        return rng.randrange(len(data))

    mutation = rng.choice(["truncate", "flip", "zero", "duplicate", "replace"])
    damaged = bytearray(data)
    if mutation == "truncate":
        cut = rng.randrange(1, len(data))
        return data[:cut], f"truncate at {cut}"
    if mutation == "flip":
        positions = sorted({pick() for _ in range(rng.randint(1, 8))})
        for position in positions:
            damaged[position] ^= rng.randrange(1, 256)
        return bytes(damaged), f"flip {positions}"
    if mutation == "zero":
        start, length = pick(), rng.choice([1, 4, 16, 200])
        damaged[start : start + length] = bytes(len(damaged[start : start + length]))
        return bytes(damaged), f"zero {length} at {start}"
    if mutation == "duplicate":
        start = pick()
        chunk = data[start : start + rng.choice([1, 8, 40, 300])]
        return data[:start] + chunk + data[start:], f"duplicate {len(chunk)} at {start}"
    # Replace one byte by a character that means something to the format.
    position = pick()
    value = rng.choice(b"<>|=,()'\"0123456789.-eE\n\r\t ;:nNaiIfFuUbBc" if kind == "npy" else b',\n\r"-.eE0nNaiIf ;\t')
    damaged[position] = value
    return bytes(damaged), f"set byte {position} to {chr(value)!r}"


INPUT_MODELS = {
    "npy": ["inspect", str(DIGITS / "state_dict.pt"), "--arch", ARCHS["digits_cnn"]],
    "csv": [
        "inspect",
        str(SAMPLES / "cancer_mlp" / "state_dict.pt"),
        "--arch",
        ARCHS["cancer_mlp"],
        "--drop-column",
        "label",
    ],
}


# --- the cases ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One mutant: its bytes, the file name to write them under, the argv that runs it, and what it is."""

    data: bytes
    file_name: str
    argv: list[str]  # PATH stands for the mutant's path
    label: str


def model_case(seed: int, case: int, sources: list[Source]) -> Case:
    rng = random.Random(f"{seed}:model:{case}")
    source, other = rng.choice(sources), rng.choice(sources)
    mutation = rng.choice(sorted(MUTATIONS))
    data, how = MUTATIONS[mutation](rng, source.data, other.data)
    argv = ["inspect", PATH, "--shape", SHAPES[source.model], "--format", "json"]
    if source.kind == "state_dict":
        argv += ["--arch", ARCHS[source.model]]
    elif source.kind == "pickle" and rng.random() < 0.5:
        # Half the damaged pickles are refused by the opcode scan; half are really unpickled. The
        # file's own globals are sample_models and torch classes, which is what --trust-pickle is for.
        argv.append("--trust-pickle")
    label = f"model case {case}: {source.model}/{source.kind}.pt, {how} (other: {other.model}/{other.kind}.pt)"
    return Case(data, "model.pt", argv, label)


def input_case(seed: int, case: int, kind: str, original: bytes) -> Case:
    rng = random.Random(f"{seed}:{kind}:{case}")
    data, how = mutate_input(rng, original, kind)
    return Case(
        data, f"input.{kind}", [*INPUT_MODELS[kind], "--input", PATH, "--format", "json"], f"{kind} case {case}: {how}"
    )


def _selftest_case(seed: int, case: int) -> Case:
    # For test_fuzz_harness_reports_crashes_hangs_and_broken_contracts.
    behaviour = ["ok", "exit-2", "exit-3", "two-lines", "slow", "segfault", "ok"][case]
    return Case(b"", "unused", ["selftest", behaviour], f"selftest case {case}: {behaviour}")


def _selftest_run(argv: list[str]) -> int:
    behaviour = argv[1]
    if behaviour == "ok":
        print('{"schema_version": 1}')
        return 0
    if behaviour == "exit-2":
        print("Error: what went wrong. How to fix it.", file=sys.stderr)
        return 2
    if behaviour == "exit-3":
        print("Traceback (most recent call last):\nValueError\nError: internal", file=sys.stderr)
        return 3
    if behaviour == "two-lines":
        os.write(2, b"[W native warning]\n")  # below Python's sys.stderr, as torch's C++ warnings are
        print("Error: refused. Fix it.", file=sys.stderr)
        return 2
    if behaviour == "slow":
        time.sleep(30)
        return 0
    os.kill(os.getpid(), signal.SIGSEGV)
    return 0


def cases_of(suite: str, seed: int) -> Callable[[int], Case]:
    if suite == "model":
        sources = _sources()
        return lambda case: model_case(seed, case, sources)
    if suite in ("npy", "csv"):
        original = _npy_seed() if suite == "npy" else _csv_bytes()
        return lambda case: input_case(seed, case, suite, original)
    assert suite == "selftest"
    return lambda case: _selftest_case(seed, case)


# --- judging one outcome -----------------------------------------------------------------------


@dataclass
class Outcome:
    code: int | None  # None: timed out
    out: str
    err: str
    seconds: float


def problems_with(outcome: Outcome, *, limit: float = CASE_TIME_LIMIT_S) -> str | None:
    """Why an outcome breaks the contract, or None when it keeps it."""
    if outcome.code is None or outcome.seconds > limit:
        return f"took {outcome.seconds:.1f} s (limit {limit} s)"
    if "Traceback" in outcome.err + outcome.out:
        return f"exit {outcome.code} with a traceback: {outcome.err[-700:]}"
    if outcome.code == 2:
        lines = outcome.err.splitlines()
        if len(lines) != 1 or not lines[0].startswith("Error: "):
            return f"exit 2 but stderr is not one 'Error: ' line: {outcome.err[-700:]!r}"
        return None
    if outcome.code != 0:
        return f"exit {outcome.code}: {outcome.err[-700:]!r}"
    try:
        document = json.loads(outcome.out)
    except json.JSONDecodeError as error:
        return f"exit 0 but stdout is not JSON ({error}): {outcome.out[:200]!r}"
    if document.get("schema_version") != 1:
        return f"exit 0 but the report has schema_version {document.get('schema_version')!r}"
    return None


@dataclass(frozen=True)
class KnownBug:
    """A bug the fuzzer reaches that a strict xfail test below pins: recognised by exit code and stderr."""

    code: int
    text: str
    test: str


ZIP_TEST = "test_damaged_zip_is_refused"
# Each entry is reproduced deterministically by the test it names, marked xfail(strict=True) with
# the bug and its fix. The fuzzer counts these outcomes apart (and warns) so that it keeps testing
# everything else; when a bug is fixed its test XPASSes, which fails the suite: then delete the
# marker and the entry here.
KNOWN_BUGS: tuple[KnownBug, ...] = ()


def known_bug(outcome: Outcome) -> str | None:
    for bug in KNOWN_BUGS:
        if outcome.code == bug.code and bug.text in outcome.err:
            return bug.test
    return None


# --- the driver: runs cases in-process, in a process of its own ------------------------------


class CaseTimeout(BaseException):
    """Raised by SIGALRM inside a case; a BaseException so that run()'s `except Exception` lets it through."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: object) -> None:
        raise CaseTimeout(f"case took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def captured_output() -> Iterator[dict[str, str]]:
    """stdout and stderr of the block ("out", "err" once it ends); stderr also at file-descriptor
    level, where native code (torch's C++ warnings) writes."""
    captured: dict[str, str] = {}
    out, err = io.StringIO(), io.StringIO()
    with tempfile.TemporaryFile() as native:
        saved = os.dup(2)
        os.dup2(native.fileno(), 2)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            native.seek(0)
            captured["out"] = out.getvalue()
            captured["err"] = native.read().decode(errors="replace") + err.getvalue()


def _cached_cli() -> None:
    """Build the Typer app's click command once instead of on every run() (~20 ms each).

    run() still parses every argv and invokes the real command; only the deterministic translation
    of the command signatures into click parameters is reused, which keeps thousands of cases
    inside the time budget.
    """
    import typer.main

    built: dict[int, Any] = {}
    original = typer.main.get_command

    def cached(app: Any) -> Any:
        if id(app) not in built:
            built[id(app)] = original(app)
        return built[id(app)]

    typer.main.get_command = cached  # type: ignore[assignment]


def drive(suite: str, seed: int, start: int, stop: int, folder: str, report_fd: int, limit: float) -> None:
    """Entry point of the driver process: run cases start..stop-1, one JSON line per event on report_fd."""
    from bn_inspect.cli.main import run

    runner = _selftest_run if suite == "selftest" else run
    _cached_cli()
    make = cases_of(suite, seed)
    with os.fdopen(report_fd, "w") as report:

        def tell(message: dict[str, Any]) -> None:
            report.write(json.dumps(message) + "\n")
            report.flush()

        for case in range(start, stop):
            mutant = make(case)
            path = Path(folder) / mutant.file_name
            path.write_bytes(mutant.data)
            argv = [str(path) if arg == PATH else arg for arg in mutant.argv]
            tell({"event": "start", "case": case, "label": mutant.label})
            begin = time.perf_counter()
            code: int | None
            with captured_output() as output:
                try:
                    with time_limit(limit):
                        code = runner(argv)
                except CaseTimeout:
                    code = None
            outcome = Outcome(code, output["out"], output["err"], time.perf_counter() - begin)
            problem = problems_with(outcome, limit=limit)
            known = known_bug(outcome) if problem else None
            if problem and not known:
                path.rename(Path(folder) / f"failing-{suite}-case-{case}-{mutant.file_name}")
            tell(
                {
                    "event": "done",
                    "case": case,
                    "code": code,
                    "seconds": outcome.seconds,
                    "problem": problem,
                    "known": known,
                }
            )


@dataclass
class Result:
    case: int
    label: str
    code: int | None
    seconds: float
    problem: str | None
    known: str | None


def campaign(
    suite: str, cases: int, folder: Path, *, limit: float = CASE_TIME_LIMIT_S, stall_limit: float = STALL_LIMIT_S
) -> list[Result]:
    """Run ``cases`` cases of ``suite`` in driver processes; a crash or stall becomes that case's problem."""
    results: list[Result] = []
    start = 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    while start < cases:
        read_end, write_end = os.pipe()
        arguments = f"{suite!r}, {FUZZ_SEED}, {start}, {cases}, {str(folder)!r}, {write_end}, {limit}"
        with (folder / "driver.log").open("a") as log:
            driver = subprocess.Popen(
                [sys.executable, "-c", f"from tests.test_fuzz import drive; drive({arguments})"],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=(write_end,),
            )
        os.close(write_end)
        current: dict[str, Any] | None = None
        stalled = False
        buffer = b""
        heard = False  # a driver gets STARTUP_LIMIT_S to import everything before its first word
        try:
            while True:
                ready, _, _ = select.select(
                    [read_end], [], [], stall_limit if heard else max(stall_limit, STARTUP_LIMIT_S)
                )
                if not ready:
                    stalled = True
                    driver.kill()
                    break
                chunk = os.read(read_end, 1 << 16)
                if not chunk:
                    break
                heard = True
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    message = json.loads(line)
                    if message["event"] == "start":
                        current = message
                        continue
                    assert current is not None and current["case"] == message["case"]
                    results.append(
                        Result(
                            message["case"],
                            current["label"],
                            message["code"],
                            message["seconds"],
                            message["problem"],
                            message["known"],
                        )
                    )
                    current = None
        finally:
            os.close(read_end)
            driver.wait()
        if current is None:
            assert driver.returncode == 0, f"driver failed: {(folder / 'driver.log').read_text()[-3000:]}"
            break
        # The driver died or stalled inside a case: that case fails, and the campaign goes on after it.
        why = (
            f"no progress for {stall_limit:.0f} s (stuck outside Python), killed"
            if stalled
            else f"the process died with exit status {driver.returncode} (a negative status is a signal)"
        )
        results.append(Result(current["case"], current["label"], None, stall_limit, why, None))
        start = current["case"] + 1
    return results


def assert_contract_kept(results: list[Result], expected: int) -> Counter[str]:
    assert [r.case for r in results] == list(range(expected)), "the campaign lost cases"
    failures = [f"{r.label}: {r.problem}" for r in results if r.problem and not r.known]
    counts = Counter(f"exit {r.code}" for r in results)
    known = Counter(r.known for r in results if r.known)
    slowest = max(results, key=lambda r: r.seconds)
    assert not failures, (
        f"{len(failures)} of {len(results)} cases broke the contract (seed {FUZZ_SEED}; {dict(counts)}; known "
        f"bugs {dict(known)}); failing mutants are kept in the test's tmp_path:\n" + "\n".join(failures[:15])
    )
    assert slowest.seconds <= CASE_TIME_LIMIT_S, f"slowest: {slowest}"
    if known:
        warnings.warn(f"the fuzzer hit known bugs (pinned by strict xfail tests): {dict(known)}", stacklevel=2)
    return counts


# --- the tests ---------------------------------------------------------------------------------


def test_mutated_model_files_exit_0_or_2_with_one_error_line(tmp_path: Path) -> None:
    counts = assert_contract_kept(campaign("model", FUZZ_CASES, tmp_path), FUZZ_CASES)
    # The fuzzer must reach both sides of the contract, or it tests nothing.
    assert counts["exit 2"] > 0 and counts["exit 0"] > 0, dict(counts)


@pytest.mark.parametrize("kind", sorted(INPUT_MODELS))
def test_mutated_input_files_exit_0_or_2_with_one_error_line(tmp_path: Path, kind: str) -> None:
    counts = assert_contract_kept(campaign(kind, INPUT_CASES, tmp_path), INPUT_CASES)
    assert counts["exit 2"] > 0 and counts["exit 0"] > 0, dict(counts)


def test_fuzz_harness_reports_crashes_hangs_and_broken_contracts(tmp_path: Path) -> None:
    # Pins the harness: selftest cases that pass, break the contract (a native stderr line
    # included), sleep past the per-case limit, and segfault the driver, after which the campaign
    # goes on in a new driver.
    results = campaign("selftest", 7, tmp_path, limit=2.0)
    assert [r.case for r in results] == list(range(7))
    verdicts = {r.label.split(": ")[1]: (r.code, r.problem) for r in results}
    assert verdicts["ok"] == (0, None)
    assert verdicts["exit-2"] == (2, None)
    assert "exit 3 with a traceback" in (verdicts["exit-3"][1] or "")
    assert "not one 'Error: ' line" in (verdicts["two-lines"][1] or "")
    assert verdicts["slow"][0] is None and "took" in (verdicts["slow"][1] or "")
    assert "died with exit status -11" in (verdicts["segfault"][1] or "")


def test_stalled_driver_is_killed_and_named(tmp_path: Path) -> None:
    results = campaign("selftest", 5, tmp_path, stall_limit=1.0)  # case 4 sleeps, silent for 20 s and more
    assert [r.case for r in results] == list(range(5))
    assert "no progress for 1 s" in (results[4].problem or "")


def test_mutations_are_reproducible() -> None:
    first = [model_case(FUZZ_SEED, case, _sources()) for case in range(20)]
    again = [model_case(FUZZ_SEED, case, _sources()) for case in range(20)]
    assert first == again
    original = _csv_bytes()
    assert input_case(FUZZ_SEED, 3, "csv", original) == input_case(FUZZ_SEED, 3, "csv", original)


def run_case(capsys: pytest.CaptureFixture[str], argv: list[str]) -> Outcome:
    """One run in this process (for the pinned reproductions below, which are known not to crash it)."""
    start = time.perf_counter()
    result = invoke(capsys, argv)
    return Outcome(result.code, result.out, result.err, time.perf_counter() - start)


# --- the bugs the fuzzer found, reproduced deterministically ---------------------------------


def _central_directory(data: bytes) -> int:
    """Offset of the first central-directory record of a zip archive."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        offset: int = archive.start_dir
    assert data[offset : offset + 4] == b"PK\x01\x02"
    return offset


def _set_byte(data: bytes, offset: int, value: int) -> bytes:
    damaged = bytearray(data)
    damaged[offset] = value
    return bytes(damaged)


def _zip64_multi_disk(data: bytes) -> bytes:
    # torch writes a zip64 end-of-central-directory locator (20 bytes) before the end record (22 bytes).
    locator = len(data) - 22 - 20
    assert data[locator : locator + 4] == b"PK\x06\x07"
    return _set_byte(data, locator + 16, 2)  # "total number of disks": 2


def _flags(value: int) -> Callable[[bytes], bytes]:
    return lambda data: _set_byte(data, _central_directory(data) + 8, value)


# Each damages one field of the first central-directory record (data.pkl) or of the zip64 locator,
# as single flipped or zeroed bytes did in the fuzzer.
ZIP_DAMAGE: dict[str, tuple[Callable[[bytes], bytes], type[BaseException]]] = {
    "zip64-multi-disk": (_zip64_multi_disk, zipfile.BadZipFile),
    "needs-newer-zip-version": (lambda d: _set_byte(d, _central_directory(d) + 6, 200), NotImplementedError),
    "encrypted-flag": (_flags(0x01), RuntimeError),
    "patched-data-flag": (_flags(0x20), NotImplementedError),
    "strong-encryption-flag": (_flags(0x40), NotImplementedError),
    "unknown-compression": (lambda d: _set_byte(d, _central_directory(d) + 10, 77), NotImplementedError),
    "stored-entry-marked-deflated": (lambda d: _set_byte(d, _central_directory(d) + 10, 8), zlib.error),
}


def _read_whole_zip(data: bytes) -> None:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        archive.testzip()


@pytest.mark.parametrize("damage", sorted(ZIP_DAMAGE))
def test_zip_damage_recipes_break_zipfile_as_the_fuzzer_found(damage: str) -> None:
    # Pins the recipes of the test below: each makes zipfile raise something other than
    # a plain BadZipFile from ZipFile (BadZipFile from is_zipfile; NotImplementedError, zlib.error).
    data = (DIGITS / "state_dict.pt").read_bytes()
    _read_whole_zip(data)
    damaged, raised = ZIP_DAMAGE[damage][0](data), ZIP_DAMAGE[damage][1]
    with pytest.raises(raised):
        if damage == "zip64-multi-disk":
            zipfile.is_zipfile(io.BytesIO(damaged))
        else:
            _read_whole_zip(damaged)


@pytest.mark.parametrize("kind", ["state_dict", "torchscript"])
@pytest.mark.parametrize("damage", sorted(ZIP_DAMAGE))
def test_damaged_zip_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str, kind: str) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(ZIP_DAMAGE[damage][0]((DIGITS / f"{kind}.pt").read_bytes()))
    argv = ["inspect", str(path), "--shape", "2,1,8,8", "--format", "json"]
    outcome = run_case(capsys, [*argv, "--arch", ARCHS["digits_cnn"]] if kind == "state_dict" else argv)
    assert problems_with(outcome) is None, outcome.err[-400:]
    assert outcome.code == 2 and str(path) in outcome.err


def _npy(header: str, payload: bytes = bytes(24 * 64 * 4)) -> bytes:
    """A version 1.0 .npy file with this header dict, padded as numpy pads it."""
    text = header.encode("latin1")
    text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + payload


def _npy_of(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.save(stream, array)
    return stream.getvalue()


def _images() -> np.ndarray:
    return np.load(DIGITS / "test_images.npy")[:24]


NPY_DAMAGE: dict[str, Callable[[], bytes]] = {
    # Valid files that numpy reads but torch.from_numpy refuses, raised while batches are drawn.
    "big-endian": lambda: _npy_of(_images().astype(">f4")),
    "long-double": lambda: _npy_of(_images().astype(np.longdouble)),
    # Damaged headers: numpy raises tokenize.TokenError and OverflowError, not ValueError/OSError.
    "unclosed-header": lambda: _npy("{'descr': '<f4', 'fortran_order': False, 'shape': (24, 1, 8, 8, }"),
    "negative-shape": lambda: _npy("{'descr': '<f4', 'fortran_order': False, 'shape': (-24, 1, 8, 8), }"),
}


def test_npy_recipes_are_what_they_claim() -> None:
    assert np.load(io.BytesIO(NPY_DAMAGE["big-endian"]())).dtype == np.dtype(">f4")
    assert np.load(io.BytesIO(NPY_DAMAGE["long-double"]())).dtype == np.longdouble
    intact = _npy("{'descr': '<f4', 'fortran_order': False, 'shape': (24, 1, 8, 8), }")
    assert np.load(io.BytesIO(intact)).shape == (24, 1, 8, 8)


@pytest.mark.parametrize("damage", sorted(NPY_DAMAGE))
def test_damaged_npy_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str) -> None:
    path = tmp_path / "images.npy"
    path.write_bytes(NPY_DAMAGE[damage]())
    outcome = run_case(capsys, [*INPUT_MODELS["npy"], "--input", str(path), "--format", "json"])
    assert problems_with(outcome) is None, outcome.err[-400:]


def test_csv_parser_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "table.csv"
    lines = _csv_bytes().splitlines(keepends=True)
    lines[3] = lines[3].replace(b"\n", b",1.5,2.5\n")  # a row with two fields too many
    path.write_bytes(b"".join(lines))
    outcome = run_case(capsys, [*INPUT_MODELS["csv"], "--input", str(path), "--format", "json"])
    assert outcome.code == 2
    assert "ParserError" in outcome.err
    assert problems_with(outcome) is None, repr(outcome.err)


def _central_record(data: bytes, suffix: str) -> int:
    """Offset of the central-directory record of the entry whose name ends with ``suffix``."""
    offset = _central_directory(data)
    while data[offset : offset + 4] == b"PK\x01\x02":
        name_length, extra_length, comment_length = struct.unpack("<HHH", data[offset + 28 : offset + 34])
        if data[offset + 46 : offset + 46 + name_length].decode().endswith(suffix):
            return offset
        offset += 46 + name_length + extra_length + comment_length
    raise KeyError(suffix)


def _rename_entry(data: bytes, old: str, new: str) -> bytes:
    """Rename a zip entry in place (same length) in its local header and central-directory record."""
    assert len(old) == len(new)
    assert data.count(old.encode()) == 2, "the name must appear once in each of the two headers"
    return data.replace(old.encode(), new.encode())


def test_control_characters_from_the_file_stay_out_of_the_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = (DIGITS / "state_dict.pt").read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        name = next(n for n in archive.namelist() if n.endswith("/byteorder"))
    evil = name[:-9] + "\n\x1b[2J\x1b[0m"  # 9 characters: a newline, "clear screen", "reset colours"
    damaged = bytearray(_rename_entry(data, name, evil))
    damaged[_central_record(bytes(damaged), "[0m") + 16] ^= 0xFF  # its CRC: the error names the entry
    path = tmp_path / "model.pt"
    path.write_bytes(bytes(damaged))
    outcome = run_case(capsys, ["inspect", str(path), "--arch", ARCHS["digits_cnn"], "--shape", "2,1,8,8"])
    assert outcome.code == 2
    assert "\x1b" not in outcome.err
    assert problems_with(outcome) is None, repr(outcome.err)


def _empty_record(data: bytes, suffix: str) -> bytes:
    """The archive with entry ``...{suffix}`` declared empty (CRC, sizes 0) in the central directory."""
    damaged = bytearray(data)
    offset = _central_record(data, suffix)
    damaged[offset + 16 : offset + 28] = bytes(12)  # the CRC of no bytes is 0: testzip() passes
    return bytes(damaged)


# Run in a child process: this file crashes the interpreter (SIGSEGV) while bn-inspect reads a buffer.
EMPTY_RECORD_DRIVER = """
import json, os, sys
from bn_inspect.cli.main import run
results = {}
for path in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        err = os.open(path + ".err", os.O_WRONLY | os.O_CREAT)
        os.dup2(err, 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        os._exit(run(["inspect", path, "--shape", "2,1,64", "--format", "json"]))
    _, status = os.waitpid(pid, 0)
    results[path] = [os.waitstatus_to_exitcode(status), open(path + ".err").read()]
print(json.dumps(results))
"""


def test_torchscript_archive_with_an_empty_storage_record(tmp_path: Path) -> None:
    data = (SAMPLES / "signal_cnn1d" / "torchscript.pt").read_bytes()
    paths = []
    for record in ("/data/0", "/data/4", "/data/6"):  # a conv weight, a running mean, num_batches_tracked
        path = tmp_path / f"empty-{record.rsplit('/', 1)[1]}.pt"
        path.write_bytes(_empty_record(data, record))
        paths.append(str(path))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", EMPTY_RECORD_DRIVER, *paths], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    wrong = [
        f"{Path(path).name}: exit {code}: {err[-300:]!r}"
        for path, (code, err) in json.loads(done.stdout).items()
        if code != 2 or problems_with(Outcome(code, "", err, 0.0)) is not None or "corrupt" not in err
    ]
    assert not wrong, "\n".join(wrong)
