"""bn_inspect.watch on real training runs of the digits net: each fault planted is found at its step and layer."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import bn_inspect
from bn_inspect.errors import OutputError
from bn_inspect.report.findings import RULES
from tests.training import DigitsNet, batches, events, new_net, records, train


def watched(model: nn.Module, path: Path, steps: int, *, every: int = 10, **training: object) -> bn_inspect.Watch:
    with bn_inspect.watch(model, path, every=every) as watch:
        train(model, steps, **training)  # type: ignore[arg-type]
    return watch


def test_a_healthy_run_has_no_event_and_a_complete_timeline(tmp_path: Path) -> None:
    path = tmp_path / "bn-watch.jsonl"
    watch = watched(new_net(), path, 120)
    assert watch.events == [] and events(path) == []
    lines = records(path)
    header, end = lines[0], lines[-1]
    assert header["format"] == "bn-inspect-timeline" and header["version"] == 1
    assert header["every"] == 10 and header["detail_every"] == 20 and header["rank"] == 0
    assert header["world_size"] == 1 and header["model"] == "DigitsNet"
    assert header["layers"] == [
        {"layer": "bn1", "kind": "BatchNorm2d", "channels": 8},
        {"layer": "bn2", "kind": "BatchNorm2d", "channels": 16},
        {"layer": "bn3", "kind": "BatchNorm1d", "channels": 32},
    ]
    samples = [r for r in lines if r["record"] == "sample"]
    assert [s["step"] for s in samples] == list(range(0, 120, 10))
    assert end == {"record": "end", "step": 119, "rank": 0, "steps": 120, "samples": 12, "events": 0}
    assert watch.steps == 120 and watch.samples == 12
    # Detail at the first sample only (detail_every 20 > 12 samples).
    assert ["detail" in s for s in samples] == [True] + [False] * 11
    last = samples[-1]["layers"]
    assert [(entry["layer"], entry["call"], entry["values_per_channel"]) for entry in last] == [
        ("bn1", 0, 32 * 64),
        ("bn2", 0, 32 * 64),
        ("bn3", 0, 32),
    ]
    for entry in last:
        assert entry["training"] and entry["buffers_changed"] and entry["params_changed"]
        assert entry["params_requires_grad"] and entry["nonfinite"] == 0
        assert 0 < entry["departure"] < 0.83


@pytest.mark.parametrize(("where", "step", "layer"), [("input", 23, "bn1"), ("conv2", 31, "bn2")])
def test_a_nan_is_found_at_its_step_and_first_layer(where: str, step: int, layer: str, tmp_path: Path) -> None:
    def plant(current: int, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if current == step and where == "input":
            x = x.clone()
            x[5, 0, 3, 4] = math.nan
        if current == step and where == "conv2":
            with torch.no_grad():
                model.conv2.weight[3, 2, 1, 1] = math.inf
        return x

    path = tmp_path / "bn-watch.jsonl"
    watch = watched(new_net(), path, 40, before_step=plant)
    # Between samples (every 10), at the exact step; the NaN spreads to every later layer, and
    # only the first in execution order is named.
    first = [e for e in watch.events if e.code == "BN501"]
    assert [(e.step, e.layer, e.severity) for e in first] == [(step, layer, "error")]
    assert (step, "BN501", layer) in events(path)
    nulls = [r for r in records(path) if r["record"] == "sample" and r["step"] > step]
    assert all(entry["departure"] is None for r in nulls for entry in r["layers"] if entry["layer"] == layer)


def test_momentum_zero_is_statistics_not_moving(tmp_path: Path) -> None:
    model = new_net()
    model.bn2.momentum = 0.0
    watch = watched(model, tmp_path / "w.jsonl", 30)
    assert [(e.step, e.code, e.layer) for e in watch.events] == [(0, "BN502", "bn2")]


def test_half_frozen_batchnorm_both_ways(tmp_path: Path) -> None:
    model = new_net()
    model.bn1.weight.requires_grad_(False)
    model.bn1.bias.requires_grad_(False)

    def freeze_bn2_statistics(step: int, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        net.bn2.eval()  # after train(): statistics frozen, affine still trained
        return x

    watch = watched(model, tmp_path / "w.jsonl", 30, before_step=freeze_bn2_statistics)
    found = [(e.step, e.code, e.layer) for e in watch.events]
    # bn1: frozen parameters, moving statistics, from the first sample. bn2: frozen statistics;
    # its parameters have changed by the second sample (the first compares with the start).
    assert found == [(0, "BN503", "bn1"), (10, "BN503", "bn2")]
    assert "requires_grad False" in watch.events[0].message and "eval mode" in watch.events[1].message


def test_batch_size_two_is_too_few_values_in_the_1d_head_only(tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    watch = watched(new_net(), path, 12, batch_size=2)
    assert [(e.step, e.code, e.layer, dict(e.values)) for e in watch.events] == [
        (0, "BN505", "bn3", {"values_per_channel": 2})
    ]
    assert [r["values"] for r in records(path) if r["record"] == "event"] == [{"values_per_channel": 2}]


def _shifted_after(step_of_shift: int, momentum: float):  # type: ignore[no-untyped-def]
    def plant(step: int, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if step == step_of_shift:
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.momentum = momentum
        return x * 4.0 + 2.0 if step >= step_of_shift else x

    return plant


def test_a_lagging_average_after_a_data_shift_is_found_and_a_healthy_momentum_is_not(tmp_path: Path) -> None:
    lagging = watched(new_net(), tmp_path / "lag.jsonl", 300, before_step=_shifted_after(100, 0.001))
    healthy = watched(new_net(), tmp_path / "ok.jsonl", 300, before_step=_shifted_after(100, 0.1))
    assert [e.code for e in healthy.events] == []
    lag = [e for e in lagging.events if e.code == "BN506"]
    assert lag and lag[0].layer == "bn1"
    # Five samples in a row at the warning tier, the first at the shift: 100 steps later.
    assert lag[0].step == 200 and lag[0].values["steps"] == 100
    assert float(lag[0].values["departure"]) >= 0.83


def test_events_are_registered_rules_and_check_knows_their_codes() -> None:
    from bn_inspect.report.rules import unknown_codes

    codes = [f"BN50{n}" for n in range(1, 7)]
    assert all(code in RULES for code in codes)
    assert unknown_codes(codes) == []


def test_nothing_is_printed_unless_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = new_net()
    model.bn2.momentum = 0.0
    watched(model, tmp_path / "quiet.jsonl", 12)
    assert capsys.readouterr() == ("", "")
    with bn_inspect.watch(model, tmp_path / "loud.jsonl", every=10, print_events=True) as watch:
        train(model, 12)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("step 0: BN502 warning bn2: ")
    assert watch.summary().splitlines()[-1] == (
        f"12 training steps watched, 2 samples, 1 event; timeline: {tmp_path / 'loud.jsonl'}"
    )


def test_a_digits_net_is_the_model_named(tmp_path: Path) -> None:
    assert isinstance(new_net(), DigitsNet)


def test_a_validation_records_each_layers_train_eval_gap_from_the_pooled_statistics(tmp_path: Path) -> None:
    import numpy as np

    from bn_inspect.report.departure import measure
    from tests.helpers import DIGITS

    model = new_net()
    path = tmp_path / "w.jsonl"
    test_images = torch.from_numpy(np.load(DIGITS / "test_images.npy"))
    pooled: dict[str, list[torch.Tensor]] = {}

    def keep(name: str):  # type: ignore[no-untyped-def]
        return lambda _m, args: pooled.setdefault(name, []).append(args[0].detach().double())

    with bn_inspect.watch(model, path, every=10) as watch:
        train(model, 60)
        handles = [getattr(model, n).register_forward_pre_hook(keep(n)) for n in ("bn1", "bn2", "bn3")]
        model.eval()
        with watch.validation(), torch.no_grad():
            for chunk in test_images.split(100):
                model(chunk * 4.0 + 2.0)  # a shifted validation set: the gap opens at bn1
        model.train()
        for handle in handles:
            handle.remove()
    record = next(r for r in records(path) if r["record"] == "validation")
    assert record["step"] == 59 and record["rank"] == 0
    expected = {}
    for name, inputs in pooled.items():
        values = torch.cat(inputs).transpose(0, 1).reshape(inputs[0].shape[1], -1)
        module = getattr(model, name)
        expected[name] = measure(
            values.mean(1).tolist(),
            values.var(1, unbiased=False).tolist(),
            module.running_mean.double().tolist(),
            module.running_var.double().tolist(),
            module.eps,
            450,
        ).score
    got = {entry["layer"]: entry["departure"] for entry in record["gap"]["layers"]}
    assert got.keys() == expected.keys()
    for name in got:
        assert got[name] == pytest.approx(expected[name], rel=1e-5)
    assert record["gap"]["largest"]["layer"] == max(expected, key=expected.__getitem__)
    assert expected["bn1"] > 1.7
    # Eval forwards are not steps.
    assert watch.steps == 60


def test_periodic_detail_thins_out_as_it_fills_its_budget_and_never_passes_it() -> None:
    from bn_inspect.analyses.watch import DetailBudget

    budget = DetailBudget(detail_every=20, budget=100)
    taken = []
    for sample in range(2000):
        if sample % budget.interval == 0 and budget.take(10):
            taken.append(sample)
    # 5 at every 20th sample fill half the budget, then every 40th to 3/4 and past it, every 80th...
    assert taken == [0, 20, 40, 60, 80, 120, 160, 200, 240, 320]
    # ...until the budget is spent: then no periodic detail is written any more.
    assert budget.written == 100 and not budget.take(1)


@pytest.mark.parametrize(("momentum", "fires"), [(1.0, True), (0.99, True), (0.1, False)])
def test_a_momentum_so_large_the_statistics_follow_single_batches_is_bn506_at_the_first_sample(
    momentum: float, fires: bool, tmp_path: Path
) -> None:
    model = new_net()
    model.bn2.momentum = momentum
    path = tmp_path / "w.jsonl"
    watch = watched(model, path, 25)
    found = [(e.step, e.code, e.layer) for e in watch.events]
    assert found == ([(0, "BN506", "bn2")] if fires else [])
    if fires:
        event = watch.events[0]
        assert event.severity == "warning" and event.values == {"momentum": momentum}
        assert f"bn2 trains with momentum {momentum:g}: each update makes its running statistics" in event.message
        assert "follow single batches" in event.message and "1 - momentum" in event.message
        assert events(path) == [(0, "BN506", "bn2")]


def test_a_large_momentum_in_eval_mode_is_not_bn506(tmp_path: Path) -> None:
    model = new_net()
    model.bn2.momentum = 0.9

    def freeze_bn2(step: int, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        net.bn2.eval()  # its statistics never update: the momentum does nothing
        return x

    watch = watched(model, tmp_path / "w.jsonl", 12, before_step=freeze_bn2)
    assert "BN506" not in {e.code for e in watch.events}


def _nan_message(tmp_path: Path, plant: object) -> str:
    model = new_net()
    watch = watched(model, tmp_path / "w.jsonl", 14, before_step=plant)  # type: ignore[arg-type]
    [event] = [e for e in watch.events if e.code == "BN501"]
    return event.message


def test_bn501_says_a_nan_in_running_statistics_that_follow_the_input_may_come_from_the_input(
    tmp_path: Path,
) -> None:
    def nan_input(step: int, _model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x * math.nan if step == 3 else x

    assert _nan_message(tmp_path, nan_input).startswith(
        "the first non-finite value appeared at step 3 in bn1's running_mean, running_var (updated from the "
        "step's input: a non-finite input or an upstream layer), the first layer in execution order to hold one"
    )


def test_bn501_names_the_input_of_a_layer_whose_statistics_do_not_follow_it(tmp_path: Path) -> None:
    def nan_input_to_eval_bn1(step: int, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        net.bn1.eval()
        return x * math.nan if step == 3 else x

    message = _nan_message(tmp_path, nan_input_to_eval_bn1)
    assert message.startswith("the first non-finite value appeared at step 3 in bn1 (input), the first layer")


def test_bn501_names_the_buffer_alone_when_it_was_overwritten_in_eval_mode(tmp_path: Path) -> None:
    def nan_checkpoint(step: int, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        net.bn1.eval()
        if step == 3:
            with torch.no_grad():
                net.bn1.running_var[2] = math.nan
        return x

    message = _nan_message(tmp_path, nan_checkpoint)
    assert message.startswith("the first non-finite value appeared at step 3 in bn1 (running_var), the first layer")


def test_the_summary_counts_steps_named_and_forwards_apart_with_gradient_accumulation(tmp_path: Path) -> None:
    model = new_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    path = tmp_path / "w.jsonl"
    with bn_inspect.watch(model, path, every=2) as watch:
        for index, (x, y) in enumerate(batches(16, 12)):
            watch.step(index // 2)  # named at every forward: the same step twice counts once
            torch.nn.functional.cross_entropy(model(x), y).backward()
            if index % 2 == 1:
                optimizer.step()
                optimizer.zero_grad()
    assert watch.summary() == f"6 steps named (0 to 5), 12 training forwards, 3 samples, 0 events; timeline: {path}"
    assert records(path)[-1]["steps"] == 12 and records(path)[-1]["step"] == 5


@pytest.mark.surface("write:timeline", "traceback")
@pytest.mark.parametrize("path", ["", "  "])
def test_an_empty_path_is_refused_in_one_line(path: str) -> None:
    with pytest.raises(OutputError) as caught:
        bn_inspect.watch(new_net(), path)
    assert caught.value.line() == "the timeline's path is empty. Pass a new file's path, e.g. runs/bn-watch.jsonl"


def test_one_event_on_several_layers_at_a_step_is_one_line_of_the_summary(tmp_path: Path) -> None:
    model = new_net()
    for layer in (model.bn1, model.bn2, model.bn3):
        layer.weight.requires_grad_(False)
        layer.bias.requires_grad_(False)
    model.bn2.momentum = 0.0  # bn2: BN502, a second group of one
    watch = watched(model, tmp_path / "w.jsonl", 12)
    assert [(e.step, e.code, e.layer) for e in watch.events] == [
        (0, "BN503", "bn1"),
        (0, "BN502", "bn2"),
        (0, "BN503", "bn3"),
    ]
    lines = watch.summary().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(
        "step 0: BN503 warning on 2 layers (bn1 and bn3); in bn1: bn1 has frozen affine parameters"
    )
    assert lines[1].startswith("step 0: BN502 warning bn2: bn2 is in training mode")
    assert lines[2].startswith("12 training steps watched, 2 samples, 3 events;")


def test_a_group_names_its_first_eight_layers_then_counts_the_rest() -> None:
    from bn_inspect.report.watch_records import WatchEvent, grouped_event_lines

    frozen = [
        WatchEvent(0, "BN503", "warning", f"layer{n}", f"layer{n} has frozen affine parameters") for n in range(11)
    ]
    later = WatchEvent(7, "BN503", "warning", "head", "head has frozen affine parameters")
    model = WatchEvent(7, "BN504", "warning", None, "the ranks differ")
    assert grouped_event_lines([*frozen, later, model]) == [
        "step 0: BN503 warning on 11 layers (layer0, layer1, layer2, layer3, layer4, layer5, layer6, layer7 and 3 more); "
        "in layer0: layer0 has frozen affine parameters",
        "step 7: BN503 warning head: head has frozen affine parameters",
        "step 7: BN504 warning (model): the ranks differ",
    ]
