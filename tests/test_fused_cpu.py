"""The compiled CPU kernel (bn_inspect/engine/fused/cpu.py): exact where it runs, the portable path where it cannot.

The kernel is compiled by torch.compile's C++ backend, so the tests that run it need a C++
compiler and skip without one; they run in a child process, so that the compile, dynamo's state
and inductor's cache folder stay out of the test process. The fallbacks (no compiler, a cache
folder others could write to) need no compiler and run here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from bn_inspect.analyses.inspection import inspect_model
from bn_inspect.engine.fused import cpu
from tests.helpers import REPO, invoke

HAS_COMPILER = shutil.which("g++") is not None or shutil.which("c++") is not None
needs_compiler = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler for torch.compile")

CHECK = r"""
import copy, hashlib, torch
from torch import nn
from torch.overrides import TorchFunctionMode
from bn_inspect.engine.fused import cpu
from bn_inspect.analyses.inspection import inspect_model

calls = []
original = cpu.batch_norm_eval_with_moments
cpu.batch_norm_eval_with_moments = lambda *a: (calls.append(1), original(*a))[1]
import bn_inspect.engine.fused.dispatch as dispatch
dispatch.cpu = cpu

def state_hash(model):
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode()); digest.update(tensor.detach().double().numpy().tobytes())
    return digest.hexdigest(), [m.training for m in model.modules()], [sorted(vars(m)) for m in model.modules()]

def build(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 130, 3), nn.BatchNorm2d(130), nn.ReLU(),
        nn.Conv2d(130, 8, 3), nn.BatchNorm2d(8, affine=False),
        nn.Flatten(2), nn.BatchNorm1d(8),
        nn.Flatten(1), nn.Linear(8 * 6 * 6, 10), nn.BatchNorm1d(10),
    ).to(dtype)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 10, 10, dtype=dtype) * 3 + 5)
    return model.eval()

def check(dtype, tolerance):
    model = build(dtype)
    # Large means and a tiny spread, ragged batches (one of a single sample), one channels-last batch.
    batches = [torch.randn(n, 3, 10, 10, dtype=dtype) * 1e-3 + 1e3 for n in (5, 1, 7)]
    batches.append(batches[2].to(memory_format=torch.channels_last))
    before = state_hash(model)
    with torch.no_grad():
        plain = [model(b) for b in batches]
    seen, outputs = {}, []
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, []).append(a[0].double()))
             for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    hooks.append(model.register_forward_hook(lambda m, a, out: outputs.append(out)))
    calls.clear()
    report = inspect_model(model, batches)
    for h in hooks:
        h.remove()
    assert state_hash(model) == before, "model changed"
    # The three layers with spatial dims, on the two contiguous batches of more than one sample:
    # the batch of one, the channels-last batch (still channels-last after Flatten(2)) and
    # BatchNorm1d over (N, C) take the portable path.
    assert len(calls) == 6, calls
    for out, expected in zip(outputs, plain, strict=True):
        assert torch.equal(out, expected), "the model's output changed under the kernel"
    for layer in report.layers:
        values = torch.cat([t.transpose(0, 1).reshape(t.shape[1], -1) for t in seen[layer.name.raw]], 1)
        mean, var = values.mean(1), values.var(1, unbiased=False)
        assert layer.values_per_channel == values.shape[1]
        mean_err = ((torch.tensor(layer.batch_mean, dtype=torch.float64) - mean).abs() / var.sqrt()).max().item()
        var_err = ((torch.tensor(layer.batch_var, dtype=torch.float64) - var).abs() / var).max().item()
        assert mean_err < tolerance and var_err < tolerance, (dtype, layer.name, mean_err, var_err)
    return model

model = check(torch.float32, 1e-5)
# Relative to the spread, with means about 1e6 spreads: float64's own rounding of the reference sum.
check(torch.float64, 1e-8)

