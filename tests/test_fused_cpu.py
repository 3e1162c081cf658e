"""The CPU kernel of fused eval capture (bn_inspect/engine/fused/cpu.py, bn_eval.c), and its fallback.

The kernel tests build it with the C compiler found here and skip where there is none; the
fallback tests take the portable path by the environment or by a compiler lookup that finds none.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bn_inspect.engine.fused.dispatch as dispatch
from bn_inspect.analyses.inspection import inspect_model
from bn_inspect.engine.fused import cpu
from bn_inspect.engine.moments import ChannelMoments
from bn_inspect.errors import ForwardError
from tests.helpers import invoke

needs_compiler = pytest.mark.skipif(cpu.find_compiler() is None, reason="no C compiler")


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder for the tests that only use the kernel: it is built once for them all."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def fresh_kernel(shared_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test loads (or refuses) the kernel anew, from the shared cache, and leaves none loaded."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(shared_cache))
    monkeypatch.delenv("BN_INSPECT_FUSED", raising=False)
    built = cpu.kernel  # a test may replace it; the fixture's teardown runs before that is undone
    built.cache_clear()
    yield
    built.cache_clear()


@pytest.fixture
def private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache folder of the test's own: it builds there, or finds there what it planted."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


def loaded() -> cpu.Kernel:
    kernel = cpu.kernel()
    assert kernel is not None, cpu.fallback_reason()
    return kernel


def reference(values: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 mean and biased variance per channel over every batch."""
    flat = torch.cat([v.double().transpose(0, 1).reshape(v.shape[1], -1) for v in values], 1)
    return flat.mean(1), flat.var(1, unbiased=False)


def layer_for(x: torch.Tensor, affine: bool = True) -> nn.Module:
    kind = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[x.dim()]
    layer = kind(x.shape[1], affine=affine, dtype=x.dtype).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.running_mean.normal_(generator=generator)
        layer.running_var.uniform_(0.1, 2.0, generator=generator)
        if affine:
            layer.weight.normal_(generator=generator)
            layer.bias.normal_(generator=generator)
    return layer


SHAPES = [
    ((64, 37), None),
    ((5, 37, 7), None),
    ((3, 37, 1, 1), None),
    ((4, 19, 13, 11), None),
    ((4, 19, 13, 11), torch.channels_last),
    ((2, 5, 50, 50), None),
    ((3, 7, 4, 5, 6), None),
    ((3, 7, 4, 5, 6), torch.channels_last_3d),
]


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("shape", "memory_format"), SHAPES)
def test_output_is_bitwise_torch_and_moments_match_float64(
    shape: tuple[int, ...], memory_format: torch.memory_format | None, dtype: torch.dtype
) -> None:
    generator = torch.Generator().manual_seed(0)
    # Large means and tiny spread: float32 keeps about 3 digits of each value's deviation.
    batches = [torch.randn(shape, generator=generator, dtype=dtype) * 1e-3 + 1e3 for _ in range(3)]
    if memory_format is not None:
        batches = [b.to(memory_format=memory_format) for b in batches]
    layer = layer_for(batches[0])
    previous: ChannelMoments | None = None
    for x in batches:
        with torch.no_grad():
            assert dispatch.fused_applies(layer, x)
            y, previous = dispatch.batch_norm_eval_with_moments(layer, x, previous)
            expected = F.batch_norm(
                x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0, layer.eps
            )
        assert torch.equal(y, expected) and y.stride() == x.stride()
    assert previous is not None
    mean, var = reference(batches)
    assert previous.count == 3 * batches[0].numel() // shape[1]
    assert ((previous.mean - mean).abs() / var.sqrt()).max() < 1e-5
    assert ((previous.biased_var() - var).abs() / var).max() < 1e-5


@needs_compiler
def test_constant_infinite_nan_and_overflowing_channels() -> None:
    x = torch.randn(4, 6, 3, 3)
    x[:, 0] = 7.0
    x[1, 1, 0, 0] = float("inf")
    x[1, 2, 0, 0], x[2, 2, 1, 1] = float("inf"), float("-inf")
    x[0, 3, 2, 2] = float("nan")
    # Finite, but their squares overflow float32: the moments are recomputed exactly.
    x[:, 4] = torch.linspace(-1, 1, 36).reshape(4, 3, 3) * 1e30
    layer = layer_for(x)
    with torch.no_grad():
        y, moments = dispatch.batch_norm_eval_with_moments(layer, x, None)
        expected = F.batch_norm(
            x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0, layer.eps
        )
    assert torch.equal(y.isnan(), expected.isnan()) and torch.equal(y[~y.isnan()], expected[~expected.isnan()])
    var = moments.biased_var()
    assert moments.mean[0] == 7.0 and var[0] == 0
    assert moments.mean[1] == float("inf") and var[1].isnan()
    assert moments.mean[2].isnan() and var[2].isnan()
    assert moments.mean[3].isnan() and var[3].isnan()
    exact = x[:, 4].double()
    assert abs(var[4] / exact.var(unbiased=False) - 1) < 1e-6
    assert torch.isfinite(moments.mean[5]) and torch.isfinite(var[5])


