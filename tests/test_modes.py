"""compare_modes: per-layer eval/train differences against separate float64 forwards, and no side effects."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bn_inspect.analyses.modes import compare_modes
from bn_inspect.analyses.recalibration import recalibrate
from bn_inspect.errors import InputError, ModeComparisonError
from bn_inspect.report.comparisons import ModeComparison
from bn_inspect.text import Untrusted
from tests import models
from tests.conftest import state_fingerprint

NAMES = ("bn1", "bn2", "bn3")


class Net(nn.Module):
    """Conv -> BN -> ReLU, three times, with dropout before a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.conv3 = nn.Conv2d(6, 4, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.9)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(self.drop(x.mean((2, 3))))


def batches_of(size: int, count: int = 3) -> list[torch.Tensor]:
    return list((models.make_input((size * count, 3, 6, 6), std=1.0) * 2 + 1).split(size))


def calibrated_net() -> Net:
    """Running statistics recalibrated (sequential) on the very data the tests compare on."""
    torch.manual_seed(0)
    model = Net().eval()
    recalibrate(model, batches_of(32), method="sequential")
    return model


def reference_gaps(model: Net, batches: list[torch.Tensor]) -> dict[str, tuple[float, float, float]]:
    """(input, output, own) relative differences per layer from separate eval and train forwards, float64."""
    sums = {name: np.zeros(5) for name in NAMES}
    for x in batches:
        seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in NAMES}
        for training in (False, True):
            work = copy.deepcopy(model).eval()
            handles = []
            for name in NAMES:
                module = getattr(work, name)
                module.training = training
                handles.append(
                    module.register_forward_hook(
                        lambda _m, args, out, name=name, seen=seen: seen[name].append((args[0].double(), out.double()))
                    )
                )
            with torch.no_grad():
                work(x)
        for name in NAMES:
            (x_e, y_e), (x_t, y_t) = seen[name]
            module = getattr(model, name)
            # The layer alone in train mode on the eval input: batch statistics, biased variance.
            with torch.no_grad():
                y_own = F.batch_norm(
                    x_e, None, None, module.weight.double(), module.bias.double(), training=True, eps=module.eps
                )
            sums[name] += [
                float((x_t - x_e).square().sum()),
                float(x_e.square().sum()),
                float((y_t - y_e).square().sum()),
                float(y_e.square().sum()),
                float((y_own - y_e).square().sum()),
            ]
    return {name: (math.sqrt(s[0] / s[1]), math.sqrt(s[2] / s[3]), math.sqrt(s[4] / s[3])) for name, s in sums.items()}


def unchanged(model: nn.Module, batches: list[torch.Tensor], **kwargs: float) -> ModeComparison:
    before = state_fingerprint(model)
    comparison = compare_modes(model, batches, **kwargs)
    assert state_fingerprint(model) == before
    return comparison


def test_stale_statistics_open_the_gap_at_the_right_layer() -> None:
    model = calibrated_net()
    with torch.no_grad():  # bn2's statistics from some other data
        model.bn2.running_mean.add_(torch.linspace(-2, 2, 6))
        model.bn2.running_var.mul_(torch.linspace(0.2, 5, 6))
    batches = batches_of(32)
    comparison = unchanged(model, batches)
    assert [entry.label.raw for entry in comparison.layers] == list(NAMES)
    assert comparison.gap_opens_at == Untrusted("bn2")
    reference = reference_gaps(model, batches)
    for entry in comparison.layers:
        expected = reference[entry.name.raw]
        assert (entry.input_rel_diff, entry.output_rel_diff, entry.own_rel_diff) == pytest.approx(expected, rel=1e-4)
    bn1, bn2, _ = comparison.layers
    assert bn1.input_rel_diff == 0.0 and bn1.output_rel_diff < 0.05
    assert bn2.input_rel_diff < 0.05 < bn2.own_rel_diff
    assert bn2.max_abs_shift_z is not None and bn2.max_abs_shift_z > 1
    assert bn1.max_abs_shift_z is not None and bn1.max_abs_shift_z < 1e-5
    assert comparison.output is not None and comparison.output.rel_diff > 0.05
    assert comparison.num_batches == 3 and comparison.num_samples == 96


def test_recalibrated_model_has_a_small_gap_at_every_layer() -> None:
    model = calibrated_net()
    comparison = unchanged(model, batches_of(32))
    assert comparison.gap_opens_at is None
    for entry in comparison.layers:
        assert entry.output_rel_diff < 0.05 and entry.own_rel_diff < 0.05
        assert entry.max_abs_shift_z is not None and entry.max_abs_shift_z < 1e-5
        assert entry.worst_var_ratio == pytest.approx(1.0, abs=0.01)
    # Dropout(0.9) before the classifier would differ by far more if it ran in the train pass.
    assert comparison.output is not None and comparison.output.rel_diff < 0.05


