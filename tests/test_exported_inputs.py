"""torch.export archives meet real data: recalibration written back as .pt2, static batch sizes, shape errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from bn_inspect.data.batch import Batch, regroup_batches
from bn_inspect.data.readers import read_input
from bn_inspect.model.provenance import read_stored_record
from sample_models.architectures import DigitsCNN
from tests.helpers import assert_one_error_line, invoke

ARCH = "sample_models.architectures:DigitsCNN"


def digits_archive(path: Path) -> Path:
    """DigitsCNN exported in eval mode with a static batch of 2, as the newcomer issue did."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(DigitsCNN().eval(), (torch.randn(2, 1, 8, 8),))
        torch.export.save(program, str(path))
    return path


def shifted_digits(path: Path, num_samples: int = 37) -> Path:
    # Far from the fresh model's running statistics (0 and 1), so recalibration has something to change.
    torch.save(torch.rand(num_samples, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 3 + 1, path)
    return path


def load_program(path: Path) -> torch.export.ExportedProgram:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.load(str(path))


def test_recalibrate_writes_an_exported_archive_with_the_new_statistics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive, data = digits_archive(tmp_path / "d.pt2"), shifted_digits(tmp_path / "x.pt")
    output = tmp_path / "r.pt2"
    # The default method, sequential, is the one an eval-mode program can run.
    result = invoke(capsys, ["recalibrate", archive, "--input", data, "--output", output])
    assert result.code == 0, result.err
    before, after = load_program(archive).state_dict, load_program(output).state_dict
    for name in ("features.1", "features.4", "features.8"):
        assert not torch.equal(before[f"{name}.running_mean"], after[f"{name}.running_mean"])
        assert not torch.equal(before[f"{name}.running_var"], after[f"{name}.running_var"])
        assert int(after[f"{name}.num_batches_tracked"]) == 18  # 36 samples in batches of 2
    assert torch.equal(before["features.0.weight"], after["features.0.weight"])
    stored = read_stored_record(output).record  # an extra file of the archive, which torch.export.load ignores
    assert stored is not None and stored.method == "sequential" and stored.data.num_samples == 36
    # The saved program normalizes with what it was given: its layer inputs now fit their running statistics.
    report = invoke(capsys, ["inspect", output, "--input", data, "--format", "json"])
    layers = json.loads(report.out)["layers"]
    assert [entry["name"] for entry in layers] == ["features.1", "features.4", "features.8"]
    assert all(max(abs(z) for z in entry["mean_shift_z"]) < 1e-4 for entry in layers)


def test_recalibrate_refuses_precise_on_an_eval_mode_export_and_names_sequential(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive, data = digits_archive(tmp_path / "d.pt2"), shifted_digits(tmp_path / "x.pt")
    result = invoke(
        capsys, ["recalibrate", archive, "--input", data, "--output", tmp_path / "r.pt2", "--method", "precise"]
    )
    assert result.code == 2
    assert_one_error_line(result, "exported in eval mode", "Use --method sequential")
    assert not (tmp_path / "r.pt2").exists()


def test_static_export_runs_data_regrouped_to_its_batch_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive, data = digits_archive(tmp_path / "d.pt2"), shifted_digits(tmp_path / "x.pt")
    result = invoke(capsys, ["inspect", archive, "--input", data, "--batch-size", "16", "--format", "json"])
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["input"]["num_samples"] == 36
    assert report["input"]["num_batches"] == 18
    assert "exported for batches of exactly 2 samples" in result.err
    assert "1 sample(s) at the end did not fill a batch of 2 and were left out" in result.err


def test_static_export_names_the_shape_it_takes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    archive = digits_archive(tmp_path / "d.pt2")
    np.save(tmp_path / "cl.npy", np.random.default_rng(0).random((6, 8, 8, 1), dtype=np.float32))
    result = invoke(capsys, ["inspect", archive, "--input", tmp_path / "cl.npy", "--batch-size", "2", "--quiet"])
    assert result.code == 2
    assert_one_error_line(result, "takes input of shape (2, 1, 8, 8)", "(2, 8, 8, 1)", "x.permute(0, 3, 1, 2)")


def test_regroup_batches_keeps_every_sample_in_order_and_counts_the_rest() -> None:
    samples = torch.arange(23.0).reshape(23, 1)
    batches = [Batch((samples[:5],)), Batch((samples[5:6],)), Batch((samples[6:23],))]
    left: list[int] = []
    regrouped = list(regroup_batches(batches, 4, left.append))
    assert [b.num_samples for b in regrouped] == [4] * 5
    assert torch.equal(torch.cat([b.args[0] for b in regrouped]), samples[:20])
    assert left == [3]


def test_images_and_labels_run_as_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save((torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))), tmp_path / "xy.pt")
    assert len(read_input(tmp_path / "xy.pt").args) == 1
    result = invoke(capsys, ["inspect", "--arch", ARCH, "--input", tmp_path / "xy.pt", "--format", "json"])
    assert result.code == 0, result.err
    assert "the rest are taken for labels and left out" in result.err


@pytest.mark.parametrize(
    ("shape_option", "shown", "fix"),
    [
        (["--shape", "1,8,8"], "(1, 8, 8)", "x.unsqueeze(1)"),
        (["--shape", "2,8,8,1"], "(2, 8, 8, 1)", "x.permute(0, 3, 1, 2)"),
    ],
)
def test_shape_errors_say_what_the_first_layer_takes(
    capsys: pytest.CaptureFixture[str], shape_option: list[str], shown: str, fix: str
) -> None:
    result = invoke(capsys, ["inspect", "--arch", ARCH, *shape_option])
    assert result.code == 2
    assert_one_error_line(result, f"the data has shape {shown}", "Conv2d with in_channels=1", "(N, 1, *, *)", fix)


def test_recalibrate_refuses_a_train_mode_export_and_says_what_to_do(tmp_path: Path) -> None:
    from bn_inspect.analyses.recalibration import recalibrate
    from bn_inspect.errors import ExportModeError
    from bn_inspect.model.loading import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(DigitsCNN().train(), (torch.randn(2, 1, 8, 8),))
        torch.export.save(program, str(tmp_path / "t.pt2"))
    module = load_model(tmp_path / "t.pt2").module
    with pytest.raises(ExportModeError, match=r"exported in train mode.*Export the model again after model\.eval\(\)"):
        recalibrate(module, [torch.rand(2, 1, 8, 8)], method="sequential")


def test_export_without_input_runs_the_shape_its_specification_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = invoke(capsys, ["inspect", digits_archive(tmp_path / "d.pt2"), "--format", "json"])
    assert result.code == 0, result.err
    assert json.loads(result.out)["input"]["shape"] == [2, 1, 8, 8]
    assert "input specification says so" in result.err
