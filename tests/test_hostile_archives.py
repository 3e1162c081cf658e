"""Hostile torch.export and TorchScript archives run nothing and touch no file unless trusted.

torch.export.load unpickles sample inputs, ``use_pickle`` weights and opaque constants with
weights_only=False; TorchScript code may call torch.from_file(shared=True), which creates or
overwrites a file, from ``__setstate__`` on load or from ``forward``. Each route is built here with
a canary (a marker file that appears, or a victim file whose hash changes) and must be refused by
load_model and by every command that loads a model, before any of it runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from bn_inspect.errors import ModelFileError, UntrustedArchiveError, UntrustedPickleError
from bn_inspect.model.loading import load_model
from tests.helpers import SAMPLES, invoke
from tests.malicious import (
    ATTACKS,
    exported_archive,
    pt2_with_legacy_fallback,
    pt2_with_opaque_constant,
    pt2_with_pickled_weight,
    pt2_with_sample_inputs,
    torchscript_from_file,
)

# Each command that loads a model, with the options it needs to run on the (N, 3) test models.
COMMANDS = {
    "layers": ["layers"],
    "inspect": ["inspect", "--shape", "4,3"],
    "check --no-data": ["check", "--no-data"],
}
TRUST = "If you trust the file, pass --trust-pickle; otherwise ask for a state_dict or safetensors file (load it with --arch)"
PICKLE_FIX = (
    "If you trust the file, pass --trust-pickle; otherwise ask for a state_dict "
    "(load it with --arch) or a TorchScript archive"
)
VICTIM_TEXT = "print('hello world')\n"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cli(capsys: pytest.CaptureFixture[str], argv: list[str], path: Path) -> tuple[int, list[str]]:
    result = invoke(capsys, [argv[0], path, *argv[1:]])
    return result.code, result.err.splitlines()


# name -> (builder of the hostile archive from a payload, the entry that holds the payload)
PT2_ROUTES: dict[str, tuple[Callable[[Any, Path], Path], str]] = {
    "sample-inputs": (pt2_with_sample_inputs, "data/sample_inputs/model.pt"),
    "use_pickle-weight": (pt2_with_pickled_weight, "data/weights/weight_0"),
    "opaque-constant": (pt2_with_opaque_constant, "data/constants/opaque_obj_0"),
}


@pytest.mark.parametrize("route", sorted(PT2_ROUTES))
def test_pt2_pickle_payload_is_refused_by_load_model(tmp_path: Path, route: str) -> None:
    build, entry = PT2_ROUTES[route]
    attack = ATTACKS["os.system"](tmp_path)
    path = build(attack.payload, tmp_path)
    with pytest.raises(UntrustedPickleError, match=f"entry {entry}\\) is a pickle that imports {attack.global_name}"):
        load_model(path)
    assert not attack.ran()


@pytest.mark.surface("read:model", "execution")
@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("route", sorted(PT2_ROUTES))
def test_pt2_pickle_payload_is_refused_by_every_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], route: str, command: str
) -> None:
    build, entry = PT2_ROUTES[route]
    attack = ATTACKS["os.system"](tmp_path)
    path = build(attack.payload, tmp_path)
    before = _sha256(path)
    code, err = _cli(capsys, COMMANDS[command], path)
    assert code == 2
    assert err == [
        f"Error: {path} (entry {entry}) is a pickle that imports {attack.global_name} when loaded, "
        f"and loading it would run code from the file. {PICKLE_FIX}"
    ]
    assert not attack.ran()
    assert _sha256(path) == before


@pytest.mark.surface("read:model", "execution")
def test_pt2_sample_inputs_are_never_unpickled_even_when_trusted(tmp_path: Path) -> None:
    attack = ATTACKS["os.system"](tmp_path)
    loaded = load_model(pt2_with_sample_inputs(attack.payload, tmp_path), trust_pickle=True)
    assert loaded.format == "torch.export"
    assert not attack.ran()


def test_pt2_pickled_weight_of_plain_tensor_is_refused_without_trust(tmp_path: Path) -> None:
    # Nothing outside the weights-only allow-list, but torch would unpickle it with weights_only=False.
    path = pt2_with_pickled_weight(torch.nn.Parameter(torch.ones(2, 3)), tmp_path)
    with pytest.raises(UntrustedArchiveError, match=r"stores '0\.weight' as a pickle \(weight_0, listed in"):
        load_model(path)


def test_pt2_pickled_weight_loads_with_trust_pickle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = pt2_with_pickled_weight(torch.nn.Parameter(torch.ones(2, 3)), tmp_path)
    loaded = load_model(path, trust_pickle=True)
    assert torch.equal(loaded.module.get_parameter("0.weight"), torch.ones(2, 3))
    code, err = _cli(capsys, ["layers", "--trust-pickle"], path)
    assert (code, err) == (0, [])


@pytest.mark.surface("read:model", "execution")
def test_pt2_opaque_constant_is_refused_without_trust(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = pt2_with_opaque_constant(3, tmp_path)
    code, err = _cli(capsys, ["layers"], path)
    assert code == 2
    assert err == [
        f"Error: {path} stores 'evil' as a pickle (opaque_obj_0, listed in "
        "data/constants/model_constants_config.json), and loading it would run code from the file. " + TRUST
    ]


@pytest.mark.surface("read:model", "traceback")
@pytest.mark.parametrize("trust_pickle", [False, True], ids=["untrusted", "trusted"])
def test_pt2_entries_outside_its_folder_are_refused(tmp_path: Path, trust_pickle: bool) -> None:
    # Such an entry sends torch.export.load to its pre-2.7 loader, which retries pickles unsafely.
    attack = ATTACKS["os.system"](tmp_path)
    path = pt2_with_legacy_fallback(attack.payload, tmp_path)
    with pytest.raises(ModelFileError, match="corrupt: entry version is outside the archive's folder exported/"):
        load_model(path, trust_pickle=trust_pickle)
    assert not attack.ran()


def test_legitimate_exported_model_loads_without_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = exported_archive(tmp_path)
    loaded = load_model(path)
    assert loaded.format == "torch.export"
    assert loaded.module(torch.randn(4, 3)).shape == (4, 2)
    code, err = _cli(capsys, COMMANDS["inspect"], path)
    assert code == 0, err


@pytest.mark.parametrize("on_load", [True, False], ids=["setstate", "forward"])
def test_torchscript_from_file_is_refused_by_load_model(tmp_path: Path, on_load: bool) -> None:
    victim = tmp_path / "victim.py"
    victim.write_text(VICTIM_TEXT)
    before = _sha256(victim)
    path = torchscript_from_file(victim, tmp_path, on_load=on_load)
    with pytest.raises(UntrustedArchiveError, match="calls aten::from_file in its TorchScript code code/"):
        load_model(path)
    assert _sha256(victim) == before


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("on_load", [True, False], ids=["setstate", "forward"])
def test_torchscript_from_file_is_refused_by_every_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], on_load: bool, command: str
) -> None:
    victim = tmp_path / "victim.py"
    victim.write_text(VICTIM_TEXT)
    before = _sha256(victim)
    path = torchscript_from_file(victim, tmp_path, on_load=on_load)
    code, err = _cli(capsys, COMMANDS[command], path)
    assert code == 2
    assert err == [
        f"Error: {path} calls aten::from_file in its TorchScript code code/__torch__/tests/malicious.py, "
        f"an operator that reaches files, processes or the network. {TRUST}"
    ]
    assert _sha256(victim) == before


@pytest.mark.surface("read:model", "execution")
def test_torchscript_canary_file_is_never_created(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    canary = tmp_path / "canary"
    path = torchscript_from_file(canary, tmp_path, on_load=True)
    assert _cli(capsys, ["layers"], path)[0] == 2
    assert not canary.exists()


def test_torchscript_from_file_runs_with_trust_pickle(tmp_path: Path) -> None:
    # The flag is the user's word that the file is theirs: the archive then loads as torch loads it.
    victim = tmp_path / "victim.py"
    victim.write_text(VICTIM_TEXT)
    load_model(torchscript_from_file(victim, tmp_path, on_load=True), trust_pickle=True)
    assert victim.read_text().startswith("#######")


@pytest.mark.parametrize("sample", sorted(p.parent.name for p in SAMPLES.glob("*/torchscript.pt")))
def test_shipped_torchscript_samples_load_without_flag(sample: str) -> None:
    assert load_model(SAMPLES / sample / "torchscript.pt").format == "torchscript"
