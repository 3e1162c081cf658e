"""recalibrate and save_like: new running statistics against float64 references, and safe saving."""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bn_inspect.analyses.inspection import inspect_model
from bn_inspect.analyses.recalibration import recalibrate
from bn_inspect.errors import ForwardError, NoNormLayersError, OutputError
from bn_inspect.model.layers import iter_norm_layers
from bn_inspect.model.loading import load_model
from bn_inspect.model.modules import set_norm_layers_training
from bn_inspect.model.saving import save_like
from bn_inspect.report.comparisons import RecalibrationResult
from tests import models
from tests.conftest import state_fingerprint


class Chain(nn.Module):
    """Three conv -> BatchNorm -> ReLU stages, a BatchNorm on a side branch, and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6, momentum=None)
        self.side = nn.BatchNorm2d(6)
        self.conv3 = nn.Conv2d(6, 4, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(4)
        self.head = Counter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.bn1(self.conv1(x)))
        b = torch.relu(self.bn2(self.conv2(a)))
        return self.head(self.bn3(self.conv3(b + self.side(a))))


class Counter(nn.Module):
    """Identity that counts its calls, to see which forwards ran to the end."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x


class Branching(nn.Module):
    """Takes a branch on a value computed from bn1's output: data-dependent control flow."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm1d(4)
        self.bn2 = nn.BatchNorm1d(4)
        self.bn3 = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.bn1(x)
        b = self.bn2(a * 2 + 1) if bool(a.mean() > -100) else a
        return self.bn3(b - 3)


class InstanceThenBatch(nn.Module):
    """Conv -> InstanceNorm2d(track_running_stats) -> Conv -> BatchNorm2d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.inorm = nn.InstanceNorm2d(4, affine=True, track_running_stats=True)
        self.conv2 = nn.Conv2d(4, 5, 3)
        self.bn = nn.BatchNorm2d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv2(torch.relu(self.inorm(self.conv1(x)))))


class Mixed(nn.Module):
    """BatchNorm with and without running statistics, GroupNorm, a never-called BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.untracked = nn.BatchNorm1d(4, track_running_stats=False)
        self.gn = nn.GroupNorm(2, 4)
        self.unused = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gn(self.untracked(self.bn(x)))


def make_chain(seed: int = 0) -> Chain:
    torch.manual_seed(seed)
    return models.randomize_norm_state(Chain(), seed=seed).eval()  # type: ignore[return-value]


def scripted(model: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.script(model)  # type: ignore[no-any-return]


def layer_inputs(model: nn.Module, batches: list[torch.Tensor], *, training: bool) -> dict[str, list[torch.Tensor]]:
    """Every BatchNorm/InstanceNorm input per batch, float64, from a plain forward of a copy."""
    work = copy.deepcopy(model)
    norms = {name: m for name, m in work.named_modules() if isinstance(m, (nn.modules.batchnorm._NormBase))}
    found: dict[str, list[torch.Tensor]] = {name: [] for name in norms}
    handles = [
        m.register_forward_pre_hook(lambda _m, args, name=name: found[name].append(args[0].detach().double().clone()))
        for name, m in norms.items()
    ]
    work.eval()
    if training:
        for m in norms.values():
            m.training = True
    with torch.no_grad():
        for x in batches:
            work(x)
    for handle in handles:
        handle.remove()
    return found


def population(inputs: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Population mean and unbiased variance per channel (dim 1) of all values, float64."""
    values = torch.cat([x.transpose(0, 1).reshape(x.shape[1], -1) for x in inputs], dim=1)
    return values.mean(1).numpy(), values.var(1, correction=1).numpy()


def buffers(model: nn.Module, name: str) -> tuple[np.ndarray, np.ndarray, int]:
    module = dict(model.named_modules())[name]
    tracked = getattr(module, "num_batches_tracked", None)
    return (
        module.running_mean.double().numpy(),
        module.running_var.double().numpy(),
        int(tracked) if tracked is not None else -1,
    )


# --- precise -------------------------------------------------------------------------------


