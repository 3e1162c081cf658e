"""The CPU counterpart of the Triton kernel: a small C kernel (bn_eval.c), built on first use.

The C source is compiled once per user and source version into ``$XDG_CACHE_HOME/bn-inspect/``
(``~/.cache/bn-inspect/`` by default), a folder created for the user alone (mode 0700): the
library is built in a private temporary folder inside it and renamed into place, so a
concurrent run sees either no library or a whole one. A folder or library that is a symbolic
link, not a folder or regular file, owned by someone else, or writable by group or others is
refused, and capture falls back to the portable path, as it does without a C compiler, when the
build fails, and under ``BN_INSPECT_FUSED=0``. ``fallback_reason`` says why, for ``--debug``.

Exactness: the output is computed as ATen's CPU kernel computes it, and the first use compares
it with ``F.batch_norm`` bit for bit on a small random input, with and without a fused
multiply-add (whether ATen's build uses one depends on the CPU capability it dispatches to); a
dtype where neither matches is left to the portable path.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from bn_inspect.engine.moments import ChannelMoments, two_pass_moments

SOURCE = "bn_eval.c"
# Portable (no -march): the source clones its loops for CPUs with AVX2 and FMA itself. No
# contraction of a * b + c into an FMA except where the source asks for one: the output must
# round as ATen's does.
FLAGS = ("-O3", "-fPIC", "-shared", "-fno-fast-math", "-ffp-contract=off", "-pthread")
BUILD_TIMEOUT_S = 120
_OVERFLOW = 1
_POINTER, _SIZE = ctypes.c_void_p, ctypes.c_int64
_ARGTYPES = [_POINTER, _POINTER, _SIZE, _SIZE, _SIZE, _POINTER, _POINTER, _POINTER, _POINTER]
_ARGTYPES += [ctypes.c_double, ctypes.c_int, _SIZE, _POINTER, _POINTER, _POINTER, _POINTER, ctypes.c_int]
_ENTRY_POINTS = {torch.float32: "bn_eval_moments_f32", torch.float64: "bn_eval_moments_f64"}


@dataclass(frozen=True)
class Kernel:
    """The loaded entry points, per dtype, and whether each rounds through a fused multiply-add."""

    functions: dict[torch.dtype, Any]  # ctypes functions
    use_fma: dict[torch.dtype, bool]


_fallback_reason: list[str] = []


def fallback_reason() -> str | None:
    """Why the CPU kernel was not used (no compiler, a failed build, an unsafe cache), or None.

    None too where no capture has asked for the kernel yet: this builds nothing.
    """
    return _fallback_reason[0] if _fallback_reason else None


def cache_folder() -> Path:
    """Where the compiled kernel is kept: ``$XDG_CACHE_HOME/bn-inspect``, else ``~/.cache/bn-inspect``."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec ignores a relative path: it would put the cache under the working folder.
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".cache"
    return root / "bn-inspect"


def find_compiler() -> str | None:
    """The C compiler to build the kernel with: the first of cc, gcc and clang on PATH."""
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path is not None:
            return path
    return None


@functools.cache
def kernel() -> Kernel | None:
    """The kernel, built and checked on first use; None where it cannot run exactly."""
    _fallback_reason.clear()
    if os.environ.get("BN_INSPECT_FUSED") == "0":
        _fallback_reason.append("BN_INSPECT_FUSED=0")
        return None
    try:
        library = ctypes.CDLL(str(_library_path()))
    # RuntimeError: pathlib finds no home folder.
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        _fallback_reason.append(f"the CPU kernel could not be built or loaded ({error})")
        return None
    functions = {}
    for dtype, name in _ENTRY_POINTS.items():
        function = getattr(library, name)
        function.restype = ctypes.c_int
        function.argtypes = _ARGTYPES
        functions[dtype] = function
    use_fma = {}
    for dtype in functions:
        rounding = _matching_rounding(functions, dtype)
        if rounding is not None:
            use_fma[dtype] = rounding
    if not use_fma:
        _fallback_reason.append("the CPU kernel's output differs from F.batch_norm's")
        return None
    return Kernel({dtype: functions[dtype] for dtype in use_fma}, use_fma)


def _library_path() -> Path:
    """The compiled library for this source, built now if the cache lacks it."""
    source = resources.files(__package__).joinpath(SOURCE).read_bytes()
    key = hashlib.sha256(source + "\0".join((*FLAGS, platform.machine())).encode()).hexdigest()[:16]
    folder = _own_folder(cache_folder())
    target = folder / f"bn_eval-{key}.so"
    if not os.path.lexists(target):
        _build(source, folder, target)
    _check_own(target, stat.S_ISREG, "a regular file")
    return target


def _own_folder(folder: Path) -> Path:
    folder.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    _check_own(folder, stat.S_ISDIR, "a folder")
    return folder


def _check_own(path: Path, is_kind: Callable[[int], bool], kind: str) -> None:
    """OSError (the kernel falls back) unless ``path`` is ``kind``, not a link, the user's, and no one else's to write."""
    info = os.lstat(path)
    if not is_kind(info.st_mode):
        raise OSError(f"{path} is not {kind}")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise OSError(f"{path} belongs to another user")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise OSError(f"{path} is writable by others")