bn = model[1]
with torch.no_grad():
    # A constant channel has variance exactly 0; an infinite value gives an infinite mean and NaN
    # var; finite values whose float32 squares overflow fall back to the exact two passes.
    x = torch.randn(4, 130, 3, 3)
    x[:, 5] = 7.0
    x[1, 9, 0, 0] = float("inf")
    x[:, 11] = torch.randn(4, 3, 3) * 1e20
    _, moments = cpu.batch_norm_eval_with_moments(bn, x, None)
    assert moments.biased_var()[5] == 0 and moments.mean[5] == 7.0
    assert moments.mean[9] == float("inf") and moments.biased_var()[9].isnan()
    # A NaN input is NaN in torch's output as in the kernel's: no mismatch, the layer keeps the kernel.
    x[2, 13, 1, 1] = float("nan")
    fresh_shape = x[:3]
    out, _ = cpu.batch_norm_eval_with_moments(bn, fresh_shape, None)
    assert out.isnan().any() and cpu._verified[bn][(fresh_shape.shape, fresh_shape.dtype)]
    exact = x[:, 11].double()
    assert abs(moments.biased_var()[11] - exact.var(unbiased=False)) <= 1e-9 * exact.var(unbiased=False)

    # A layer whose first call disagrees with torch gets torch's output, and the portable path after.
    fresh = copy.deepcopy(bn)
    right = cpu._coefficients
    cpu._coefficients = lambda module, c, dtype: tuple(t * (1 + 2**-20) for t in right(module, c, dtype))
    y = torch.randn(3, 130, 4, 4)
    expected = nn.functional.batch_norm(y, fresh.running_mean, fresh.running_var, fresh.weight, fresh.bias, False, 0.0, fresh.eps)
    out, _ = cpu.batch_norm_eval_with_moments(fresh, y, None)
    assert torch.equal(out, expected)
    assert not cpu.applies(fresh, y) and cpu.applies(fresh, y[:2])
    cpu._coefficients = right

    # Under a function mode the compiled call would be traced by it: the portable path runs.
    class Passing(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passing():
        assert not cpu.applies(bn, x)

# Every rank, size and dtype: one compile per dtype, so dynamo never reaches its recompile limit
# (whose warning would reach stderr), and every layer's output matched torch's.
from torch._dynamo.utils import counters
import itertools
for dtype, n, c, spatial in itertools.product((torch.float32, torch.float64), (2, 3), (2, 5), ((7,), (4, 6), (2, 3, 5))):
    layer = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[len(spatial)](c).to(dtype).eval()
    x = torch.randn(n, c, *spatial, dtype=dtype)
    with torch.no_grad():
        assert cpu.applies(layer, x)
        cpu.batch_norm_eval_with_moments(layer, x, None)
        assert cpu._verified[layer][(x.shape, x.dtype)]
assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])

# Sequential recalibration traces torch ops: it must give what the portable path gives.
from bn_inspect.analyses.recalibration import recalibrate
import os
batches = [torch.randn(6, 3, 10, 10) * 3 + 5 for _ in range(3)]
results = {}
for kernel in ("compiled", ""):
    os.environ["BN_INSPECT_CPU_KERNEL"] = kernel
    copied = copy.deepcopy(model)
    result = recalibrate(copied, batches, method="sequential")
    results[kernel] = ([layer.wave for layer in result.layers], copied.state_dict())
for key, value in results[""][1].items():
    assert torch.allclose(results["compiled"][1][key].double(), value.double(), rtol=1e-5, atol=1e-6), key
assert results["compiled"][0] == results[""][0]
assert cpu.unavailable_reason() is None, cpu.unavailable_reason()
# The private folder was set for inductor around the kernel's calls only: the process keeps its own.
assert "bn-inspect" not in os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")
print("ok")
"""


# The digits sample as an eager model (state_dict and --arch), inspected in a child process.
INSPECT_DIGITS_JSON = [
    sys.executable,
    "-m",
    "bn_inspect",
    "inspect",
    "sample_models/digits_cnn/state_dict.pt",
    "--arch",
    "sample_models.architectures:DigitsCNN",
    "--input",
    "sample_models/digits_cnn/test_images.npy",
    "--format",
    "json",
]


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache home for every child of this module: the first compiles, the others reuse it."""
    return tmp_path_factory.mktemp("xdg-cache")


