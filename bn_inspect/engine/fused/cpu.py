"""Eval-mode batch norm with its input's moments in one read on the CPU: a kernel compiled by inductor.

The portable CPU path reads every batch-norm input twice: once in the statistics pass of the
pre-hook, once in the layer's own normalization. In eval mode the output is ``x * alpha + beta``
per channel, so one loop can write it and add up the same values: torch.compile's C++ backend
fuses the output and the per-(sample, channel) row sums into one kernel, which costs about what
torch's own eval kernel costs (docs/benchmarks.md, issue 30).

Opt-in (``BN_INSPECT_CPU_KERNEL=compiled``): the first calls in a process compile for several
seconds, which only a long run earns back. It keeps what the portable path guarantees:

* the output is bit for bit ``F.batch_norm``'s. alpha and beta are read back from torch's own
  kernel (``_coefficients``), and the compiled multiply-add is contracted as torch's is; each
  layer's first call per input shape also runs torch's kernel and compares, and a layer and shape
  whose outputs differed take the portable path from then on;
* the moments: each row is shifted by its channel's first value and summed with its squares as
  the portable pass sums them (in the input's dtype), the row sums are added in float64, and
  the same ``shifted_moments`` finishes them (with its cancellation check and exact fallback).

Without a C++ compiler, without a private cache folder, or where compiling fails, the portable
path runs and ``unavailable_reason`` (and a note, ``prepare_note``) says why; the compiler's
own output never reaches stderr. Inductor loads the libraries it builds from its cache, so that
cache is a folder only this user can write (``private_cache``), set for inductor around the
kernel's calls, not torch's default under /tmp, unless the user chose one with
``TORCHINDUCTOR_CACHE_DIR``.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import os
import pwd
import shutil
import stat
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from bn_inspect.boundary.writing import stderr_discarded
from bn_inspect.engine.moments import ChannelMoments, cpu_moments, settled_moments, shifted_moments

STOCK_FORWARD = _BatchNorm.forward

CPU_KERNEL_VARIABLE = "BN_INSPECT_CPU_KERNEL"
DTYPES = (torch.float32, torch.float64)


def requested() -> bool:
    """Whether the user asked for the compiled CPU kernel."""
    return os.environ.get(CPU_KERNEL_VARIABLE, "") == "compiled"


def _normalize_and_reduce(
    planes: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output, and mean, m2 and the unusable flag of ``shifted_moments``, for planes of shape (N, C, S).

    One loop nest writes the output and reduces each (sample, channel) row of the same values, as
    the portable pass does: shifted and summed with their squares in the input's dtype, the row
    sums then added in float64. (Float64 row sums cost up to 6x more on rows of 49 values.)
    """
    output = planes * alpha[:, None] + beta[:, None]
    shifted = planes - shift[:, None]
    row_sums, row_squares = shifted.sum(2), (shifted * shifted).sum(2)
    count = planes.shape[0] * planes.shape[2]
    return output, *shifted_moments(count, shift, row_sums.double().sum(0), row_squares.double().sum(0))


def private_cache() -> Path:
    """A folder for inductor's cache that only this user can write, created if missing.

    The folder and every folder above it must belong to this user (or root) and be closed to
    others' writes, unless sticky (as /tmp is): whoever can write to a folder above could swap the
    cache for one of their own between this check and inductor's use of it.

    Raises:
        OSError: naming the folder that fails, and why.
    """
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = base / "bn-inspect" / "inductor"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"{folder} cannot be created ({error.strerror or error})") from error
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise OSError(f"{folder} is not a folder of this user's")
    for place in (folder, *folder.parents):
        info = place.stat()
        if info.st_uid not in (0, os.getuid()):
            raise OSError(f"{place} belongs to another user")
        writable_by_others = info.st_mode & stat.S_IWOTH or (
            info.st_mode & stat.S_IWGRP and not _own_group(info.st_gid)
        )
        if writable_by_others and not (place != folder and info.st_mode & stat.S_ISVTX):
            raise OSError(f"{place} is writable by others")
    return folder


def _own_group(gid: int) -> bool:
    """Whether no one but this user is in group ``gid`` (a user private group, as umask 002 systems make)."""
    try:
        group = grp.getgrgid(gid)
        me = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return False
    members = set(group.gr_mem) | {user.pw_name for user in pwd.getpwall() if user.pw_gid == gid}
    return members <= {me}


_unavailable: list[str] = []


def unavailable_reason() -> str | None:
    """Why the requested kernel is not in use (no compiler, no private cache, compiling failed), once tried."""
    return _unavailable[0] if _unavailable else None


def prepare() -> str | None:
    """Make the kernel ready where it was requested; returns why it cannot be used, else None."""
    _kernel()
    return unavailable_reason()


