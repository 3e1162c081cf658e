"""The watch's refusal of a model compiled inside it: torch.compile would trace the watch's hooks into its graphs.

Dynamo inlines forward hooks: compiling the watched model (or a module holding it, or a part of it)
inside the watch would trace the hooks' step count, sample choice and file writes into the graphs,
with a graph break at each layer and a recompile at each step, watching nothing it could promise.
So a hook that finds itself traced refuses; where Dynamo cannot run the refusal (``fullgraph=True``)
``compile_refusal`` recognizes the error it raises instead.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bn_inspect.errors import WatchError

_HOOKS = Path(__file__).resolve().with_name("watching.py")


def compiling_error() -> WatchError:
    """The refusal to watch a model that is compiled inside the watch."""
    return WatchError(
        "the watched model is being compiled (torch.compile) inside the watch, which would trace the watch's "
        "hooks into its graphs (a graph break at each layer, a recompile at each step)",
        "Watch the model uncompiled while diagnosing, or compile it after the watch ends",
    )


# Dynamo does not trace a disabled function: it breaks the graph and calls it eagerly, so the refusal
# is raised as it is, whatever Dynamo would make of tracing an exception's construction.
@torch.compiler.disable(reason="bn_inspect.watch refuses to be compiled")  # type: ignore[untyped-decorator,no-untyped-call]
def refuse_compiling() -> None:
    """Raise the refusal (``compiling_error``): called by the hooks when Dynamo traces them."""
    raise compiling_error()


def compile_refusal(error: BaseException) -> WatchError | None:
    """The refusal to watch a model compiled inside the watch, for the error torch.compile raised.

    With ``fullgraph=True`` Dynamo cannot break the graph to raise the refusal, and raises its own
    error instead: one whose traced stack passes through these hooks. None for any other error.
    """
    stack = getattr(error, "real_stack", None)
    if not type(error).__module__.startswith("torch._dynamo") or not stack:
        return None
    if not any(Path(frame.filename).resolve() == _HOOKS for frame in stack):
        return None
    return compiling_error()