def test_randomized_statistics_are_caught_at_the_first_layer() -> None:
    torch.manual_seed(0)
    model = models.randomize_norm_state(Net()).eval()
    comparison = unchanged(model, batches_of(8))
    assert comparison.gap_opens_at == Untrusted("bn1")
    reference = reference_gaps(model, batches_of(8))
    assert comparison.layer("bn3").output_rel_diff == pytest.approx(reference["bn3"][1], rel=1e-4)


def test_argmax_change_fraction_is_exact() -> None:
    # Logits = BatchNorm1d(2) of the input: eval subtracts 0 and divides by ~1 (running stats),
    # train subtracts the batch mean; a sample's argmax flips when that reorders its two logits.
    model = nn.Sequential(nn.BatchNorm1d(2)).eval()
    x = torch.tensor([[5.0, 0.0], [0.0, 5.0], [3.0, 2.0], [2.5, 2.0], [1.0, 4.0], [6.0, 1.0], [2.0, 2.1], [4.0, 3.5]])
    eval_logits = x.double()
    train_logits = (eval_logits - eval_logits.mean(0)) / (eval_logits.var(0, correction=0) + 1e-5).sqrt()
    expected = float((eval_logits.argmax(1) != train_logits.argmax(1)).double().mean())
    assert 0 < expected < 1
    comparison = unchanged(model, [x[:4], x[4:]])
    # Per batch of 4, the train pass uses that batch's own statistics.
    per_batch = []
    for half in (x[:4].double(), x[4:].double()):
        train = (half - half.mean(0)) / (half.var(0, correction=0) + 1e-5).sqrt()
        per_batch.append((half.argmax(1) != train.argmax(1)).double())
    assert comparison.output is not None
    assert comparison.output.argmax_change_fraction == float(torch.cat(per_batch).mean())
    assert comparison.output.num_samples == 8


def test_torchscript_matches_eager() -> None:
    model = calibrated_net()
    with torch.no_grad():
        model.bn2.running_var.mul_(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        script = torch.jit.script(model)
    batches = batches_of(32)
    eager, scripted = unchanged(model, batches), unchanged(script, batches)
    assert scripted.gap_opens_at == eager.gap_opens_at == Untrusted("bn2")
    for a, b in zip(eager.layers, scripted.layers, strict=True):
        assert a.label == b.label
        assert (a.input_rel_diff, a.output_rel_diff, a.own_rel_diff) == pytest.approx(
            (b.input_rel_diff, b.output_rel_diff, b.own_rel_diff), rel=1e-5, abs=1e-9
        )
    assert eager.output is not None and scripted.output is not None
    assert eager.output.rel_diff == pytest.approx(scripted.output.rel_diff, rel=1e-5)


def test_other_norm_layers_have_no_gap_of_their_own() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.LayerNorm(6), nn.GroupNorm(2, 6)).eval()
    comparison = unchanged(model, [models.make_input((16, 4))])
    assert [entry.label.raw for entry in comparison.layers] == ["1", "2", "3"]
    assert comparison.layers[0].own_rel_diff > 0.05
    for entry in comparison.layers[1:]:
        assert entry.own_rel_diff == 0.0 and entry.max_abs_shift_z is None
    assert comparison.gap_opens_at == Untrusted("1")


def test_a_batch_folded_with_time_is_split_in_its_halves() -> None:
    class PerStep(nn.Module):
        """BatchNorm1d over (N * T, C): time steps folded into the batch, as video models do."""

        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n, t, c = x.shape
            return self.bn(x.reshape(n * t, c)).reshape(n, t, c)

    model = models.randomize_norm_state(PerStep()).eval()
    x = models.make_input((6, 3, 5)).transpose(1, 2).contiguous()  # (N, T, C)
    comparison = unchanged(model, [x])
    bn = model.bn
    flat = x.reshape(-1, 3).double()
    y_eval = (flat - bn.running_mean.double()) / (bn.running_var.double() + bn.eps).sqrt()
    y_train = (flat - flat.mean(0)) / (flat.var(0, correction=0) + bn.eps).sqrt()
    weight, bias = bn.weight.double().detach(), bn.bias.double().detach()
    y_eval, y_train = y_eval * weight + bias, y_train * weight + bias
    expected = float((y_train - y_eval).norm() / y_eval.norm())
    assert comparison.layer("bn").output_rel_diff == pytest.approx(expected, rel=1e-5)
    assert comparison.layer("bn").values_per_channel == 6 * 5


def test_a_model_that_mixes_samples_is_refused() -> None:
    class CentresTheBatch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(x)
            return y - y.mean(0)

    model = models.randomize_norm_state(CentresTheBatch()).eval()
    before = state_fingerprint(model)
    with pytest.raises(ModeComparisonError, match="mixes the samples of a batch"):
        compare_modes(model, [models.make_input((8, 3))])
    assert state_fingerprint(model) == before


def test_inputs_without_a_batch_dim_are_refused() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return self.bn(x) * scale

    with pytest.raises(InputError, match=r"shape \(\) has no batch of 4 in dim 0"):
        compare_modes(TwoInputs().eval(), [{"x": torch.randn(4, 3), "scale": torch.tensor(2.0)}])
