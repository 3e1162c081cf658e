"""State dicts as saved (#28): half precision kept through --arch, bare state_dicts checked without
--arch, and BN114 (few batches tracked)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bn_inspect.analyses.checking import check_model
from bn_inspect.report.rules import FEW_BATCHES
from tests import models
from tests.helpers import DIGITS, assert_one_error_line, invoke

ARCH = ["--arch", "tests.models:ConvBN2d"]


def _findings(capsys: pytest.CaptureFixture[str], argv: list[str | Path]) -> tuple[int, dict[str, object]]:
    result = invoke(capsys, ["check", *argv, "--no-data", "--format", "json"])
    return result.code, json.loads(result.out)


def _code_layers(document: dict[str, object]) -> set[tuple[str, str | None]]:
    return {(f["code"], f["layer"]) for f in document["findings"]}  # type: ignore[attr-defined, index]


@pytest.fixture
def half_files(tmp_path: Path) -> tuple[Path, Path]:
    """The same half-precision ConvBN2d as a state_dict and as a pickle."""
    model = models.randomize_norm_state(models.ConvBN2d()).eval().half()
    state_dict, pickled = tmp_path / "half_state_dict.pt", tmp_path / "half_pickle.pt"
    torch.save(model.state_dict(), state_dict)
    torch.save(model, pickled)
    return state_dict, pickled


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_state_dict_keeps_its_dtype_through_arch(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, dtype: torch.dtype
) -> None:
    model = models.randomize_norm_state(models.ConvBN2d()).eval().to(dtype)
    state_dict, pickled = tmp_path / "state_dict.pt", tmp_path / "pickle.pt"
    torch.save(model.state_dict(), state_dict)
    torch.save(model, pickled)
    _, from_arch = _findings(capsys, [state_dict, *ARCH])
    _, from_pickle = _findings(capsys, [pickled, "--trust-pickle"])
    assert {("BN109", "bn1"), ("BN109", "bn2")} <= _code_layers(from_arch)
    assert {c for c in _code_layers(from_arch) if c[0] == "BN109"} == {
        c for c in _code_layers(from_pickle) if c[0] == "BN109"
    }
    listed = json.loads(invoke(capsys, ["layers", state_dict, *ARCH, "--format", "json"]).out)
    assert {layer["buffer_dtype"] for layer in listed["layers"]} == {str(dtype).removeprefix("torch.")}


def test_a_half_state_dict_runs_in_half_as_the_pickle_does(
    capsys: pytest.CaptureFixture[str], half_files: tuple[Path, Path]
) -> None:
    state_dict, pickled = half_files
    argv = ["--shape", "4,3,8,8", "--format", "json"]
    from_arch = json.loads(invoke(capsys, ["inspect", state_dict, *ARCH, *argv]).out)
    from_pickle = json.loads(invoke(capsys, ["inspect", pickled, "--trust-pickle", *argv]).out)
    assert from_arch["input"]["dtype"] == from_pickle["input"]["dtype"] == "float16"
    for ours, theirs in zip(from_arch["layers"], from_pickle["layers"], strict=True):
        assert ours["batch_mean"] == theirs["batch_mean"] and ours["batch_var"] == theirs["batch_var"]


def test_a_float32_arch_keeps_float32_tensors_of_a_mixed_state_dict(tmp_path: Path) -> None:
    # Only the tensors saved in another dtype change: BatchNorm kept in float32 beside a half conv stays so.
    from bn_inspect.model.loading import load_model

    model = models.randomize_norm_state(models.ConvBN2d()).eval()
    model.conv1.half()
    path = tmp_path / "mixed.pt"
    torch.save(model.state_dict(), path)
    loaded = load_model(path, arch="tests.models:ConvBN2d").module
    assert loaded.conv1.weight.dtype == torch.float16 and loaded.bn1.running_var.dtype == torch.float32
    assert torch.equal(loaded.conv1.weight, model.conv1.weight)


def _broken_state_dict(tmp_path: Path, name: str, change: object) -> Path:
    model = models.randomize_norm_state(models.ConvBN2d()).eval()
    with torch.no_grad():
        change(model)  # type: ignore[operator]
    path = tmp_path / f"{name}.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize(
    ("code", "change"),
    [
        ("BN101", lambda m: m.bn1.running_mean.__setitem__(1, float("nan"))),
        ("BN102", lambda m: m.bn1.running_var.__setitem__(2, -1.0)),
        # Below eps/10 with PyTorch's default eps 1e-5, which a state_dict does not store.
        ("BN103", lambda m: m.bn1.running_var.__setitem__(2, 9e-7)),
        ("BN104", lambda m: m.bn2.reset_running_stats()),
        ("BN109", lambda m: m.half()),
        ("BN114", lambda m: m.bn1.num_batches_tracked.fill_(3)),
    ],
)
def test_check_no_data_runs_the_buffer_rules_on_a_bare_state_dict(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, code: str, change: object
) -> None:
    path = _broken_state_dict(tmp_path, code, change)
    exit_code, document = _findings(capsys, [path])
    assert code in {c for c, _ in _code_layers(document)}
    assert exit_code == (1 if code in ("BN101", "BN102") else 0)
    (note,) = document["notes"]  # type: ignore[misc]
    assert note.startswith("a state_dict without --arch") and "BN107, BN108" in note
    # With --arch the same file gives the same finding.
    assert code in {c for c, _ in _code_layers(_findings(capsys, [path, *ARCH])[1])}


def test_a_healthy_bare_state_dict_passes_and_data_still_needs_arch(capsys: pytest.CaptureFixture[str]) -> None:
    exit_code, document = _findings(capsys, [DIGITS / "state_dict.pt"])
    assert exit_code == 0 and document["findings"] == [] and len(document["layers"]) == 3  # type: ignore[arg-type]
    result = invoke(capsys, ["check", DIGITS / "state_dict.pt", "--input", DIGITS / "test_images.npy"])
    assert result.code == 2
    assert_one_error_line(
        result, "holds only weights (state_dict)", "Pass --arch", "`bn-inspect check FILE --no-data` checks its stored"
    )


def test_a_bare_state_dict_without_batchnorm_keys_says_so(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "linear.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    result = invoke(capsys, ["check", path, "--no-data"])
    assert result.code == 2
    assert_one_error_line(result, "no normalization layer")


def _bn114(model: torch.nn.Module) -> list[str]:
    return [f.message for f in check_model(model).findings if f.code == "BN114"]


@pytest.mark.parametrize("tracked", [1, 3, FEW_BATCHES])
def test_few_batches_tracked_fires_with_the_initial_values_weight(tracked: int) -> None:
    model = models.randomize_norm_state(models.BN1dFeatures()).eval()
    model.bn.num_batches_tracked.fill_(tracked)
    model.bn.momentum = 0.2
    (message,) = _bn114(model)
    # (1 - momentum)**n: the weight PyTorch's update leaves on the initial running_mean 0 and running_var 1.
    weight = 0.8**tracked
    assert f"only {tracked} batch" in message and f"{weight:.0%} of them" in message


@pytest.mark.parametrize("tracked", [0, FEW_BATCHES + 1, 10_000])
def test_few_batches_tracked_is_silent_outside_its_range(tracked: int) -> None:
    model = models.randomize_norm_state(models.BN1dFeatures()).eval()
    model.bn.num_batches_tracked.fill_(tracked)
    assert _bn114(model) == []


def test_a_cumulative_average_keeps_nothing_of_the_initial_values() -> None:
    model = models.randomize_norm_state(models.BN1dFeatures()).eval()
    model.bn.num_batches_tracked.fill_(3)
    model.bn.momentum = None
    assert _bn114(model) == []


def test_a_model_recalibrated_by_bn_inspect_is_exempt(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # Its num_batches_tracked counts the 3 recalibration batches; the record in the file says so.
    output = tmp_path / "recalibrated.pt"
    argv = ["recalibrate", DIGITS / "torchscript.pt", "--input", DIGITS / "test_images.npy", "--batches", "3"]
    assert invoke(capsys, [*argv, "--output", output]).code == 0
    assert "BN114" not in {c for c, _ in _code_layers(_findings(capsys, [output])[1])}
    stripped = tmp_path / "stripped.pt"
    torch.jit.save(torch.jit.load(str(output)), str(stripped))
    assert "BN114" in {c for c, _ in _code_layers(_findings(capsys, [stripped])[1])}


def test_a_bare_safetensors_file_and_checkpoint_dict_are_checked_alike(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    model = models.randomize_norm_state(models.ConvBN2d()).eval()
    with torch.no_grad():
        model.bn2.running_var[1] = -1.0
    state_dict = {key: tensor.contiguous() for key, tensor in model.state_dict().items()}
    save_file(state_dict, str(tmp_path / "model.safetensors"))
    torch.save({"epoch": 3, "state_dict": state_dict}, tmp_path / "last.ckpt")
    for name, format in (("model.safetensors", "safetensors"), ("last.ckpt", "checkpoint")):
        exit_code, document = _findings(capsys, [tmp_path / name])
        assert exit_code == 1 and document["model"]["format"] == format  # type: ignore[index]
        assert ("BN102", "bn2") in _code_layers(document)


def test_a_bare_state_dict_is_compared_with_a_baseline(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    golden = tmp_path / "golden.json"
    arch = ["--arch", "sample_models.architectures:DigitsCNN"]
    written = invoke(
        capsys,
        ["check", DIGITS / "state_dict.pt", *arch, "--input", DIGITS / "test_images.npy", "--write-baseline", golden],
    )
    assert written.code == 0, written.err
    state_dict = torch.load(DIGITS / "state_dict.pt")
    key = next(k for k in state_dict if k.endswith("running_mean"))
    state_dict[key] += 10.0
    drifted = tmp_path / "drifted.pt"
    torch.save(state_dict, drifted)
    exit_code, document = _findings(capsys, [drifted, "--baseline", golden])
    assert exit_code == 1 and ("BN301", key.rpartition(".")[0]) in _code_layers(document)
    assert _findings(capsys, [DIGITS / "state_dict.pt", "--baseline", golden])[0] == 0


def _features(seed: int, rows: int = 400) -> torch.Tensor:
    # Large means and unequal spreads, so statistics left near 0 and 1 could not pass for them.
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 5, generator=generator) * torch.tensor([0.5, 2.0, 1.0, 3.0, 0.2]) + 4.0


def test_data_overrules_few_batches_where_the_statistics_fit_it() -> None:
    # update_bn's way: a cumulative average over 5 batches, then momentum 0.1 restored, so the
    # stored state looks like 5 batches of momentum 0.1, though the statistics are exact.
    model = models.BN1dFeatures().train()
    model.bn.momentum = None
    for batch in _features(0).split(80):
        model(batch)
    model.bn.momentum = 0.1
    model.eval()
    assert int(model.bn.num_batches_tracked) == 5
    assert _bn114(model) != []
    checked = check_model(model, _features(1).split(100))
    assert [f.code for f in checked.findings if f.code in ("BN114", "BN201")] == []
    assert any("BN114 left out for 1 layer(s)" in note for note in checked.notes)


def test_data_keeps_few_batches_where_the_initial_values_still_show() -> None:
    model = models.BN1dFeatures().train()
    for batch in _features(0).split(80)[:3]:
        model(batch)
    model.eval()
    codes = {f.code for f in check_model(model, _features(1).split(100)).findings}
    assert {"BN114", "BN201"} <= codes


def test_statistics_that_never_moved_in_tracked_batches_are_bn104_without_data(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # A layer trained with momentum 0: 48 batches tracked, its statistics still 0 and 1 exactly.
    model = models.ConvBN2d().train()
    model.bn1.momentum = 0.0
    for batch in torch.randn(48, 4, 3, 8, 8).unbind():
        model(batch)
    path = tmp_path / "momentum0.pt"
    torch.save(model.eval().state_dict(), path)
    _, document = _findings(capsys, [path])
    assert ("BN104", "bn1") in _code_layers(document)
    assert ("BN104", "bn2") not in _code_layers(document)
    (message,) = [f["message"] for f in document["findings"] if f["code"] == "BN104"]  # type: ignore[attr-defined, index]
    assert "num_batches_tracked is 48" in message


def _messages(capsys: pytest.CaptureFixture[str], tmp_path: Path, **buffers: torch.Tensor) -> dict[str, str]:
    """check --no-data of the digits state_dict with ``buffers`` (features.1's) replaced: each code's message."""
    state = torch.load(DIGITS / "state_dict.pt", weights_only=True)
    for name, value in buffers.items():
        state[f"features.1.{name}"] = value
    path = tmp_path / "state_dict.pt"
    torch.save(state, path)
    _, document = _findings(capsys, [path])
    return {f["code"]: f["message"] for f in document["findings"]}  # type: ignore[attr-defined, index]


def test_bfloat16_is_not_said_to_overflow_at_float16s_maximum(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Fails before the fix: BN109 said bfloat16 "overflows past 65,504", float16's maximum."""
    state = torch.load(DIGITS / "state_dict.pt", weights_only=True)

    def first_layer_in(dtype: torch.dtype) -> dict[str, str]:
        layer = {
            k.removeprefix("features.1."): v.to(dtype)
            for k, v in state.items()
            if k.startswith("features.1.") and v.is_floating_point()
        }
        return _messages(capsys, tmp_path, **layer)

    bf16 = first_layer_in(torch.bfloat16)
    assert "65,504" not in bf16["BN109"] and "8-bit mantissa" in bf16["BN109"] and "0.4%" in bf16["BN109"]
    fp16 = first_layer_in(torch.float16)
    assert "overflows past 65,504" in fp16["BN109"]


def test_channel_lists_read_unambiguously(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Fails before the fix: "in channels 3" for one channel, and "channels 0, 1, ..., 7 and 8 more" read as channel 8."""
    var = torch.ones(16)
    var[3] = math.nan
    var[0] = -1.0
    one = _messages(capsys, tmp_path, running_var=var)
    assert "running_var is NaN in channel 3; every output of that channel will be NaN" in one["BN101"]
    assert "zero or negative in channel 0;" in one["BN102"]
    tiny = _messages(capsys, tmp_path, running_var=torch.full((16,), 1e-8))
    assert "in channels 0–7 and 8 more (16 of 16), so" in tiny["BN103"]


def test_an_infinite_variance_collapses_the_output_to_the_bias_not_nan(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Fails before the fix: BN101 said every output would be NaN, while x / inf is 0 and the output is the bias."""
    var = torch.ones(16)
    var[2] = math.inf
    message = _messages(capsys, tmp_path, running_var=var)["BN101"]
    assert "running_var is infinite in channel 2" in message and "collapses to the bias" in message
    assert "NaN" not in message.split(". ")[0]
    # What the sentence claims: PyTorch's own output of that channel is its bias.
    bn = torch.nn.BatchNorm2d(16).eval()
    with torch.no_grad():
        bn.running_var.copy_(var)
        bn.bias.uniform_()
    out = bn(torch.randn(4, 16, 3, 3, dtype=torch.float32))
    assert torch.equal(out[:, 2], bn.bias[2].expand(4, 3, 3))