@needs_compiler
def test_a_nan_batch_poisons_only_its_channel_after_good_batches() -> None:
    good = torch.randn(8, 3, 4, 4)
    bad = torch.randn(8, 3, 4, 4)
    bad[0, 1, 0, 0] = float("nan")
    layer = layer_for(good)
    with torch.no_grad():
        _, first = dispatch.batch_norm_eval_with_moments(layer, good, None)
        _, merged = dispatch.batch_norm_eval_with_moments(layer, bad, first)
    mean, var = reference([good, bad])
    assert merged.mean[1].isnan() and merged.m2[1].isnan()
    keep = torch.tensor([0, 2])
    assert torch.allclose(merged.mean[keep], mean[keep], rtol=0, atol=1e-6)
    assert torch.allclose(merged.biased_var()[keep], var[keep], rtol=1e-6)


def _state(model: nn.Module) -> tuple[str, list[bool], list[list[str]]]:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().double().numpy().tobytes())
    return digest.hexdigest(), [m.training for m in model.modules()], [sorted(vars(m)) for m in model.modules()]


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 40, 3),
        nn.BatchNorm2d(40),
        nn.ReLU(),
        nn.Conv2d(40, 8, 3),
        nn.BatchNorm2d(8, affine=False),
        nn.Flatten(1),
        nn.Linear(8 * 6 * 6, 10),
        nn.BatchNorm1d(10),
    )
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 10, 10) * 3 + 5)
    return model.eval()


def _batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    batches = [torch.randn(n, 3, 10, 10, generator=generator) * 1e-2 + 1e2 for n in (5, 1, 7)]
    batches[2] = batches[2].to(memory_format=torch.channels_last)
    return batches


def _inspected_against_float64(monkeypatch: pytest.MonkeyPatch) -> int:
    """Inspect ``_model`` over ``_batches``; check every layer against float64 and the model unchanged.

    Returns:
        How many layer calls the CPU kernel computed.
    """
    calls = []
    original = cpu.batch_norm_eval_with_moments
    monkeypatch.setattr(cpu, "batch_norm_eval_with_moments", lambda *a: (calls.append(1), original(*a))[1])
    model = _model()
    before = _state(model)
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, []).append(a[0].detach().clone()))
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    report = inspect_model(model, _batches())
    for hook in hooks:
        hook.remove()
    assert _state(model) == before
    for layer in report.layers:
        mean, var = reference(seen[layer.name.raw])
        assert ((torch.tensor(layer.batch_mean, dtype=torch.float64) - mean).abs() / var.sqrt()).max() < 1e-5
        assert ((torch.tensor(layer.batch_var, dtype=torch.float64) - var).abs() / var).max() < 1e-5
    return len(calls)


@needs_compiler
def test_inspection_reads_each_input_once_and_leaves_the_model_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded()  # its first use checks the output against torch's: those calls are not counted
    assert _inspected_against_float64(monkeypatch) == 9


def test_without_a_compiler_capture_takes_the_portable_path(
    monkeypatch: pytest.MonkeyPatch, private_cache: None
) -> None:
    monkeypatch.setattr(cpu, "find_compiler", lambda: None)
    assert cpu.kernel() is None
    assert "no C compiler" in (cpu.fallback_reason() or "")
    assert _inspected_against_float64(monkeypatch) == 0


def test_the_environment_turns_the_kernel_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BN_INSPECT_FUSED", "0")
    assert cpu.kernel() is None and cpu.fallback_reason() == "BN_INSPECT_FUSED=0"
    assert _inspected_against_float64(monkeypatch) == 0


@needs_compiler
def test_train_mode_autograd_and_empty_batches_take_the_portable_path() -> None:
    x = torch.randn(4, 3, 5, 5)
    layer = layer_for(x)
    # With autograd on, the layer's parameters require grad.
    assert not dispatch.fused_applies(layer, x)
    with torch.no_grad():
        assert dispatch.fused_applies(layer, x)
        assert not dispatch.fused_applies(layer, x[:0])
        assert not dispatch.fused_applies(layer.train(), x)
        # Parameters of another dtype: torch refuses the call; the kernel leaves it to torch.
        assert not dispatch.fused_applies(layer.eval(), x.double())


@needs_compiler
def test_a_forward_that_raises_leaves_no_replaced_forward() -> None:
    model = _model()
    failing = nn.Sequential(model, nn.Linear(3, 3))
    before = _state(failing)
    with pytest.raises(ForwardError, match="mat1 and mat2 shapes cannot be multiplied"):
        inspect_model(failing, _batches()[:1])
    assert _state(failing) == before
    assert all("forward" not in vars(m) for m in failing.modules())


