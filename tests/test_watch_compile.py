"""torch.compile inside a watch: every way of compiling the watched model is refused in one line, never watched silently."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import bn_inspect
from bn_inspect.errors import WatchError
from tests.training import new_net, records, train

REFUSAL = (
    "the watched model is being compiled (torch.compile) inside the watch, which would trace the watch's "
    "hooks into its graphs (a graph break at each layer, a recompile at each step). "
    "Watch the model uncompiled while diagnosing, or compile it after the watch ends"
)


class Holder(nn.Module):
    """A module holding the watched model: compiling it compiles the model's forward too."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def _in_place(model: nn.Module, backend: str) -> nn.Module:
    model.compile(backend=backend)
    return model


def _one_layer(model: nn.Module, backend: str) -> nn.Module:
    # The root's hook runs eagerly; the compiled layer's own hooks are traced.
    model.bn2 = torch.compile(model.bn2, backend=backend)  # type: ignore[assignment]
    return model


COMPILES: dict[str, Callable[[nn.Module, str], nn.Module]] = {
    "compile": lambda model, backend: torch.compile(model, backend=backend),
    "fullgraph": lambda model, backend: torch.compile(model, backend=backend, fullgraph=True),
    "in-place": _in_place,
    "holder": lambda model, backend: torch.compile(Holder(model), backend=backend),
    "one-layer": _one_layer,
}


@pytest.fixture(scope="module")
def inductor() -> None:
    """Skip where inductor cannot generate code here (it needs a C++ compiler on the CPU)."""
    torch._dynamo.reset()
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(3))
    except Exception as error:  # whatever the toolchain raises, the case cannot run here
        pytest.skip(f"inductor cannot compile here: {type(error).__name__}")


def _assert_refused(
    model: nn.Module, compile_: Callable[[nn.Module, str], nn.Module], backend: str, path: Path
) -> None:
    torch._dynamo.reset()
    with pytest.raises(WatchError) as caught, bn_inspect.watch(model, path, every=2):
        train(model, 1)  # eager steps first: the compiled ones must not pass unwatched
        train(compile_(model, backend), 4)
    assert caught.value.line() == REFUSAL and caught.value.exit_code == 2
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    end = records(path)[-1]
    assert end["record"] == "end" and end["steps"] == 1
    # The refusal ended the block (with fullgraph too, where Dynamo raised an error of its own).
    assert end["exception"]["type"] == "WatchError" and REFUSAL.startswith(end["exception"]["message"].rstrip("…"))


@pytest.mark.parametrize("how", list(COMPILES))
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_model_compiled_inside_the_watch_is_refused_in_one_line(how: str, backend: str, tmp_path: Path) -> None:
    _assert_refused(new_net(), COMPILES[how], backend, tmp_path / "w.jsonl")


@pytest.mark.slow  # inductor's first compile here takes 20-30 s on 2 shared cores
@pytest.mark.parametrize("how", ["compile", "fullgraph"])
def test_inductor_is_refused_before_it_generates_code(how: str, inductor: None, tmp_path: Path) -> None:
    _assert_refused(new_net(), COMPILES[how], "inductor", tmp_path / "w.jsonl")


class Branching(Holder):
    """A holder that fullgraph cannot compile for a reason of its own (a data-dependent branch), before the model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = x * 2.0
        return self.inner(x)


def test_a_compile_error_of_the_models_own_is_not_dressed_as_the_watchs(tmp_path: Path) -> None:
    torch._dynamo.reset()
    model = new_net()
    with pytest.raises(Exception) as caught, bn_inspect.watch(model, tmp_path / "w.jsonl", every=2):
        torch.compile(Branching(model), backend="eager", fullgraph=True)(torch.ones(4, 1, 8, 8))
    assert not isinstance(caught.value, WatchError)
    assert type(caught.value).__module__.startswith("torch._dynamo")