def _child_env(cache_home: Path) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))
    env = {**os.environ, "BN_INSPECT_CPU_KERNEL": "compiled", "PYTHONPATH": path, "XDG_CACHE_HOME": str(cache_home)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    return env


@needs_compiler
def test_compiled_kernel_is_exact_bit_for_bit_and_leaves_the_model_unchanged(kernel_cache: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", CHECK],
        env=_child_env(kernel_cache),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
    assert result.stderr == ""
    # Inductor built into the private folder, which only this user may write to.
    folder = kernel_cache / "bn-inspect" / "inductor"
    assert any(folder.iterdir())
    assert folder.stat().st_mode & 0o077 == 0


@needs_compiler
def test_the_command_line_prints_the_same_report_with_the_kernel(kernel_cache: Path) -> None:
    argv = INSPECT_DIGITS_JSON
    env = _child_env(kernel_cache)
    compiled = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    portable = subprocess.run(
        argv, cwd=REPO, env={**env, "BN_INSPECT_CPU_KERNEL": ""}, capture_output=True, text=True, timeout=900
    )
    assert compiled.returncode == portable.returncode == 0, compiled.stderr[-2000:]
    assert compiled.stderr.splitlines() == [cpu.FIRST_USE_NOTE]
    assert portable.stderr == ""
    # The statistics agree to float32 rounding; the rest of the report is the same.
    with_kernel, without = json.loads(compiled.stdout), json.loads(portable.stdout)
    for new, old in zip(with_kernel["layers"], without["layers"], strict=True):
        assert (new["name"], new["flags"], new["explanation"]) == (old["name"], old["flags"], old["explanation"])
        for key in ("batch_mean", "batch_var"):
            assert torch.allclose(torch.tensor(new[key]), torch.tensor(old[key]), rtol=1e-5, atol=1e-7), key


@needs_compiler
def test_two_models_in_one_run_hear_of_the_kernel_once(kernel_cache: Path) -> None:
    model = ["sample_models/digits_cnn/state_dict.pt", "--arch", "sample_models.architectures:DigitsCNN"]
    argv = [
        sys.executable,
        "-m",
        "bn_inspect",
        "diff",
        model[0],
        *model,
        "--input",
        "sample_models/digits_cnn/test_images.npy",
    ]
    done = subprocess.run(argv, cwd=REPO, env=_child_env(kernel_cache), capture_output=True, text=True, timeout=900)
    assert done.stderr.splitlines() == [cpu.FIRST_USE_NOTE], done.stderr[-2000:]


@pytest.mark.surface("cache:cpu-kernel", "traceback")
def test_a_compiler_that_fails_is_one_note_and_none_of_its_output(tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    for name in ("g++", "c++", "gcc", "cc"):
        (fake / name).write_text("#!/bin/sh\necho 'fake compiler: error: broken' >&2\nexit 1\n")
        (fake / name).chmod(0o755)
    env = {
        **_child_env(tmp_path / "cache"),
        "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}",
        "CXX": str(fake / "g++"),
        "CC": str(fake / "gcc"),
    }
    argv = INSPECT_DIGITS_JSON
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and json.loads(done.stdout)["layers"]
    assert done.stderr.splitlines() == [cpu.FIRST_USE_NOTE, cpu.FAILED_NOTE], done.stderr[-2000:]


@pytest.mark.parametrize("value", ["1", "Compiled", "compiled "])
def test_a_value_the_variable_does_not_know_is_said_and_ignored(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("BN_INSPECT_CPU_KERNEL", value)
    note = cpu.prepare_note(True, print)
    assert note is not None and note.startswith(
        f"note: BN_INSPECT_CPU_KERNEL={value!r} is not a value bn-inspect knows"
    )
    assert not cpu.requested()


@pytest.fixture
def fresh_kernel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """The kernel asked for and not yet prepared, with a cache home of the test's own; reset after."""
    monkeypatch.setenv("BN_INSPECT_CPU_KERNEL", "compiled")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "torch-chose-this"))
    cpu._kernel.cache_clear()
    cpu._unavailable.clear()
    yield
    cpu._kernel.cache_clear()
    cpu._unavailable.clear()
    cpu._announce.clear()


def test_a_run_where_no_layer_qualifies_is_not_told_of_the_kernel(fresh_kernel: None, tmp_path: Path) -> None:
    heard: list[str] = []
    assert cpu.prepare_note(True, heard.append) is None
    torch.manual_seed(0)
    # BatchNorm1d over (N, C), and a batch of one sample for the BatchNorm2d: neither qualifies.
    table = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6)).eval()
    inspect_model(table, [torch.randn(8, 4)])
    inspect_model(_small_model(), [torch.randn(1, 3, 8, 8)])
    assert heard == []
    # The folder torch was told to use (TORCHINDUCTOR_CACHE_DIR) is used as set: bn-inspect's own is
    # neither made nor checked.
    assert not (tmp_path / "cache").exists()


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU())
    with torch.no_grad():
        model(torch.randn(8, 3, 8, 8))
    return model.eval()


def test_without_a_compiler_the_portable_path_gives_the_same_statistics(
    fresh_kernel: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, batches = _small_model(), [torch.randn(4, 3, 8, 8) + 2]
    monkeypatch.setenv("BN_INSPECT_CPU_KERNEL", "")
    expected = inspect_model(model, batches)
    monkeypatch.setenv("BN_INSPECT_CPU_KERNEL", "compiled")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    report = inspect_model(model, batches)
    assert cpu.unavailable_reason() == "there is no C++ compiler (g++ or c++) on PATH"
    assert [layer.batch_var for layer in report.layers] == [layer.batch_var for layer in expected.layers]


@pytest.mark.surface("cache:cpu-kernel", "execution")
@pytest.mark.parametrize("mode", [0o777, 0o702])
def test_a_cache_folder_others_can_write_to_is_refused(tmp_path: Path, mode: int) -> None:
    folder = tmp_path / "bn-inspect" / "inductor"
    folder.mkdir(parents=True)
    folder.chmod(mode)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path))
        with pytest.raises(OSError, match="writable by others"):
            cpu.private_cache()