def _build(source: bytes, folder: Path, target: Path) -> None:
    compiler = find_compiler()
    if compiler is None:
        raise OSError("no C compiler (cc, gcc or clang) on PATH")
    with tempfile.TemporaryDirectory(dir=folder) as work:
        # The source includes itself by its own path, so it is compiled from a file of its own.
        source_path = Path(work) / SOURCE
        source_path.write_bytes(source)
        built = Path(work) / "bn_eval.so"
        command = [compiler, *FLAGS, str(source_path), "-o", str(built), "-lm"]
        built_by = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)
        if built_by.returncode != 0:
            last = (built_by.stderr.strip().splitlines() or ["no message"])[-1]
            raise OSError(f"{compiler} failed with exit code {built_by.returncode}: {last}")
        built.chmod(0o755)
        os.replace(built, target)


def _matching_rounding(functions: dict[torch.dtype, Any], dtype: torch.dtype) -> bool | None:
    """Whether ``F.batch_norm`` rounds as the kernel with an FMA (True) or without (False) does; None: neither."""
    generator = torch.Generator().manual_seed(0)
    planes = torch.randn(3, 21, 5, 7, generator=generator, dtype=dtype) * 3 + 1
    rows = torch.randn(37, 21, generator=generator, dtype=dtype) * 3 + 1
    inputs = [
        (planes, ("planes", 3, 21, 35)),
        (planes.to(memory_format=torch.channels_last), ("rows", 105, 21, 1)),
        (rows, ("rows", 37, 21, 1)),
    ]
    cases = []
    with torch.no_grad():
        for affine in (True, False):
            layer = torch.nn.BatchNorm2d(21, affine=affine, dtype=dtype).eval()
            for tensor in (layer.running_mean, layer.weight, layer.bias):
                if tensor is not None:
                    tensor.normal_(generator=generator)
            running_var = layer.running_var
            if running_var is not None:
                running_var.uniform_(0.1, 2.0, generator=generator)
            for x, layout in inputs:
                expected = F.batch_norm(
                    x, layer.running_mean, running_var, layer.weight, layer.bias, False, 0.0, layer.eps
                )
                cases.append((layer, x, layout, expected))
        for use_fma in (True, False):
            candidate = Kernel(functions, {dtype: use_fma})
            if all(
                torch.equal(batch_norm_eval_with_moments(candidate, layer, x, None, layout)[0], expected)
                for layer, x, layout, expected in cases
            ):
                return use_fma
    return None


def applies(kernel: Kernel, module: _BatchNorm, x: torch.Tensor) -> bool:
    """Whether the kernel computes this call exactly: a dtype it matched torch in, parameters alike."""
    if x.dtype not in kernel.use_fma:
        return False
    tensors = [module.running_mean, module.running_var]
    if module.affine:
        tensors += [module.weight, module.bias]
    return all(
        tensor is not None and tensor.dtype == x.dtype and tensor.device.type == "cpu" and tensor.is_contiguous()
        for tensor in tensors
    )


def batch_norm_eval_with_moments(
    kernel: Kernel,
    module: _BatchNorm,
    x: torch.Tensor,
    previous: ChannelMoments | None,
    layout: tuple[str, int, int, int],
) -> tuple[torch.Tensor, ChannelMoments]:
    """The layer's eval output for ``x`` (bit for bit ``F.batch_norm``'s) and ``previous`` merged with ``x``'s moments.

    Call only where ``applies(kernel, module, x)``; ``layout`` is dispatch's ('planes', N, C, S)
    for NC* contiguous ``x`` or ('rows', R, C, 1) for row-major (R, C) values.
    """
    _, outer, num_channels, inner = layout
    y = torch.empty_like(x)
    out = torch.empty(2, num_channels, dtype=torch.float64)
    before = previous if previous is not None and previous.count > 0 else None
    before_mean, before_m2 = (None, None) if before is None else (before.mean.contiguous(), before.m2.contiguous())
    weight, bias = (module.weight, module.bias) if module.affine else (None, None)
    status = kernel.functions[x.dtype](
        x.data_ptr(),
        y.data_ptr(),
        outer,
        num_channels,
        inner,
        _address(module.running_mean),
        _address(module.running_var),
        _address(weight),
        _address(bias),
        float(module.eps),
        int(kernel.use_fma[x.dtype]),
        0 if before is None else before.count,
        _address(before_mean),
        _address(before_m2),
        out[0].data_ptr(),
        out[1].data_ptr(),
        torch.get_num_threads(),
    )
    count = x.numel() // num_channels
    if status == _OVERFLOW:
        # Finite values too large for float sums (beyond ~1e17): exact two-pass moments, rarely.
        moments = two_pass_moments(x.double(), [0, *range(2, x.dim())], count)
        return y, moments if before is None else before.merge(moments)
    if status != 0:
        raise MemoryError("the CPU batch-norm kernel could not allocate its buffers")
    mean, m2 = out.unbind()
    return y, ChannelMoments(count + (0 if before is None else before.count), mean, m2)


def _address(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()
