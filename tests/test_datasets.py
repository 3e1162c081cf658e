"""Datasets streamed from a directory: exact population statistics, flat memory, progress on stderr."""

from __future__ import annotations

import io
import json
import resource
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bn_inspect.analyses.inspection import inspect_model
from bn_inspect.cli.main import run
from tests import models
from tests.helpers import SAMPLES
from tests.test_inspection import assert_matches, layer

TORCHSCRIPT = str(SAMPLES / "signal_cnn1d" / "torchscript.pt")


def write_shards(folder: Path, sizes: list[int], *, mean: float = 0.0) -> np.ndarray:
    folder.mkdir(exist_ok=True)
    shards = [models.make_input((n, 1, 64), mean=mean, std=2.0, seed=i).numpy() for i, n in enumerate(sizes)]
    for index, shard in enumerate(shards):
        if index % 2:
            np.save(folder / f"shard_{index:03d}.npy", shard)
        else:
            torch.save(torch.from_numpy(shard), folder / f"shard_{index:03d}.pt")
    (folder / "README.txt").write_text("ignored: not a tensor file")
    return np.concatenate(shards)


def test_directory_of_shards_gives_population_statistics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    everything = write_shards(tmp_path / "data", [5, 1, 17, 3, 9])
    code = run(["inspect", TORCHSCRIPT, "--input", str(tmp_path / "data"), "--batch-size", "4", "--format", "json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    document = json.loads(captured.out)
    assert document["input"]["num_samples"] == 35
    assert document["input"]["num_batches"] == 2 + 1 + 5 + 1 + 3
    first = document["layers"][0]
    from sample_models.architectures import SignalCNN1d

    model = SignalCNN1d().eval()
    model.load_state_dict(torch.load(SAMPLES / "signal_cnn1d" / "state_dict.pt", weights_only=True))
    with torch.no_grad():
        activation = model.features[0](torch.from_numpy(everything)).double().numpy()
    values = np.moveaxis(activation, 1, 0).reshape(activation.shape[1], -1)
    np.testing.assert_allclose(first["batch_mean"], values.mean(1), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(first["batch_var"], values.var(1), rtol=1e-5)
    assert first["values_per_channel"] == 35 * 64


def test_batches_cap_spans_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_shards(tmp_path / "data", [3, 3, 3])
    assert (
        run(
            [
                "inspect",
                TORCHSCRIPT,
                "--input",
                str(tmp_path / "data"),
                "--batch-size",
                "2",
                "--batches",
                "3",
                "--format",
                "json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["input"]["num_samples"] == 2 + 1 + 2


def test_empty_directory_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert run(["inspect", TORCHSCRIPT, "--input", str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.startswith(f"Error: input directory {tmp_path / 'empty'} holds no .pt, .pth")


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=8),
    mean=st.sampled_from([0.0, 1e4, -3e3]),
    seed=st.integers(min_value=0, max_value=1000),
)
def test_merged_statistics_equal_population_statistics(sizes: list[int], mean: float, seed: int) -> None:
    model = models.randomize_norm_state(models.BN1dSequence()).eval()
    batches = [models.make_input((n, 6, 3), mean=mean, std=0.01, seed=seed + i) for i, n in enumerate(sizes)]
    report = inspect_model(model, batches)
    assert_matches(layer(report, "bn"), torch.cat(batches))


def test_memory_stays_flat_over_many_batches() -> None:
    model = models.randomize_norm_state(models.ConvBN2d()).eval()
    x = models.make_input((8, 3, 16, 16))
    inspect_model(model, (x for _ in range(20)))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = inspect_model(model, (x for _ in range(1000)))
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert report.input.num_batches == 1000
    # Activations are 8 KiB per layer per batch: keeping them would grow the peak by over 50 MiB.
    assert grown_kib < 20 * 1024


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_and_quiet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_shards(tmp_path / "data", [40])
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    args = ["inspect", TORCHSCRIPT, "--input", str(tmp_path / "data"), "--batch-size", "4", "--format", "json"]
    assert run(args) == 0
    # The shard is a .pt file, whose sample count is unknown until it is read: no total shown.
    assert "batches" in terminal.getvalue() and "10/" in terminal.getvalue()
    quiet = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    assert run([*args, "--quiet"]) == 0
    assert quiet.getvalue() == ""
    capsys.readouterr()