@pytest.mark.surface("cache:cpu-kernel", "execution")
def test_a_folder_above_the_cache_that_others_can_write_to_is_refused_unless_sticky(tmp_path: Path) -> None:
    base = tmp_path / "shared"
    base.mkdir()
    base.chmod(0o777)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(base))
        with pytest.raises(OSError, match=f"{base} is writable by others"):
            cpu.private_cache()
        # A sticky folder (as /tmp is) lets no one rename another user's folder inside it.
        base.chmod(0o1777)
        assert cpu.private_cache() == base / "bn-inspect" / "inductor"


@pytest.mark.surface("cache:cpu-kernel", "execution")
def test_a_group_writable_cache_folder_is_refused_unless_the_group_is_the_users_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import grp
    import pwd

    folder = tmp_path / "bn-inspect" / "inductor"
    folder.mkdir(parents=True, mode=0o700)
    folder.chmod(0o770)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    me = pwd.getpwuid(os.getuid()).pw_name
    # A user private group (as umask 002 systems make): no other member, no one else's primary group.
    monkeypatch.setattr(grp, "getgrgid", lambda gid: grp.struct_group(("mine", "x", gid, [])))
    monkeypatch.setattr(pwd, "getpwall", lambda: [])
    assert cpu.private_cache() == folder
    # A group with someone else in it.
    monkeypatch.setattr(grp, "getgrgid", lambda gid: grp.struct_group(("staff", "x", gid, [me, "someone-else"])))
    with pytest.raises(OSError, match="writable by others"):
        cpu.private_cache()


@pytest.mark.surface("cache:cpu-kernel", "execution")
def test_a_cache_folder_of_another_user_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bn-inspect" / "inductor").mkdir(parents=True, mode=0o700)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(os, "getuid", lambda: os.stat(tmp_path).st_uid + 1)
    with pytest.raises(OSError, match="not a folder of this user's"):
        cpu.private_cache()


@pytest.mark.surface("cache:cpu-kernel", "clobber")
def test_a_file_or_a_link_where_the_cache_folder_goes_is_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    (tmp_path / "bn-inspect").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (tmp_path / "bn-inspect" / "inductor").symlink_to(elsewhere)
    with pytest.raises(OSError, match="not a folder of this user's"):
        cpu.private_cache()
    (tmp_path / "bn-inspect" / "inductor").unlink()
    (tmp_path / "bn-inspect" / "inductor").write_text("mine")
    with pytest.raises(OSError):
        cpu.private_cache()
    assert (tmp_path / "bn-inspect" / "inductor").read_text() == "mine"


@pytest.mark.surface("cache:cpu-kernel", "traceback")
def test_an_unusable_cache_folder_is_one_note_and_the_run_goes_on(
    fresh_kernel: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    home = tmp_path / "cache"
    (home / "bn-inspect").mkdir(parents=True)
    (home / "bn-inspect" / "inductor").write_text("not a folder")
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/g++")
    model_file = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(_small_model()), model_file)
    result = invoke(capsys, ["inspect", model_file, "--shape", "4,3,8,8", "--format", "json"])
    assert result.code == 0
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    # A scripted model never takes the kernel: the note says so, and nothing was prepared.
    assert result.err.splitlines() == [
        "note: BN_INSPECT_CPU_KERNEL=compiled is set, but the compiled kernel serves only eval-mode BatchNorm "
        "modules of an eager model: this run takes the portable path."
    ]
    torch.save(_small_model().state_dict(), tmp_path / "state.pt")
    (tmp_path / "arch.py").write_text(
        "from torch import nn\n\n"
        "class Small(nn.Sequential):\n"
        "    def __init__(self):\n"
        "        super().__init__(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU())\n"
    )
    argv = ["inspect", tmp_path / "state.pt", "--arch", f"{tmp_path / 'arch.py'}:Small", "--shape", "4,3,8,8"]
    result = invoke(capsys, argv)
    assert result.code == 0, result.err
    assert len(result.err.splitlines()) == 1
    assert result.err.startswith("note: BN_INSPECT_CPU_KERNEL=compiled is set, but its cache folder cannot be used: ")
    assert result.err.rstrip().endswith(
        "the statistics take the portable path (one more read of each batch-norm input)."
    )
    assert "Traceback" not in result.err
