"""Malicious checkpoints for the loading tests: pickles that would run code if ever unpickled.

Each attack leaves evidence when its payload runs (a marker file appears, or a folder vanishes),
so a test can assert both that loading was refused and that nothing ran. Each carrier writes a
payload in one of the ways a model file can hold a pickle.
"""

from __future__ import annotations

import builtins
import importlib
import io
import json
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


def exported_archive(folder: Path) -> Path:
    """A legitimate torch.export archive of a small BatchNorm model, with its sample inputs."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)).eval()
    path = folder / "exported.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(4, 3),)), path)
    return path


def _rewrite_archive(source: Path, target: Path, changes: dict[str, bytes]) -> Path:
    """``source`` with the entries named in ``changes`` (relative to the archive's root folder) replaced or added."""
    with zipfile.ZipFile(source) as original:
        entries = {info.filename.partition("/")[2]: original.read(info) for info in original.infolist()}
        root = original.namelist()[0].partition("/")[0]
    entries.update(changes)
    with zipfile.ZipFile(target, "w") as archive:
        for name, data in entries.items():
            archive.writestr(f"{root}/{name}", data)
    return target


def _weights_config(archive: Path) -> dict[str, Any]:
    with zipfile.ZipFile(archive) as original:
        name = next(n for n in original.namelist() if n.endswith("model_weights_config.json"))
        config: dict[str, Any] = json.loads(original.read(name))
        return config


def pt2_with_sample_inputs(payload: Any, folder: Path) -> Path:
    """A torch.export archive whose sample inputs are ``payload``, pickled (torch retries them unsafely)."""
    return _rewrite_archive(
        exported_archive(folder),
        folder / "sample-inputs.pt2",
        {"data/sample_inputs/model.pt": _torch_save_bytes(payload)},
    )


def pt2_with_pickled_weight(weight: Any, folder: Path) -> Path:
    """A torch.export archive whose first weight is marked ``use_pickle`` and is ``weight``, torch.saved."""
    source = exported_archive(folder)
    config = _weights_config(source)
    meta = next(iter(config["config"].values()))
    meta["use_pickle"] = True
    return _rewrite_archive(
        source,
        folder / "pickled-weight.pt2",
        {
            "data/weights/model_weights_config.json": json.dumps(config).encode(),
            f"data/weights/{meta['path_name']}": _torch_save_bytes(weight),
        },
    )


def pt2_with_opaque_constant(obj: Any, folder: Path) -> Path:
    """A torch.export archive with an ``opaque_obj_0`` constant, ``obj`` pickled (torch uses pickle.loads)."""
    opaque = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
    return _rewrite_archive(
        exported_archive(folder),
        folder / "opaque.pt2",
        {
            "data/constants/model_constants_config.json": json.dumps({"config": {"evil": opaque}}).encode(),
            "data/constants/opaque_obj_0": pickle.dumps(obj),
        },
    )


class _FromFileOnLoad(torch.nn.Module):
    """Overwrites the start of ``target`` with '#' through torch.from_file(shared=True) when unpickled."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return (self.target, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.target = state[0]
        # Used, so that TorchScript's dead code elimination keeps the call.
        self.training = state[1] or bool(torch.from_file(self.target, True, 7, dtype=torch.uint8).fill_(35).sum() < 0)


class _FromFileOnForward(torch.nn.Module):
    """Overwrites the start of ``target`` with '#' through torch.from_file(shared=True) on every call."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stamp = torch.from_file(self.target, True, 7, dtype=torch.uint8).fill_(35)
        return x + stamp.sum() * 0


def torchscript_from_file(target: Path, folder: Path, *, on_load: bool) -> Path:
    """A TorchScript BatchNorm model that overwrites ``target`` when loaded (``on_load``) or when run."""
    trap = (_FromFileOnLoad if on_load else _FromFileOnForward)(str(target))
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(3), trap).eval()
    path = folder / f"from-file-{'load' if on_load else 'forward'}.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    return path


def pt2_with_legacy_fallback(payload: Any, folder: Path) -> Path:
    """A torch.export archive with top-level entries in the pre-2.7 layout, which make torch's reader fail
    and fall back to that layout's loader; its pickles are ``payload`` followed by a bad opcode, so that
    they are not well formed and yet run ``payload`` when unpickled with weights_only=False."""
    from torch._export.serde.schema import SCHEMA_VERSION

    source = exported_archive(folder)
    broken = pickle.dumps(payload)[:-1] + b"\xff"
    target = folder / "legacy-fallback.pt2"
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as archive:
        for name in original.namelist():
            archive.writestr(name, original.read(name))
            if name.endswith("/models/model.json"):
                program = original.read(name)
        archive.writestr("version", ".".join(map(str, SCHEMA_VERSION)))
        archive.writestr("serialized_exported_program.json", program)
        for part in ("state_dict", "constants", "example_inputs"):
            archive.writestr(f"serialized_{part}.pt", broken)
    return target