def prepare_note(is_eager_eval: bool, announce: Callable[[str], None]) -> str | None:
    """Where the kernel was asked for, prepare it; returns a note where this run cannot use it.

    ``announce`` hears, once per process, that the kernel is about to compile: only where a layer
    qualifies, so that no run is told about a kernel it never used.
    """
    value = os.environ.get(CPU_KERNEL_VARIABLE, "")
    if value not in ("", "compiled"):
        return (
            f"note: {CPU_KERNEL_VARIABLE}={value!r} is not a value bn-inspect knows: set it to compiled for the "
            "compiled CPU kernel, or leave it unset; this run takes the portable path."
        )
    if not requested():
        return None
    if not is_eager_eval:
        return (
            f"note: {CPU_KERNEL_VARIABLE}=compiled is set, but the compiled kernel serves only eval-mode "
            "BatchNorm modules of an eager model: this run takes the portable path."
        )
    reason = prepare()
    if reason is not None:
        return (
            f"note: {CPU_KERNEL_VARIABLE}=compiled is set, but {reason}; the statistics take the portable path "
            "(one more read of each batch-norm input)."
        )
    if not _told_by:
        _announce[:] = [announce]
    return None


# Who hears of the kernel's first use in this process (the command's observer), until told; who
# was told, so that they hear if compiling fails.
_announce: list[Callable[[str], None]] = []
_told_by: list[Callable[[str], None]] = []
FAILED_NOTE = (
    f"note: {CPU_KERNEL_VARIABLE}=compiled: compiling the CPU kernel failed; the statistics take the portable "
    "path (one more read of each batch-norm input)."
)
FIRST_USE_NOTE = (
    f"note: {CPU_KERNEL_VARIABLE}=compiled: eval-mode BatchNorm layers normalize and reduce in one compiled "
    "kernel; this batch waits several seconds while it compiles."
)


@functools.cache
def _kernel() -> Callable[..., Any] | None:
    if shutil.which("g++") is None and shutil.which("c++") is None:
        _unavailable.append("there is no C++ compiler (g++ or c++) on PATH")
        return None
    # Inductor loads the libraries it built from its cache: never from a folder others can write
    # to. A folder the user chose for it (TORCHINDUCTOR_CACHE_DIR) is theirs to vouch for.
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        try:
            _cache_folder.append(str(private_cache()))
        except OSError as error:
            _unavailable.append(
                f"its cache folder cannot be used: {error} (set XDG_CACHE_HOME, or TORCHINDUCTOR_CACHE_DIR, to a "
                "folder only you can write to)"
            )
            return None
    # ATen's eval kernel rounds x * alpha + beta as one fused multiply-add where its build can (each
    # layer's first call is compared with it); inductor contracts it alike only with this flag.
    # One compile thread: a pool of compile workers takes seconds to start, for a single kernel.
    return torch.compile(
        _normalize_and_reduce,
        dynamic=True,
        fullgraph=True,
        options={
            "cpp.enable_floating_point_contract_flag": "fast",
            "compile_threads": 1,
            # Precompiled headers go to a folder of torch's own under /tmp whatever the cache folder is.
            "cpp_cache_precompile_headers": False,
        },
    )


# The private cache folder, where the user chose none; set for inductor only around the calls.
_cache_folder: list[str] = []
# Dtypes compiled for (each compiles once, for every size); their first call keeps the compiler quiet.
_compiled: set[torch.dtype] = set()


@contextlib.contextmanager
def _compiling(dtype: torch.dtype) -> Iterator[None]:
    """Inductor's cache folder set for the call, and, on a dtype's first call, the compiler's output off stderr.

    The compiler and inductor's probes write to file descriptor 2 from subprocesses, and a failed
    compile would fill the terminal with them; bn-inspect says in one note what happened instead.
    Left unset afterwards, the user's own torch.compile calls keep torch's choice of folder.
    """
    # Importing inductor sets the variable to torch's default folder: it is replaced for the call.
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if _cache_folder:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = _cache_folder[0]
    try:
        with stderr_discarded() if dtype not in _compiled else contextlib.nullcontext():
            yield
        _compiled.add(dtype)
    finally:
        if _cache_folder and before is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        elif _cache_folder and before is not None:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = before


# Per layer: input (shape, dtype) -> whether the kernel's output equalled torch's on its first call.
_verified: weakref.WeakKeyDictionary[_BatchNorm, dict[tuple[torch.Size, torch.dtype], bool]] = (
    weakref.WeakKeyDictionary()
)


def applies(module: _BatchNorm, x: torch.Tensor) -> bool:
    """Whether this eval call may run the compiled kernel (checked after dispatch's own checks)."""
    if x.device.type != "cpu" or x.dtype not in DTYPES or x.dim() < 3 or not x.is_contiguous():
        return False
    # Each dtype compiles once for every size; a dim of size 1 would compile again (dynamo
    # specializes 0 and 1), and those rare calls are cheaper on the portable path than a compile.
    if x.shape[0] < 2 or x.shape[1] < 2 or x.shape[2:].numel() < 2:
        return False
    tensors = [module.running_mean, module.running_var]
    if module.affine:
        tensors += [module.weight, module.bias]
    # Parameters of another dtype or layout send torch down another path, which rounds otherwise.
    if not all(tensor is not None and tensor.dtype == x.dtype and tensor.is_contiguous() for tensor in tensors):
        return False
    if _verified.get(module, {}).get((x.shape, x.dtype)) is False or _unavailable:
        return False
    # Under a dispatch or function mode (bn-inspect's own observers, or the user's) the compiled
    # call would be traced by the mode: the portable path keeps every op visible to it.
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    return _kernel() is not None


