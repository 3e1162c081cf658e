"""Malicious checkpoints for the loading tests: pickles that would run code if ever unpickled.

Each attack leaves evidence when its payload runs (a marker file appears, or a folder vanishes),
so a test can assert both that loading was refused and that nothing ran. Each carrier writes a
payload in one of the ways a model file can hold a pickle.
"""

from __future__ import annotations

import builtins
import importlib
import io
import os
import pickle
import shutil
import subprocess
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


class Payload:
    """Unpickling this object calls ``function(*args)``: the classic pickle exploit."""

    def __init__(self, function: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.function = function
        self.args = args

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (self.function, self.args)


@dataclass(frozen=True)
class Attack:
    """A payload, the global that a safe loader must name, and a check that the payload ran."""

    payload: Payload
    global_name: str
    ran: Callable[[], bool]


def _marker_attack(folder: Path, build: Callable[[Path], tuple[Payload, str]]) -> Attack:
    marker = folder / f"pwned-{uuid.uuid4().hex}"
    payload, global_name = build(marker)
    return Attack(payload, global_name, marker.exists)


def _import_module_attack(folder: Path) -> Attack:
    # The module creates the marker when imported; ``folder`` must be on sys.path for it to work.
    marker = folder / f"pwned-{uuid.uuid4().hex}"
    module_name = f"bn_inspect_evil_{uuid.uuid4().hex}"
    (folder / f"{module_name}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    return Attack(Payload(importlib.import_module, (module_name,)), "importlib.import_module", marker.exists)


def _rmtree_attack(folder: Path) -> Attack:
    victim = folder / f"victim-{uuid.uuid4().hex}"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    return Attack(Payload(shutil.rmtree, (str(victim),)), "shutil.rmtree", lambda: not victim.exists())


def _touch_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


ATTACKS: dict[str, Callable[[Path], Attack]] = {
    "os.system": lambda folder: _marker_attack(
        folder, lambda m: (Payload(os.system, (f"touch {m}",)), f"{os.system.__module__}.system")
    ),
    "subprocess.call": lambda folder: _marker_attack(
        folder, lambda m: (Payload(subprocess.call, (["touch", str(m)],)), "subprocess.call")
    ),
    "builtins.exec": lambda folder: _marker_attack(
        folder, lambda m: (Payload(builtins.exec, (_touch_code(m),)), "builtins.exec")
    ),
    "builtins.eval": lambda folder: _marker_attack(
        folder, lambda m: (Payload(builtins.eval, (_touch_code(m),)), "builtins.eval")
    ),
    "importlib.import_module": _import_module_attack,
    "shutil.rmtree": _rmtree_attack,
}


def _torch_save_bytes(obj: Any, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _nested_checkpoint(payload: Payload) -> dict[str, Any]:
    return {"state_dict": {"bn.weight": torch.ones(2), "bn.bias": torch.zeros(2)}, "epoch": 3, "hooks": [payload]}


# Each carrier writes ``payload`` into ``folder`` and returns the file's path.
CARRIERS: dict[str, Callable[[Payload, Path], Path]] = {
    "torch-zip": lambda p, folder: _write(folder / "model.pt", _torch_save_bytes(p)),
    "legacy-torch-save": lambda p, folder: _write(
        folder / "model.pt", _torch_save_bytes(p, _use_new_zipfile_serialization=False)
    ),
    "raw-pickle-protocol-2": lambda p, folder: _write(folder / "model.pkl", pickle.dumps(p, protocol=2)),
    "raw-pickle-protocol-4": lambda p, folder: _write(folder / "model.pth", pickle.dumps(p, protocol=4)),
    "nested-in-checkpoint": lambda p, folder: _write(
        folder / "checkpoint.pt", _torch_save_bytes(_nested_checkpoint(p))
    ),
    "named-safetensors": lambda p, folder: _write(folder / "model.safetensors", _torch_save_bytes(p)),
    "named-pt2": lambda p, folder: _write(folder / "model.pt2", _torch_save_bytes(p)),
}


def disguise_as_torchscript(payload: Payload, folder: Path) -> Path:
    """A torch.save archive of ``payload`` with TorchScript entries added, so it is sent to torch.jit.load."""
    source = zipfile.ZipFile(io.BytesIO(_torch_save_bytes(payload)))
    path = folder / "scripted.pt"
    with zipfile.ZipFile(path, "w") as archive:
        for name in source.namelist():
            archive.writestr(name, source.read(name))
        root = source.namelist()[0].split("/")[0]
        archive.writestr(f"{root}/code/__torch__/evil.py", "")
        archive.writestr(f"{root}/constants.pkl", pickle.dumps((), protocol=2))
    return path
