"""Leave a model as it came: training flags and buffers restored after a run, lazy buffers as materialized."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from bn_inspect.model.layers import is_uninitialized


def _has_lazy_buffers(module: nn.Module) -> bool:
    return not isinstance(module, torch.jit.ScriptModule) and any(
        is_uninitialized(buffer) for buffer in module._buffers.values()
    )


def _snapshot_when_materialized(
    module: nn.Module, saved: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]]
) -> RemovableHandle:
    """A pre-hook that adds ``module``'s lazy buffers to ``saved`` as its first forward materialized them.

    They cannot be copied before that forward, and a train-mode forward updates them right after,
    so the copy is taken in between: the lazy module's own pre-hook, registered when it was built,
    runs first. Restoring it leaves the module as materialized (running statistics zeros and ones).
    """
    lazy_names = [name for name, buffer in module._buffers.items() if is_uninitialized(buffer)]

    def snapshot(hooked: nn.Module, _args: tuple[Any, ...]) -> None:
        materialized = [(name, hooked._buffers.get(name)) for name in lazy_names]
        if any(buffer is None or is_uninitialized(buffer) for _, buffer in materialized):
            return
        saved.extend(
            (hooked, name, buffer, buffer.detach().clone()) for name, buffer in materialized if buffer is not None
        )
        handle.remove()

    handle = module.register_forward_pre_hook(snapshot)
    return handle


@contextmanager
def preserved_state(model: nn.Module, *, recurse: bool = True) -> Iterator[None]:
    """Restore every module's training flag and every buffer on exit, even when the block raises.

    ``recurse`` False keeps ``model``'s own flag and buffers only, not its submodules'.
    """
    modules = list(model.modules()) if recurse else [model]
    flags = [(module, module.training) for module in modules]
    # Kept by (module, name): a forward may assign a new tensor to a buffer (self.moving_mean = ...),
    # and the original object, with its original values, must be back in place afterwards.
    saved = [
        (module, name, buffer, buffer.detach().clone())
        for module in modules
        if not isinstance(module, torch.jit.ScriptModule)
        for name, buffer in module._buffers.items()
        if buffer is not None and not is_uninitialized(buffer)
    ]
    script_saved = [
        (buffer, buffer.detach().clone())
        for module in modules
        if isinstance(module, torch.jit.ScriptModule)
        for buffer in module.buffers(recurse=False)
        if not is_uninitialized(buffer)
    ]
    handles = [_snapshot_when_materialized(module, saved) for module in modules if _has_lazy_buffers(module)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for module, name, buffer, copy in saved:
                module._buffers[name] = buffer
                if buffer.shape == copy.shape:
                    buffer.copy_(copy)
            for buffer, copy in script_saved:
                if buffer.shape == copy.shape:
                    buffer.copy_(copy)
        # Set the flags directly: train() may be overridden (frozen-BN backbones), and exported
        # programs refuse it; the saved per-module flags are the truth to restore.
        for module, flag in flags:
            module.training = flag
