"""Check that the shipped sample models are trained and agree across formats."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from sample_models.architectures import CancerMLP, DigitsCNN, SignalCNN1d, VolumeCNN3d
from tests.helpers import SAMPLES


@dataclass(frozen=True)
class SampleModel:
    folder: str
    architecture: type[nn.Module]
    inputs_file: str
    min_accuracy: float


# Thresholds sit a few points below what train.py reaches, so they catch
# broken weights without tripping on harmless retraining noise.
SAMPLE_MODELS = [
    SampleModel("digits_cnn", DigitsCNN, "test_images.npy", 0.96),
    SampleModel("cancer_mlp", CancerMLP, "test.csv", 0.92),
    SampleModel("signal_cnn1d", SignalCNN1d, "test_signals.npy", 0.95),
    SampleModel("volume_cnn3d", VolumeCNN3d, "test_volumes.npy", 0.95),
]


def load_held_out(sample: SampleModel) -> tuple[torch.Tensor, np.ndarray]:
    folder = SAMPLES / sample.folder
    if sample.inputs_file.endswith(".csv"):
        table = pd.read_csv(folder / sample.inputs_file)
        features = table.drop(columns="label").to_numpy(dtype=np.float32)
        return torch.from_numpy(features), table["label"].to_numpy()
    inputs = np.load(folder / sample.inputs_file)
    return torch.from_numpy(inputs), np.load(folder / "test_labels.npy")


def load_state_dict_model(sample: SampleModel) -> nn.Module:
    model = sample.architecture()
    state = torch.load(SAMPLES / sample.folder / "state_dict.pt", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, inputs: torch.Tensor) -> np.ndarray:
    return model(inputs).argmax(dim=1).numpy()


@pytest.fixture(params=SAMPLE_MODELS, ids=[sample.folder for sample in SAMPLE_MODELS])
def sample(request: pytest.FixtureRequest) -> SampleModel:
    return request.param


def test_held_out_accuracy(sample: SampleModel) -> None:
    inputs, labels = load_held_out(sample)
    accuracy = float((predict(load_state_dict_model(sample), inputs) == labels).mean())
    assert accuracy >= sample.min_accuracy


def test_inputs_are_float32(sample: SampleModel) -> None:
    inputs, labels = load_held_out(sample)
    assert inputs.dtype == torch.float32
    assert len(inputs) == len(labels)


def test_torchscript_matches_state_dict(sample: SampleModel) -> None:
    inputs, _ = load_held_out(sample)
    scripted = torch.jit.load(SAMPLES / sample.folder / "torchscript.pt")
    assert not scripted.training
    expected = predict(load_state_dict_model(sample), inputs)
    np.testing.assert_array_equal(predict(scripted, inputs), expected)


def test_pickle_matches_state_dict(sample: SampleModel) -> None:
    inputs, _ = load_held_out(sample)
    pickled = torch.load(SAMPLES / sample.folder / "pickle.pt", weights_only=False)
    assert type(pickled) is sample.architecture
    assert not pickled.training
    expected = predict(load_state_dict_model(sample), inputs)
    np.testing.assert_array_equal(predict(pickled, inputs), expected)


def test_batchnorm_statistics_were_trained(sample: SampleModel) -> None:
    model = load_state_dict_model(sample)
    batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert batchnorms
    for bn in batchnorms:
        assert bn.running_mean is not None
        assert bn.running_var is not None
        assert bn.num_batches_tracked is not None
        assert bn.num_batches_tracked.item() > 0
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))


def test_cancer_input_batchnorm_sees_raw_feature_scale() -> None:
    model = load_state_dict_model(next(s for s in SAMPLE_MODELS if s.folder == "cancer_mlp"))
    columns = list(pd.read_csv(SAMPLES / "cancer_mlp" / "test.csv", nrows=0).columns)
    input_bn = model.net[0]
    assert isinstance(input_bn, nn.BatchNorm1d)
    mean_area = input_bn.running_mean[columns.index("mean_area")].item()
    mean_radius = input_bn.running_mean[columns.index("mean_radius")].item()
    assert 500 < mean_area < 800
    assert 12 < mean_radius < 16