def _coefficients(module: _BatchNorm, num_channels: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha and beta of ``output = x * alpha + beta``, as torch's eval kernel rounds them.

    Kept per layer until one of its tensors is replaced or changed in place (their versions).
    """
    tensors = (module.running_mean, module.running_var, module.weight, module.bias)
    key = (dtype, module.eps, *((id(tensor), tensor._version) if tensor is not None else None for tensor in tensors))
    kept = _coefficients_of.get(module)
    if kept is not None and kept[0] == key:
        return kept[1], kept[2]
    # ATen forms them per channel (batch_norm_cpu_collect_linear_and_constant_terms) with an inverse
    # square root and a multiply-add whose rounding depends on the CPU capability it dispatches
    # to, so both are read back from its own kernel: the output for zeros is beta, and with mean
    # and bias zero the output for ones is alpha.
    probe = torch.zeros((2, 1, num_channels, 2), dtype=dtype)
    probe[1] = 1
    zero = probe[0, 0, :, 0].contiguous()
    weight, bias = module.weight, module.bias
    beta = F.batch_norm(probe[0], module.running_mean, module.running_var, weight, bias, False, 0.0, module.eps)
    alpha = F.batch_norm(probe[1], zero, module.running_var, weight, None, False, 0.0, module.eps)
    # Contiguous, so that the compiled call always sees the same layout (a new one compiles again).
    alpha, beta = alpha[0, :, 0].contiguous(), beta[0, :, 0].contiguous()
    _coefficients_of[module] = (key, alpha, beta)
    return alpha, beta


_coefficients_of: weakref.WeakKeyDictionary[_BatchNorm, tuple[tuple[Any, ...], torch.Tensor, torch.Tensor]] = (
    weakref.WeakKeyDictionary()
)


def batch_norm_eval_with_moments(
    module: _BatchNorm, x: torch.Tensor, previous: ChannelMoments | None
) -> tuple[torch.Tensor, ChannelMoments]:
    """The layer's eval output (bit for bit ``F.batch_norm``'s) and ``previous`` merged with ``x``'s moments.

    Call only where ``applies(module, x)``. The first call per input shape and dtype also runs
    torch's own kernel and compares: where the outputs differ, it returns torch's and this layer
    and shape take the portable path from then on.
    """
    function = _kernel()
    assert function is not None
    with torch.no_grad():
        alpha, beta = _coefficients(module, x.shape[1], x.dtype)
        # The values as (N, C, S), as a tensor of its own over x's storage: a view would make dynamo
        # guard on its base's rank, and compile again for every rank of input.
        num_samples, num_channels = x.shape[0], x.shape[1]
        spatial = x.numel() // (num_samples * num_channels)
        planes = torch.empty(0, dtype=x.dtype).set_(
            x.untyped_storage(),
            x.storage_offset(),
            (num_samples, num_channels, spatial),
            (num_channels * spatial, spatial, 1),
        )
        # As in cpu_moments: each channel is shifted by its first value, unless that is not finite.
        shift = torch.nan_to_num(planes[0, :, 0], nan=0.0, posinf=0.0, neginf=0.0)
        if _announce:
            _told_by.append(_announce[0])
            _announce.pop()(FIRST_USE_NOTE)
        try:
            with _compiling(x.dtype):
                output, mean, m2, unusable = function(planes, alpha, beta, shift)
        except Exception as error:
            # Whatever stops the compiler (headers, a full disk), the portable path remains.
            _unavailable.append(f"compiling it failed ({type(error).__name__})")
            for tell in _told_by:
                tell(FAILED_NOTE)
            return STOCK_FORWARD(module, x), _merged(previous, cpu_moments(x))
        output = output.view(x.shape)
        seen = _verified.setdefault(module, {})
        if (x.shape, x.dtype) not in seen:
            expected = STOCK_FORWARD(module, x)
            seen[(x.shape, x.dtype)] = _same(output, expected)
            output = expected
        moments = settled_moments(x, num_samples * spatial, mean, m2, unusable)
    return output, _merged(previous, moments)


def _same(output: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal value for value, NaN where torch has NaN (a model being debugged may well have some)."""
    return torch.equal(output, expected) or bool(((output == expected) | (output.isnan() & expected.isnan())).all())


def _merged(previous: ChannelMoments | None, moments: ChannelMoments) -> ChannelMoments:
    return moments if previous is None else previous.merge(moments)