@needs_compiler
def test_the_library_is_built_once_into_a_private_folder(private_cache: None) -> None:
    loaded()
    folder = cpu.cache_folder()
    libraries = list(folder.iterdir())
    assert len(libraries) == 1 and libraries[0].name.startswith("bn_eval-")
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    built = os.stat(libraries[0]).st_mtime_ns
    cpu.kernel.cache_clear()
    loaded()
    assert list(folder.iterdir()) == libraries and os.stat(libraries[0]).st_mtime_ns == built


def _refused(fragment: str) -> None:
    assert cpu.kernel() is None
    reason = cpu.fallback_reason() or ""
    assert fragment in reason, reason
    assert "\n" not in reason


@pytest.mark.surface("cache:cpu-kernel", "clobber", "execution", "traceback")
def test_a_cache_folder_that_is_a_symlink_is_refused(tmp_path: Path, private_cache: None) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    folder = cpu.cache_folder()
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.symlink_to(elsewhere)
    _refused("is not a folder")
    assert list(elsewhere.iterdir()) == []


@pytest.mark.surface("cache:cpu-kernel", "clobber", "traceback")
def test_a_file_where_the_cache_folder_should_be_is_refused_and_kept(private_cache: None) -> None:
    folder = cpu.cache_folder()
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.write_text("my notes\n")
    _refused("is not a folder")
    assert folder.read_text() == "my notes\n"


@pytest.mark.surface("cache:cpu-kernel", "execution")
def test_a_world_writable_cache_folder_is_refused(private_cache: None) -> None:
    folder = cpu.cache_folder()
    folder.mkdir(parents=True)
    folder.chmod(0o777)
    _refused("is writable by others")


def _planted_library() -> Path:
    """A library at the path the kernel would load, planted before the first build."""
    loaded()
    (library,) = cpu.cache_folder().iterdir()
    cpu.kernel.cache_clear()
    return library


@needs_compiler
@pytest.mark.surface("cache:cpu-kernel", "execution")
def test_a_group_writable_library_is_refused(private_cache: None) -> None:
    library = _planted_library()
    library.chmod(0o775)
    _refused("is writable by others")


@needs_compiler
@pytest.mark.surface("cache:cpu-kernel", "execution")
def test_a_library_that_is_a_symlink_is_refused(tmp_path: Path, private_cache: None) -> None:
    library = _planted_library()
    moved = tmp_path / "other.so"
    library.rename(moved)
    library.symlink_to(moved)
    _refused("is not a regular file")


@needs_compiler
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="changing a file's owner needs root")
@pytest.mark.surface("cache:cpu-kernel", "execution")
def test_a_library_owned_by_someone_else_is_refused(private_cache: None) -> None:
    library = _planted_library()
    os.chown(library, 65534, 65534)
    _refused("belongs to another user")


def test_the_fallback_is_silent_except_under_debug(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, private_cache: None
) -> None:
    monkeypatch.setattr(cpu, "find_compiler", lambda: None)
    argv = ["inspect", "--arch", "sample_models/architectures.py:SignalCNN1d", "--shape", "4,1,64", "--format", "json"]
    quiet = invoke(capsys, argv)
    assert quiet.code == 0 and "portable" not in quiet.err
    cpu.kernel.cache_clear()
    loud = invoke(capsys, [*argv, "--debug"])
    assert loud.code == 0
    assert (
        "debug: statistics took the portable path: the CPU kernel could not be built or loaded (no C compiler"
        in loud.err
    )


def test_a_failing_build_takes_the_portable_path_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, private_cache: None
) -> None:
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: fatal error: no input files' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setattr(cpu, "find_compiler", lambda: str(broken))
    assert cpu.kernel() is None
    assert "failed with exit code 1: cc: fatal error: no input files" in (cpu.fallback_reason() or "")
    assert [p.name for p in cpu.cache_folder().iterdir()] == []


@needs_compiler
def test_sequential_recalibration_is_the_same_with_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    # Its waves come from a trace of torch ops, which cannot see inside the kernel.
    import copy

    from bn_inspect.analyses.recalibration import recalibrate

    built = cpu.kernel
    assert built() is not None, cpu.fallback_reason()
    results = []
    for kernel in (built, lambda: None):
        monkeypatch.setattr(cpu, "kernel", kernel)
        model = copy.deepcopy(_model())
        result = recalibrate(model, _batches(), method="sequential")
        results.append(([layer.wave for layer in result.layers], model.state_dict()))
    (kernel_waves, kernel_state), (plain_waves, plain_state) = results
    assert kernel_waves == plain_waves == [0, 1, 2]
    for key, value in plain_state.items():
        assert torch.allclose(kernel_state[key].double(), value.double(), rtol=1e-5, atol=1e-6), key