def test_precise_gives_population_statistics_of_train_mode_inputs_over_uneven_batches() -> None:
    model = make_chain()
    batches = models.uneven_batches()
    reference = layer_inputs(model, batches, training=True)
    old = {name: buffers(model, name) for name in ("bn1", "bn2", "side", "bn3")}
    result = recalibrate(model, batches, method="precise")
    assert [entry.name.raw for entry in result.layers] == ["bn1", "bn2", "side", "bn3"]
    assert result.num_batches == 5 and result.num_samples == 20
    assert result.num_passes == 2  # the pass and the verification
    for name in ("bn1", "bn2", "side", "bn3"):
        ref_mean, ref_var = population(reference[name])
        mean, var, tracked = buffers(model, name)
        np.testing.assert_allclose(mean, ref_mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(var, ref_var, rtol=1e-5)
        assert tracked == 5
        entry = result.layer(name)
        assert entry.values_per_channel == 20 * 6 * 5 and entry.num_calls == 5
        np.testing.assert_allclose(entry.old_running_mean, old[name][0])
        np.testing.assert_allclose(entry.new_running_var, var)
        # Against the old statistics, the data the new ones came from (float64 reference).
        z = np.abs(ref_mean - old[name][0]) / np.sqrt(old[name][1] + 1e-5)
        assert entry.max_abs_shift_z_before == pytest.approx(z.max(), rel=1e-5)
    # The first layer's train- and eval-mode inputs are the same: after recalibration it fits exactly.
    first = result.layer("bn1")
    assert first.max_abs_shift_z_after is not None and first.max_abs_shift_z_after < 1e-5
    assert first.worst_var_ratio_after == pytest.approx((first.values_per_channel - 1) / first.values_per_channel)


def test_precise_mean_matches_update_bn_and_var_differs_by_the_variance_of_batch_means() -> None:
    # In float64 throughout, so the between-batch term is not lost in float32 rounding of ~1e3 variances.
    model = make_chain().double()
    batches = [x.double() for x in models.uneven_batches((6, 6, 6, 6))]
    swa = copy.deepcopy(model)
    reference = layer_inputs(model, batches, training=True)
    recalibrate(model, batches, method="precise")
    torch.optim.swa_utils.update_bn(batches, swa)
    for name in ("bn1", "bn2", "side", "bn3"):
        mean, var, _ = buffers(model, name)
        swa_mean, swa_var, _ = buffers(swa, name)
        np.testing.assert_allclose(mean, swa_mean, rtol=1e-10)
        # population biased var = mean of per-batch biased vars + biased var of per-batch means;
        # update_bn keeps the mean of per-batch unbiased vars, without the second term.
        per_batch = [x.transpose(0, 1).reshape(x.shape[1], -1) for x in reference[name]]
        m = per_batch[0].shape[1]
        n = m * len(per_batch)
        batch_means = torch.stack([values.mean(1) for values in per_batch])
        between = batch_means.var(0, correction=0).numpy()
        np.testing.assert_allclose(
            var * (n - 1) / n - swa_var * (m - 1) / m, between, rtol=1e-6, atol=1e-10 * var.max()
        )
        assert (between > 0).all()


# --- sequential ------------------------------------------------------------------------------


def test_sequential_makes_eval_inputs_match_the_new_statistics_and_differs_from_precise() -> None:
    model = make_chain()
    precise_model = copy.deepcopy(model)
    batches = models.uneven_batches()
    result = recalibrate(model, batches, method="sequential")
    recalibrate(precise_model, batches, method="precise")
    report = inspect_model(model, batches)
    assert [entry.name.raw for entry in report.layers] == ["bn1", "bn2", "side", "bn3"]
    for entry in report.layers:
        _, var, tracked = buffers(model, entry.name.raw)
        assert entry.batch_mean is not None and entry.batch_var_unbiased is not None
        assert max(abs(z) for z in entry.mean_shift_z or ()) < 1e-5
        np.testing.assert_allclose(entry.batch_var_unbiased, var, rtol=1e-5)
        assert tracked == 5
        after = result.layer(entry.name.raw)
        assert after.max_abs_shift_z_after is not None and after.max_abs_shift_z_after < 1e-5
    # Downstream of bn1, eval inputs (population statistics upstream) differ from train inputs.
    for name in ("bn2", "bn3"):
        seq_var, precise_var = buffers(model, name)[1], buffers(precise_model, name)[1]
        assert np.abs(seq_var / precise_var - 1).max() > 1e-2
    np.testing.assert_allclose(buffers(model, "bn1")[1], buffers(precise_model, "bn1")[1], rtol=1e-6)


@pytest.mark.parametrize("method", ["precise", "sequential"])
def test_before_is_measured_on_the_model_as_given(method: str) -> None:
    model = make_chain()
    batches = models.uneven_batches()
    given = inspect_model(model, batches, mode="train" if method == "precise" else "eval")
    result = recalibrate(model, batches, method=method)
    for entry in given.layers:
        # sequential measures bn2, side and bn3 after bn1 was rewritten; "before" is the model as given.
        before = result.layer(entry.name.raw)
        assert entry.max_abs_shift_z is not None and entry.worst_var_ratio is not None
        assert before.max_abs_shift_z_before == pytest.approx(entry.max_abs_shift_z, rel=1e-5)
        assert before.worst_var_ratio_before == pytest.approx(entry.worst_var_ratio, rel=1e-5)
        # The departure score before is inspect's on the model as given (the same data, the same samples).
        assert entry.departure is not None
        assert before.departure_before == pytest.approx(entry.departure.score, rel=1e-5)


def test_sequential_shares_passes_between_independent_layers_and_stops_early() -> None:
    model = make_chain()
    batches = models.uneven_batches()
    result = recalibrate(model, batches, method="sequential")
    # bn2 and side both depend on bn1 only; bn3 on all of them.
    assert {e.name.raw: e.wave for e in result.layers} == {"bn1": 0, "bn2": 1, "side": 1, "bn3": 2}
    assert result.num_waves == 3 and result.num_passes == 4 and not result.notes
    # Only the first pass and the verification reach the head: the wave passes stop at their layers.
    assert model.head.calls == 2 * len(batches)


def test_a_module_called_twice_gets_the_statistics_of_both_calls() -> None:
    model = models.randomize_norm_state(models.SharedBN()).eval()
    batches = models.uneven_batches((4, 3))
    reference = layer_inputs(model, batches, training=True)["bn"]  # both calls of both batches
    assert len(reference) == 4
    result = recalibrate(model, batches, method="precise")
    mean, var, tracked = buffers(model, "bn")
    ref_mean, ref_var = population(reference)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(var, ref_var, rtol=1e-5)
    assert tracked == 4  # BatchNorm counts every call in training too
    entry = result.layer("bn")
    assert entry.num_calls == 4 and entry.calls_per_forward == 2
    assert not result.notes  # in train mode every call normalizes with its own batch: exact
    assert [skip.name.raw for skip in result.skipped] == ["unused"]
    sequential = recalibrate(model, batches, method="sequential")
    assert any("bn ran more than once per forward" in note for note in sequential.notes)


def test_data_dependent_control_flow_gives_one_layer_per_pass_and_stays_exact() -> None:
    torch.manual_seed(0)
    model = models.randomize_norm_state(Branching()).eval()
    batches = list(models.make_input((24, 4), mean=3.0).split([7, 9, 8]))
    result = recalibrate(model, batches, method="sequential")
    assert [e.wave for e in result.layers] == [0, 1, 2]
    assert any("data-dependent control flow" in note for note in result.notes)
    for entry in inspect_model(model, batches).layers:
        assert max(abs(z) for z in entry.mean_shift_z or ()) < 1e-5


class ThroughNumpy(nn.Module):
    """bn1's output reaches bn2 through numpy, which the dispatcher never sees."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm1d(4)
        self.bn2 = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normalized = self.bn1(x)  # kept alive, so numpy cannot reuse its memory (and its trace)
        hidden = torch.from_numpy(normalized.numpy() * 2.0 + 1.0)
        return self.bn2(hidden)


def test_a_dependency_the_trace_cannot_see_is_caught_by_the_check_pass() -> None:
    model = models.randomize_norm_state(ThroughNumpy()).eval()
    batches = list(models.make_input((24, 4), mean=3.0).split([7, 9, 8]))
    result = recalibrate(model, batches, method="sequential")
    assert any("missed a dependency of bn2" in note for note in result.notes)
    assert [e.wave for e in result.layers] == [0, 1]
    for entry in inspect_model(model, batches).layers:
        assert max(abs(z) for z in entry.mean_shift_z or ()) < 1e-5
    assert result.layer("bn2").max_abs_shift_z_after is not None
    assert result.layer("bn2").max_abs_shift_z_after < 1e-5


def test_one_shot_iterator_serves_every_pass() -> None:
    model, twin = make_chain(), make_chain()
    batches = models.uneven_batches()
    recalibrate(model, iter(batches), method="sequential")
    recalibrate(twin, batches, method="sequential")
    assert state_fingerprint(model) == state_fingerprint(twin)


class Wrapped(nn.Module):
    """Calls a Sequential from its own forward, so recalibrate cannot resume inside it."""

    def __init__(self, inner: nn.Sequential) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)  # type: ignore[no-any-return]


def sequential_mix(seed: int = 0) -> nn.Sequential:
    """In-place ReLUs, a nested Sequential, a BatchNorm run twice and one never run."""
    torch.manual_seed(seed)
    shared = nn.BatchNorm1d(6)
    model = nn.Sequential(
        nn.Linear(4, 6),
        nn.BatchNorm1d(6),
        nn.ReLU(inplace=True),
        nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.ReLU(inplace=True)),
        shared,
        nn.Linear(6, 6),
        shared,
        nn.Sequential(nn.BatchNorm1d(6), nn.Dropout(0.5)),
        nn.Linear(6, 6),
        nn.BatchNorm1d(6),
    )
    model.unused = nn.BatchNorm1d(6)
    return models.randomize_norm_state(model, seed=seed).eval()  # type: ignore[return-value]


def test_sequential_resumed_at_stage_inputs_gives_the_buffers_of_full_passes() -> None:
    model = sequential_mix()
    wrapped = Wrapped(copy.deepcopy(model))
    batches = list(models.make_input((20, 4), mean=2.0).split([6, 9, 5]))
    result = recalibrate(model, batches, method="sequential")
    reference = recalibrate(wrapped, batches, method="sequential")
    assert state_fingerprint(model) == state_fingerprint(wrapped.inner)
    assert [(e.name.raw, e.wave, e.num_calls) for e in result.layers] == [
        (e.name.raw.removeprefix("inner."), e.wave, e.num_calls) for e in reference.layers
    ]
    assert result.num_passes == reference.num_passes and len(result.notes) == len(reference.notes) == 1


@pytest.mark.parametrize("depth", [20, 40])
def test_sequential_runs_each_layer_of_a_chain_a_bounded_number_of_times_per_batch(depth: int) -> None:
    torch.manual_seed(0)
    model = models.randomize_norm_state(nn.Sequential(*[nn.BatchNorm1d(3) for _ in range(depth)])).eval()
    batches = list(models.make_input((12, 3)).split([4, 5, 3]))
    runs = [0] * depth
    for index, layer in enumerate(model):
        layer.register_forward_hook(lambda *_, index=index: runs.__setitem__(index, runs[index] + 1))
    result = recalibrate(model, batches, method="sequential")
    assert result.num_waves == depth
    # The first pass, the wave pass after the layer's own and the check pass: re-running the
    # layers upstream of every wave would run the first layer depth + 1 times per batch.
    assert max(runs) <= 3 * len(batches)
    assert sum(runs) <= 3 * depth * len(batches)


# --- TorchScript, InstanceNorm, skips, errors ---------------------------------------------------


@pytest.mark.parametrize("method", ["precise", "sequential"])
def test_torchscript_recalibration_matches_eager(method: str) -> None:
    eager = make_chain()
    script = scripted(copy.deepcopy(eager))
    batches = models.uneven_batches()
    eager_result = recalibrate(eager, batches, method=method)
    script_result = recalibrate(script, batches, method=method)
    assert [e.name for e in script_result.layers] == [e.name for e in eager_result.layers]
    # TorchScript may fuse ops out of the dispatcher's sight, so it is not traced: one layer per wave.
    assert [e.wave for e in script_result.layers] == ([0, 0, 0, 0] if method == "precise" else [0, 1, 2, 3])
    for name in ("bn1", "bn2", "side", "bn3"):
        for a, b in zip(buffers(eager, name), buffers(script, name), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # The wave passes stop inside the TorchScript forward too: only two passes reach the head.
    assert script.head.calls == eager.head.calls == 2 * len(batches)


@pytest.mark.parametrize("method", ["precise", "sequential"])
def test_instance_norm_running_statistics_average_the_instance_statistics(method: str) -> None:
    torch.manual_seed(0)
    model = models.randomize_norm_state(InstanceThenBatch()).eval()
    batches = models.uneven_batches((3, 1, 4))
    result = recalibrate(model, batches, method=method)
    inputs = layer_inputs(model, batches, training=False)["inorm"]
    values = torch.cat(inputs).flatten(2)  # (N, C, H*W): the instance norm's input is mode-independent
    mean, var, _ = buffers(model, "inorm")
    np.testing.assert_allclose(mean, values.mean(2).mean(0).numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(var, values.var(2, correction=1).mean(0).numpy(), rtol=1e-5)
    assert model.inorm.num_batches_tracked.item() == 100  # PyTorch never counts for InstanceNorm
    assert result.layer("inorm").values_per_channel == 8 * 4 * 3


def test_layers_without_running_statistics_are_skipped_with_reasons() -> None:
    model = models.randomize_norm_state(Mixed()).eval()
    result = recalibrate(model, [models.make_input((8, 4))])
    assert [entry.name.raw for entry in result.layers] == ["bn"]
    reasons = {skip.name.raw: skip.reason for skip in result.skipped}
    assert "track_running_stats=False" in reasons["untracked"]
    assert "GroupNorm keeps no running statistics" in reasons["gn"]
    assert reasons["unused"] == "not executed on these batches"


def test_torchscript_instance_norm_is_skipped_with_a_reason() -> None:
    torch.manual_seed(0)
    model = scripted(models.randomize_norm_state(InstanceThenBatch()).eval())
    result = recalibrate(model, models.uneven_batches((3, 4)))
    assert [entry.name.raw for entry in result.layers] == ["bn"]
    assert "TorchScript" in next(s.reason for s in result.skipped if s.name.raw == "inorm")


def test_no_running_statistics_at_all_is_an_error() -> None:
    with pytest.raises(NoNormLayersError, match="no normalization layer with running statistics"):
        recalibrate(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), [torch.randn(3, 4)])


@pytest.mark.parametrize("method", ["precise", "sequential"])
def test_a_failing_forward_leaves_every_buffer_as_it_was(method: str) -> None:
    class FailsLater(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn1 = nn.BatchNorm1d(4)
            self.bn2 = nn.BatchNorm1d(4)
            self.runs = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.runs += 1
            if self.runs > 2:  # the third forward: inside the second pass for "sequential"
                raise RuntimeError("deliberate failure")
            return self.bn2(self.bn1(x) + 1)

    model = models.randomize_norm_state(FailsLater()).eval()
    before = state_fingerprint(model)
    with pytest.raises(ForwardError, match="deliberate failure"):
        recalibrate(model, [models.make_input((6, 4)), models.make_input((5, 4), seed=1)], method=method)
    assert state_fingerprint(model) == before


def test_set_norm_layers_training_leaves_submodules_of_a_layer_in_eval() -> None:
    class BatchNormAct(nn.BatchNorm1d):
        def __init__(self) -> None:
            super().__init__(4)
            self.drop = nn.Dropout(0.5)

    model = nn.Sequential(nn.Dropout(0.1), BatchNormAct())
    set_norm_layers_training(model, iter_norm_layers(model))
    assert [m.training for m in model.modules()] == [False, False, True, False]


# --- save_like -------------------------------------------------------------------------------

ARCH = "tests.test_recalibration:Chain"


def _recalibrated(path: Path, **load: object) -> tuple[nn.Module, str, RecalibrationResult]:
    loaded = load_model(path, **load)  # type: ignore[arg-type]
    result = recalibrate(loaded.module, models.uneven_batches())
    return loaded.module, loaded.format, result


def _write_state_dict(path: Path) -> None:
    model = make_chain()
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)


def _write_checkpoint(path: Path) -> None:
    model = make_chain()
    torch.save({"epoch": 7, "state_dict": model.state_dict(), "optimizer": {"lr": torch.tensor(0.1)}}, path)


def _write_safetensors(path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in make_chain().state_dict().items()}, str(path), metadata={"by": "test"})


def _write_torchscript(path: Path) -> None:
    torch.jit.save(scripted(make_chain()), str(path))


def _write_pickle(path: Path) -> None:
    torch.save(make_chain(), path)


FORMATS: dict[str, tuple[Callable[[Path], None], dict[str, object]]] = {
    "state_dict": (_write_state_dict, {"arch": ARCH}),
    "checkpoint": (_write_checkpoint, {"arch": ARCH}),
    "safetensors": (_write_safetensors, {"arch": ARCH}),
    "torchscript": (_write_torchscript, {}),
    "pickle": (_write_pickle, {"trust_pickle": True}),
}


@pytest.mark.parametrize("file_format", list(FORMATS))
def test_save_like_round_trips_each_format(tmp_path: Path, file_format: str) -> None:
    write, load = FORMATS[file_format]
    source = tmp_path / "model.bin"
    write(source)
    original_bytes = source.read_bytes()
    model, loaded_format, _ = _recalibrated(source, **load)
    assert loaded_format == file_format
    output = tmp_path / "out" / "recalibrated.bin"
    output.parent.mkdir()
    assert save_like(source, loaded_format, model, output) == output
    again = load_model(output, **load)  # type: ignore[arg-type]
    assert again.format == file_format
    assert state_fingerprint(again.module.eval()) == state_fingerprint(model.eval())
    assert source.read_bytes() == original_bytes
    assert os.listdir(output.parent) == ["recalibrated.bin"]
    if file_format == "state_dict":
        assert all(key.startswith("module.") for key in torch.load(output, weights_only=True))
    if file_format == "checkpoint":
        saved = torch.load(output, weights_only=True)
        assert saved["epoch"] == 7 and float(saved["optimizer"]["lr"]) == pytest.approx(0.1)
        assert saved["state_dict"]._metadata["bn1"] == {"version": 2}
    if file_format == "safetensors":
        from safetensors import safe_open

        with safe_open(str(output), framework="pt") as handle:
            assert handle.metadata() == {"by": "test"}


def _spellings(tmp_path: Path, source: Path) -> Iterator[Path]:
    yield source
    yield tmp_path / "sub" / ".." / source.name
    link = tmp_path / "link.pt"
    link.symlink_to(source)
    yield link
    hard = tmp_path / "hard.pt"
    os.link(source, hard)
    yield hard


def test_save_like_never_writes_the_input(tmp_path: Path) -> None:
    source = tmp_path / "model.pt"
    _write_state_dict(source)
    (tmp_path / "sub").mkdir()
    original_bytes = source.read_bytes()
    model, loaded_format, _ = _recalibrated(source, arch=ARCH)
    for output in _spellings(tmp_path, source):
        with pytest.raises(OutputError, match="is the model file"):
            save_like(source, loaded_format, model, output, force=True)
    assert source.read_bytes() == original_bytes
    assert sorted(os.listdir(tmp_path)) == ["hard.pt", "link.pt", "model.pt", "sub"]


def test_save_like_refuses_an_existing_output_without_force(tmp_path: Path) -> None:
    source, output = tmp_path / "model.pt", tmp_path / "out.pt"
    _write_state_dict(source)
    output.write_bytes(b"keep me")
    model, loaded_format, _ = _recalibrated(source, arch=ARCH)
    with pytest.raises(OutputError, match=r"out\.pt already exists\. Pass --force"):
        save_like(source, loaded_format, model, output)
    assert output.read_bytes() == b"keep me"
    save_like(source, loaded_format, model, output, force=True)
    assert load_model(output, arch=ARCH).format == "state_dict"
    assert sorted(os.listdir(tmp_path)) == ["model.pt", "out.pt"]


def test_save_like_errors_are_one_line(tmp_path: Path) -> None:
    source = tmp_path / "model.pt"
    _write_state_dict(source)
    model, _, _ = _recalibrated(source, arch=ARCH)
    with pytest.raises(OutputError, match=r"folder .*missing does not exist"):
        save_like(source, "state_dict", model, tmp_path / "missing" / "out.pt")
    with pytest.raises(OutputError, match="is a directory"):
        save_like(source, "state_dict", model, tmp_path)
    with pytest.raises(OutputError, match="is TorchScript but the model to save is an eager Chain"):
        save_like(source, "torchscript", model, tmp_path / "out.pt")
    with pytest.raises(OutputError, match="cannot save a model loaded as 'arch'"):
        save_like(source, "arch", model, tmp_path / "out.pt")
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]
