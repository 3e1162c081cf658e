"""load_model and detect_file_kind: every format loads, nothing from an untrusted file runs."""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import re
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from bn_inspect.analyses.inspection import inspect_model
from bn_inspect.cli.main import run
from bn_inspect.errors import ArchError, ModelFileError, StateDictMismatchError, UntrustedPickleError
from bn_inspect.model.arch import parse_arch_kwargs
from bn_inspect.model.files import FileKind, detect_file_kind
from bn_inspect.model.loading import load_model
from sample_models.architectures import DigitsCNN
from tests import models
from tests.helpers import DIGITS, REPO, SAMPLES, assert_one_error_line, invoke
from tests.malicious import ATTACKS, CARRIERS, Payload, disguise_as_torchscript

ARCH = "sample_models.architectures:DigitsCNN"
ARCH_FILE = f"{SAMPLES / 'architectures.py'}:DigitsCNN"


# --- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained() -> DigitsCNN:
    """A DigitsCNN whose every parameter and buffer differs from a fresh one."""
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                tensor.fill_(7)
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand_like(tensor) + 0.5)
            else:
                tensor.copy_(torch.randn_like(tensor))
    return model


@pytest.fixture
def state_dict(trained: DigitsCNN) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trained.state_dict().items()}


def assert_weights_equal(module: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    actual = module.state_dict()
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def save(obj: object, path: Path, **kwargs: object) -> Path:
    torch.save(obj, path, **kwargs)  # type: ignore[arg-type]
    return path


def first_payload_offset(path: Path, entry_suffix: str = "/data/0") -> int:
    """Byte offset in ``path`` of the first byte of the zip entry ending with ``entry_suffix``."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(entry_suffix))
    data = path.read_bytes()
    header = data[info.header_offset : info.header_offset + 30]
    assert header[:4] == b"PK\x03\x04"
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length


# --- every format loads -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", [ARCH, ARCH_FILE], ids=["module-spec", "file-spec"])
def test_state_dict_with_arch(tmp_path: Path, state_dict: dict[str, torch.Tensor], arch: str) -> None:
    path = save(state_dict, tmp_path / "weights.pt")
    loaded = load_model(path, arch=arch)
    assert loaded.format == "state_dict"
    assert loaded.arch == arch
    assert loaded.source == str(path)
    # A file spec imports the file as a module of its own, so the class is a twin, not the same.
    assert type(loaded.module).__name__ == "DigitsCNN"
    assert_weights_equal(loaded.module, state_dict)


def test_relative_file_spec_from_the_working_directory(
    tmp_path: Path, state_dict: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save(state_dict, tmp_path / "weights.pt")
    monkeypatch.chdir(REPO)
    loaded = load_model(path, arch="sample_models/architectures.py:DigitsCNN")
    assert_weights_equal(loaded.module, state_dict)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"model": sd},
        lambda sd: {"model_state_dict": sd, "optimizer_state_dict": {"state": {}}, "epoch": 1},
    ],
    ids=["state_dict-key", "model-key", "model_state_dict-key"],
)
def test_checkpoint_dict(tmp_path: Path, state_dict: dict[str, torch.Tensor], wrap) -> None:
    path = save(wrap(state_dict), tmp_path / "checkpoint.pth")
    loaded = load_model(path, arch=ARCH)
    assert loaded.format == "checkpoint"
    assert_weights_equal(loaded.module, state_dict)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_wrapper_prefixes_are_stripped(tmp_path: Path, state_dict: dict[str, torch.Tensor], prefix: str) -> None:
    prefixed = {prefix + k: v for k, v in state_dict.items()}
    path = save({"state_dict": prefixed, "epoch": 3}, tmp_path / "ddp.pt")
    loaded = load_model(path, arch=ARCH)
    assert_weights_equal(loaded.module, state_dict)


def test_safetensors(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "model.safetensors"
    save_file(state_dict, str(path))
    assert detect_file_kind(path) is FileKind.SAFETENSORS
    loaded = load_model(path, arch=ARCH)
    assert loaded.format == "safetensors"
    assert_weights_equal(loaded.module, state_dict)


def test_safetensors_with_ddp_prefix(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "model.safetensors"
    save_file({f"module.{k}": v for k, v in state_dict.items()}, str(path))
    assert_weights_equal(load_model(path, arch=ARCH).module, state_dict)


def test_torchscript(tmp_path: Path, trained: DigitsCNN) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(trained), str(path))
    assert detect_file_kind(path) is FileKind.TORCHSCRIPT
    loaded = load_model(path)
    assert loaded.format == "torchscript"
    assert loaded.arch is None
    assert isinstance(loaded.module, torch.jit.ScriptModule)
    assert_weights_equal(loaded.module, trained.state_dict())


def test_shipped_torchscript_loads_without_arch() -> None:
    loaded = load_model(DIGITS / "torchscript.pt")
    assert loaded.format == "torchscript"
    reference = torch.load(DIGITS / "state_dict.pt", weights_only=True)
    assert_weights_equal(loaded.module, reference)


def test_whole_pickle_with_trust(tmp_path: Path, trained: DigitsCNN) -> None:
    path = save(trained, tmp_path / "whole.pt")
    loaded = load_model(path, trust_pickle=True)
    assert loaded.format == "pickle"
    assert isinstance(loaded.module, DigitsCNN)
    assert_weights_equal(loaded.module, trained.state_dict())


def test_shipped_pickle_loads_with_trust() -> None:
    loaded = load_model(DIGITS / "pickle.pt", trust_pickle=True)
    assert loaded.format == "pickle"
    assert isinstance(loaded.module, DigitsCNN)
    reference = torch.load(DIGITS / "state_dict.pt", weights_only=True)
    assert_weights_equal(loaded.module, reference)


def test_model_inside_checkpoint_with_trust(tmp_path: Path, trained: DigitsCNN) -> None:
    path = save({"model": trained, "epoch": 2}, tmp_path / "ckpt.pt")
    loaded = load_model(path, trust_pickle=True)
    assert loaded.format == "pickle"
    assert_weights_equal(loaded.module, trained.state_dict())


def test_legacy_non_zip_state_dict(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    path = save(state_dict, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert detect_file_kind(path) is FileKind.LEGACY_PICKLE
    assert_weights_equal(load_model(path, arch=ARCH).module, state_dict)


def test_arch_alone_builds_a_fresh_model() -> None:
    loaded = load_model(None, arch=ARCH, arch_kwargs={"num_classes": 4})
    assert loaded.format == "arch"
    assert loaded.source == "<arch>"
    assert isinstance(loaded.module, DigitsCNN)
    assert loaded.module.classifier.out_features == 4


def test_arch_kwargs_reach_the_callable(tmp_path: Path) -> None:
    model = DigitsCNN(num_classes=3)
    path = save(model.state_dict(), tmp_path / "three.pt")
    loaded = load_model(path, arch=ARCH, arch_kwargs=parse_arch_kwargs('{"num_classes": 3}'))
    assert_weights_equal(loaded.module, model.state_dict())


def test_nothing_given() -> None:
    with pytest.raises(ArchError, match="no model given"):
        load_model(None)


# --- TorchScript and torch.export are never "corrupt" -----------------------------------------


def test_torch_export_archive_loads_as_its_graph_module(tmp_path: Path, trained: DigitsCNN) -> None:
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(trained.eval(), (torch.randn(2, 1, 8, 8),)), str(path))
    assert detect_file_kind(path) is FileKind.TORCH_EXPORT
    loaded = load_model(path)
    assert loaded.format == "torch.export"
    x = torch.randn(2, 1, 8, 8)  # exported with a static batch of 2
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), trained.eval()(x))


@pytest.mark.parametrize("name", ["scripted.pt", "scripted.pth", "scripted.pt2", "scripted.safetensors"])
def test_torchscript_is_never_corrupt_whatever_its_name(tmp_path: Path, trained: DigitsCNN, name: str) -> None:
    path = tmp_path / name
    torch.jit.save(torch.jit.script(trained), str(path))
    assert detect_file_kind(path) is FileKind.TORCHSCRIPT
    assert load_model(path).format == "torchscript"


# --- format from content, not extension -------------------------------------------------------


def test_state_dict_named_safetensors(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    # torch.load itself sends any path ending in .safetensors to safetensors; load_model must not.
    path = save(state_dict, tmp_path / "model.safetensors")
    assert detect_file_kind(path) is FileKind.TORCH_SAVE
    loaded = load_model(path, arch=ARCH)
    assert loaded.format == "state_dict"
    assert_weights_equal(loaded.module, state_dict)


def test_safetensors_named_pt(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "weights.pt"
    save_file(state_dict, str(path))
    assert detect_file_kind(path) is FileKind.SAFETENSORS
    assert_weights_equal(load_model(path, arch=ARCH).module, state_dict)


def test_torchscript_named_pth(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    shutil.copy(DIGITS / "torchscript.pt", path)
    assert detect_file_kind(path) is FileKind.TORCHSCRIPT
    assert load_model(path).format == "torchscript"


def test_export_named_pt(tmp_path: Path, trained: DigitsCNN) -> None:
    path = tmp_path / "model.pt"
    torch.export.save(torch.export.export(trained.eval(), (torch.randn(2, 1, 8, 8),)), str(path))
    assert detect_file_kind(path) is FileKind.TORCH_EXPORT


# --- untrusted pickles ------------------------------------------------------------------------

SAMPLE_PICKLE_GLOBALS = [
    "sample_models.architectures.DigitsCNN",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.batchnorm.BatchNorm2d",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.conv.Conv2d",
    "torch.nn.modules.linear.Linear",
    "torch.nn.modules.pooling.MaxPool2d",
]


def test_shipped_pickle_is_refused_listing_every_global() -> None:
    with pytest.raises(UntrustedPickleError, match="--trust-pickle") as info:
        load_model(DIGITS / "pickle.pt")
    assert info.value.unsafe_globals == SAMPLE_PICKLE_GLOBALS
    for name in SAMPLE_PICKLE_GLOBALS:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "write",
    [
        lambda model, path: torch.save(model, path),
        lambda model, path: torch.save(model, path, _use_new_zipfile_serialization=False),
        lambda model, path: torch.save(model, path, pickle_protocol=4),
        lambda model, path: path.write_bytes(pickle.dumps(model, protocol=2)),
        lambda model, path: path.write_bytes(pickle.dumps(model, protocol=4)),
    ],
    ids=["zip", "legacy", "zip-protocol-4", "raw-protocol-2", "raw-protocol-4"],
)
def test_every_pickle_layout_lists_the_same_globals(tmp_path: Path, write) -> None:
    # Protocol 4 names repeated modules through the memo; protocol 2 names Python 2 modules.
    path = tmp_path / "whole.pt"
    write(DigitsCNN(), path)
    with pytest.raises(UntrustedPickleError) as info:
        load_model(path)
    listed = [g for g in info.value.unsafe_globals if not g.startswith("torch.storage.")]
    assert listed == SAMPLE_PICKLE_GLOBALS


def test_only_torch_nn_classes_are_still_refused(tmp_path: Path) -> None:
    path = save(nn.Sequential(nn.BatchNorm1d(3)), tmp_path / "seq.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(
        UntrustedPickleError,
        match=r"imports torch\.nn\.modules\.batchnorm\.BatchNorm1d, torch\.nn\.modules\.container\.Sequential when",
    ):
        load_model(path)


@pytest.mark.parametrize("carrier", sorted(CARRIERS))
@pytest.mark.parametrize("attack_name", sorted(ATTACKS))
def test_malicious_pickle_is_refused_and_never_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, attack_name: str, carrier: str
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))  # lets the import_module payload work, were it run
    attack = ATTACKS[attack_name](tmp_path)
    path = CARRIERS[carrier](attack.payload, tmp_path)
    with pytest.raises(UntrustedPickleError, match=re.escape(attack.global_name)) as info:
        load_model(path, arch=ARCH)
    assert attack.global_name in info.value.unsafe_globals
    assert "--trust-pickle" in str(info.value)
    assert "weights_only" not in str(info.value)
    assert not attack.ran()


@pytest.mark.parametrize("carrier", sorted(CARRIERS))
@pytest.mark.parametrize("attack_name", sorted(ATTACKS))
def test_malicious_pickle_through_the_cli(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    attack_name: str,
    carrier: str,
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    attack = ATTACKS[attack_name](tmp_path)
    path = CARRIERS[carrier](attack.payload, tmp_path)
    code = run(["inspect", str(path), "--shape", "2,1,8,8"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith(f"Error: {path} is a pickle that imports ")
    assert attack.global_name in captured.err
    assert len(captured.err.splitlines()) == 1
    assert "Traceback" not in captured.err + captured.out
    assert not attack.ran()


@pytest.mark.parametrize("attack_name", sorted(ATTACKS))
def test_pickle_disguised_as_torchscript_never_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, attack_name: str
) -> None:
    # torch.jit.load unpickles in C++ and knows no Python globals: it fails, and nothing runs.
    monkeypatch.syspath_prepend(str(tmp_path))
    attack = ATTACKS[attack_name](tmp_path)
    path = disguise_as_torchscript(attack.payload, tmp_path)
    assert detect_file_kind(path) is FileKind.TORCHSCRIPT
    with pytest.raises(ModelFileError, match="is corrupt or not a PyTorch checkpoint"):
        load_model(path, trust_pickle=False)
    assert not attack.ran()


def test_harmless_looking_global_is_still_listed(tmp_path: Path) -> None:
    path = save({"model": DigitsCNN().state_dict(), "extra": Payload(os.getcwd, ())}, tmp_path / "ckpt.pt")
    with pytest.raises(UntrustedPickleError, match=rf"imports {os.getcwd.__module__}\.getcwd when loaded"):
        load_model(path, arch=ARCH)


@pytest.mark.parametrize("attack_name", sorted(ATTACKS))
def test_attacks_leave_evidence_when_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, attack_name: str) -> None:
    # Pins the harness: a plain pickle.loads runs each payload (inside tmp_path), and ran() sees it.
    monkeypatch.syspath_prepend(str(tmp_path))
    attack = ATTACKS[attack_name](tmp_path)
    assert not attack.ran()
    pickle.loads(pickle.dumps(attack.payload, protocol=2))
    assert attack.ran()


def test_protocol_4_state_dict_is_explained_not_called_corrupt(
    tmp_path: Path, state_dict: dict[str, torch.Tensor]
) -> None:
    # torch's weights-only unpickler cannot read protocol 4 frames, though nothing unsafe is named.
    path = save(state_dict, tmp_path / "p4.pt", pickle_protocol=4)
    with pytest.raises(ModelFileError, match="is a pickle that torch's weights-only loader cannot read") as info:
        load_model(path, arch=ARCH)
    assert "weights_only" not in str(info.value)
    assert "--trust-pickle" in str(info.value)
    assert_weights_equal(load_model(path, arch=ARCH, trust_pickle=True).module, state_dict)


# --- state_dict does not fit the architecture -------------------------------------------------


def test_missing_keys_are_named(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    del state_dict["classifier.bias"], state_dict["features.1.running_var"]
    path = save(state_dict, tmp_path / "sd.pt")
    with pytest.raises(
        StateDictMismatchError, match=r"missing keys: features\.1\.running_var, classifier\.bias"
    ) as info:
        load_model(path, arch=ARCH)
    assert "unexpected" not in str(info.value)


def test_unexpected_keys_are_named(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    state_dict["head.weight"] = torch.zeros(3)
    path = save(state_dict, tmp_path / "sd.pt")
    with pytest.raises(StateDictMismatchError, match=r"unexpected keys: head\.weight\. Check --arch"):
        load_model(path, arch=ARCH)


def test_wrong_shapes_are_named(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    state_dict["features.1.running_mean"] = torch.zeros(8)
    path = save(state_dict, tmp_path / "sd.pt")
    with pytest.raises(
        StateDictMismatchError, match=re.escape("wrong shapes (file vs model): features.1.running_mean (8,) vs (16,)")
    ):
        load_model(path, arch=ARCH)


def test_wrong_arch_kwargs_give_wrong_shapes(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    path = save(state_dict, tmp_path / "sd.pt")
    with pytest.raises(
        StateDictMismatchError,
        match=re.escape("classifier.weight (10, 128) vs (5, 128), classifier.bias (10,) vs (5,)"),
    ):
        load_model(path, arch=ARCH, arch_kwargs={"num_classes": 5})


def test_all_three_problems_at_once(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    del state_dict["classifier.bias"]
    state_dict["extra"] = torch.zeros(1)
    state_dict["classifier.weight"] = torch.zeros(1, 1)
    path = save(state_dict, tmp_path / "sd.pt")
    with pytest.raises(
        StateDictMismatchError,
        match=r"missing keys: classifier\.bias; unexpected keys: extra; wrong shapes \(file vs model\): "
        r"classifier\.weight \(1, 1\) vs \(10, 128\)",
    ):
        load_model(path, arch=ARCH)


def test_long_key_lists_are_cut(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    # No prefix makes these keys fit (a prefix that did would be stripped: see the test below).
    path = save({k.replace(".", "_"): v for k, v in state_dict.items()}, tmp_path / "sd.pt")
    with pytest.raises(StateDictMismatchError, match=r"and \d+ more"):
        load_model(path, arch=ARCH)


def test_an_owner_prefix_that_makes_the_keys_fit_is_stripped_and_named(
    tmp_path: Path, state_dict: dict[str, torch.Tensor]
) -> None:
    owned = {f"net.{k}": v for k, v in state_dict.items()} | {"loss.weight": torch.ones(10)}
    loaded = load_model(save({"state_dict": owned}, tmp_path / "ck.pt"), arch=ARCH)
    assert_weights_equal(loaded.module, state_dict)
    (note,) = loaded.notes
    assert "under the prefix 'net.'" in note and "1 entries outside it are left out" in note


def test_a_prefix_covering_only_part_of_the_model_is_not_stripped(
    tmp_path: Path, state_dict: dict[str, torch.Tensor]
) -> None:
    partial = {f"net.{k}": v for k, v in state_dict.items() if not k.startswith("classifier.")}
    path = save(partial, tmp_path / "sd.pt")
    with pytest.raises(StateDictMismatchError, match=r"and \d+ more"):
        load_model(path, arch=ARCH)


# --- --arch errors ----------------------------------------------------------------------------

ARCH_SOURCE = """
from torch import nn

NOT_CALLABLE = 3

def broken():
    raise RuntimeError("cannot build today")

def returns_dict():
    return {"layers": 3}

def good():
    return nn.BatchNorm1d(2)
"""


@pytest.fixture
def arch_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_arch.py"
    path.write_text(ARCH_SOURCE)
    return path


def test_arch_without_colon() -> None:
    with pytest.raises(ArchError, match=r"--arch 'sample_models\.architectures\.DigitsCNN' has no ':'"):
        load_model(None, arch="sample_models.architectures.DigitsCNN")


def test_arch_module_missing() -> None:
    with pytest.raises(ArchError, match=r"module 'no_such_package_bn' cannot be imported"):
        load_model(None, arch="no_such_package_bn.models:Net")


def test_arch_file_missing(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.py"
    with pytest.raises(ArchError, match=f"file {re.escape(str(missing))} does not exist"):
        load_model(None, arch=f"{missing}:Net")


def test_arch_attribute_missing_lists_callables() -> None:
    with pytest.raises(ArchError, match=r"has no attribute 'DigitsCnn'\. Callables there: .*DigitsCNN"):
        load_model(None, arch="sample_models.architectures:DigitsCnn")


def test_arch_not_callable(arch_file: Path) -> None:
    with pytest.raises(ArchError, match="names an object of type int, not a callable"):
        load_model(None, arch=f"{arch_file}:NOT_CALLABLE")


def test_arch_callable_raises(arch_file: Path) -> None:
    with pytest.raises(ArchError, match="raised RuntimeError when called: cannot build today"):
        load_model(None, arch=f"{arch_file}:broken")


def test_arch_returns_non_module(arch_file: Path) -> None:
    with pytest.raises(ArchError, match=r"returned an object of type dict, not a torch\.nn\.Module"):
        load_model(None, arch=f"{arch_file}:returns_dict")


def test_arch_file_that_fails_to_import(tmp_path: Path) -> None:
    path = tmp_path / "bad_arch.py"
    path.write_text("import no_such_module_bn_inspect\n")
    with pytest.raises(ArchError, match=r"importing .*bad_arch\.py raised ModuleNotFoundError"):
        load_model(None, arch=f"{path}:Net")


def test_arch_file_works(arch_file: Path) -> None:
    assert isinstance(load_model(None, arch=f"{arch_file}:good").module, nn.BatchNorm1d)


def test_arch_kwargs_wrong_name() -> None:
    with pytest.raises(ArchError, match="unexpected keyword argument 'bogus'"):
        load_model(None, arch=ARCH, arch_kwargs={"bogus": 1})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{bad", r"--arch-kwargs is not valid JSON \(Expecting property name enclosed in double quotes"),
        ("{'a': 1}", "--arch-kwargs is not valid JSON"),
        ("[1, 2]", "--arch-kwargs must be a JSON object, not list"),
        ("3", "--arch-kwargs must be a JSON object, not int"),
        ('"num_classes"', "--arch-kwargs must be a JSON object, not str"),
    ],
    ids=["malformed", "single-quotes", "list", "number", "string"],
)
def test_bad_arch_kwargs(text: str, message: str) -> None:
    with pytest.raises(ArchError, match=message):
        parse_arch_kwargs(text)


def test_arch_kwargs_empty_and_object() -> None:
    assert parse_arch_kwargs(None) == {}
    assert parse_arch_kwargs("") == {}
    assert parse_arch_kwargs('{"num_classes": 3}') == {"num_classes": 3}


def test_weights_without_arch_ask_for_arch(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    path = save(state_dict, tmp_path / "sd.pt")
    with pytest.raises(ArchError, match=r"holds only weights \(state_dict\), not the model's code\. Pass --arch"):
        load_model(path)


def test_safetensors_without_arch_ask_for_arch(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "w.safetensors"
    save_file(state_dict, str(path))
    with pytest.raises(ArchError, match=r"holds only weights \(safetensors\).*--arch"):
        load_model(path)


# --- corrupt or foreign files -----------------------------------------------------------------


@pytest.fixture(scope="module")
def real_state_dict_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("real") / "state_dict.pt"
    shutil.copy(DIGITS / "state_dict.pt", path)
    return path


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _random_bytes(path: Path) -> Path:
    data = bytearray(random.Random(0).randbytes(4096))
    data[:2] = b"\x13\x37"  # neither a zip, a pickle nor a safetensors header
    return _write_bytes(path, bytes(data))


def _truncated(path: Path, real: Path) -> Path:
    data = real.read_bytes()
    return _write_bytes(path, data[: len(data) // 2])


def _flipped(path: Path, real: Path) -> Path:
    data = bytearray(real.read_bytes())
    data[first_payload_offset(real) + 5] ^= 0xFF
    return _write_bytes(path, bytes(data))


def _foreign_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "not a model")
        archive.writestr("weights/0.bin", b"\x00" * 16)
    return path


def _zip_with_junk_pickle(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02junk that is no pickle")
        archive.writestr("archive/.format_version", "1")
        archive.writestr("archive/version", "3\n")
    return path


CORRUPT_FILES = {
    "empty": (lambda p, real: _write_bytes(p, b""), r"model file {path} is empty\. Re-save or re-download it"),
    "random-bytes": (lambda p, real: _random_bytes(p), r"{path} is not a PyTorch or ONNX model file"),
    "truncated-zip": (_truncated, r"model file {path} is a damaged or truncated zip archive"),
    "flipped-byte": (_flipped, r"model file {path} is corrupt: entry \S+/data/0 fails its CRC check"),
    "text": (
        lambda p, real: _write_bytes(p, b"hello, this is not a model\n" * 4),
        r"{path} is not a PyTorch or ONNX model",
    ),
    "json": (
        lambda p, real: _write_bytes(p, json.dumps({"state_dict": {"w": [1.0, 2.0]}}).encode()),
        r"{path} is not a PyTorch or ONNX model file",
    ),
    "foreign-zip": (lambda p, real: _foreign_zip(p), r"{path} is a zip archive but not a PyTorch checkpoint"),
    "zip-with-junk-pickle": (
        lambda p, real: _zip_with_junk_pickle(p),
        r"model file {path} is corrupt or not a PyTorch checkpoint \(",
    ),
    "pickle-header-then-junk": (
        lambda p, real: _write_bytes(p, b"\x80\x02" + random.Random(1).randbytes(300)),
        r"model file {path} is corrupt or not a PyTorch checkpoint \(",
    ),
    "legacy-bad-magic": (
        lambda p, real: _write_bytes(p, pickle.dumps(12345, protocol=2) + b"junk"),
        r"model file {path} is corrupt or not a PyTorch checkpoint \(RuntimeError: Invalid magic number",
    ),
    "torch-saved-list": (
        lambda p, real: save([torch.ones(2)], p),
        r"{path} holds an object of type list, not a model or state_dict",
    ),
    "dict-without-weights": (
        lambda p, real: save({"epoch": 3, "lr": 0.1}, p),
        r"{path} is a dict without a state_dict inside \(top-level keys: 'epoch', 'lr'\)",
    ),
}


@pytest.mark.parametrize("case", sorted(CORRUPT_FILES))
def test_corrupt_files(tmp_path: Path, real_state_dict_file: Path, case: str) -> None:
    write, pattern = CORRUPT_FILES[case]
    path = write(tmp_path / "model.pt", real_state_dict_file)
    with pytest.raises(ModelFileError, match=pattern.format(path=re.escape(str(path)))) as info:
        load_model(path, arch=ARCH)
    assert "weights_only" not in str(info.value)
    assert "trust-pickle" not in str(info.value)


def test_flipped_byte_is_inside_a_tensor_payload(real_state_dict_file: Path) -> None:
    # Pins the helper: torch itself loads the damaged file silently, so only the CRC check can tell.
    data = bytearray(real_state_dict_file.read_bytes())
    offset = first_payload_offset(real_state_dict_file) + 5
    data[offset] ^= 0xFF
    damaged = torch.load(io.BytesIO(bytes(data)), weights_only=True)
    original = torch.load(real_state_dict_file, weights_only=True)
    assert sorted(damaged) == sorted(original)
    assert any(not torch.equal(damaged[k], original[k]) for k in original)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.pt"
    with pytest.raises(ModelFileError, match=f"model file {re.escape(str(path))} does not exist. Check the path"):
        load_model(path, arch=ARCH)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=f"model file {re.escape(str(tmp_path))} is a directory"):
        load_model(tmp_path, arch=ARCH)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs POSIX permissions and a non-root user")
def test_unreadable_file(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    path = save(state_dict, tmp_path / "locked.pt")
    path.chmod(0)
    try:
        with pytest.raises(ModelFileError, match=r"cannot read model file .*Check its permissions"):
            load_model(path, arch=ARCH)
    finally:
        path.chmod(0o600)


@pytest.mark.parametrize("wrapper", [None, "module.", "_orig_mod."])
def test_a_state_dict_keeps_the_module_versions_it_was_saved_with(wrapper: str | None, tmp_path: Path) -> None:
    model = models.Versioned()
    saved = model.state_dict()
    if wrapper is not None:
        wrapped = nn.Module()
        setattr(wrapped, wrapper[:-1], model)
        saved = wrapped.state_dict()
    path = tmp_path / "versioned.pt"
    torch.save(saved, path)
    code = run(["inspect", str(path), "--arch", "tests.models:Versioned", "--shape", "2,3,6,6", "--format", "json"])
    assert code == 0


# --- the modules' own load hooks decide what fits, as in PyTorch --------------------------------

FROZEN_ARCH_SOURCE = """
import torch
from torch import nn


class FrozenBatchNorm2d(nn.Module):
    # torchvision.ops.FrozenBatchNorm2d's state and loading, verbatim.
    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        num_batches_tracked_key = prefix + "num_batches_tracked"
        if num_batches_tracked_key in state_dict:
            del state_dict[num_batches_tracked_key]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


def build(norm_layer=FrozenBatchNorm2d):
    return nn.Sequential(nn.Conv2d(3, 4, 3), norm_layer(4), nn.ReLU(), nn.Conv2d(4, 4, 1), norm_layer(4))
"""


@pytest.fixture
def frozen_arch(tmp_path: Path) -> Path:
    path = tmp_path / "frozen_arch.py"
    path.write_text(FROZEN_ARCH_SOURCE)
    return path


def batch_norm_state(frozen_arch: Path) -> dict[str, torch.Tensor]:
    """The state_dict of the same net built with ordinary BatchNorm2d (num_batches_tracked included)."""
    namespace: dict[str, object] = {}
    exec(compile(FROZEN_ARCH_SOURCE, str(frozen_arch), "exec"), namespace)
    model = models.randomize_norm_state(namespace["build"](nn.BatchNorm2d))  # type: ignore[operator]
    return model.state_dict()  # type: ignore[no-any-return]


def test_a_batch_norm_state_dict_loads_into_frozen_batch_norm(
    frozen_arch: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state_dict = batch_norm_state(frozen_arch)
    assert "1.num_batches_tracked" in state_dict
    path = save(state_dict, tmp_path / "state.pt")
    result = invoke(capsys, ["inspect", path, "--arch", f"{frozen_arch}:build", "--shape", "2,3,8,8"])
    assert result.code == 0, result.err
    loaded = load_model(path, arch=f"{frozen_arch}:build").module.state_dict()
    assert "1.num_batches_tracked" not in loaded
    for key, tensor in loaded.items():
        assert torch.equal(tensor, state_dict[key]), key


def test_frozen_batch_norm_still_names_what_does_not_fit(
    frozen_arch: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state_dict = batch_norm_state(frozen_arch)
    state_dict["head.weight"] = torch.zeros(3)
    del state_dict["4.running_var"]
    state_dict["1.running_mean"] = torch.zeros(8)
    path = save(state_dict, tmp_path / "state.pt")
    result = invoke(capsys, ["inspect", path, "--arch", f"{frozen_arch}:build", "--shape", "2,3,8,8"])
    assert result.code == 2
    assert_one_error_line(
        result,
        f"the state_dict does not fit --arch {frozen_arch}:build: missing keys: 4.running_var; "
        "unexpected keys: head.weight; wrong shapes (file vs model): 1.running_mean (8,) vs (4,). Check --arch",
    )
    assert "num_batches_tracked" not in result.err


def test_a_state_dict_materializes_lazy_modules(tmp_path: Path) -> None:
    trained = models.LazyConvBN()
    trained(models.make_input((2, 3, 6, 6)))
    state_dict = models.randomize_norm_state(trained).state_dict()
    path = save(state_dict, tmp_path / "lazy.pt")
    loaded = load_model(path, arch="tests.models:LazyConvBN").module.state_dict()
    assert loaded.keys() == state_dict.keys()
    assert all(torch.equal(tensor, state_dict[key]) for key, tensor in loaded.items())


def test_lazy_modules_materialized_by_a_state_dict_are_inspected(tmp_path: Path) -> None:
    # PyTorch leaves a LazyBatchNorm's num_features at 0 when load_state_dict materializes it.
    trained = models.LazyConvBN()
    trained(models.make_input((2, 3, 6, 6)))
    path = save(models.randomize_norm_state(trained).state_dict(), tmp_path / "lazy.pt")
    module = load_model(path, arch="tests.models:LazyConvBN").module.eval()
    report = inspect_model(module, [models.make_input((4, 3, 6, 6), mean=2.0)])
    assert [layer.num_channels for layer in report.layers] == [len(layer.batch_mean or ()) for layer in report.layers]
    assert all(layer.num_channels for layer in report.layers)
