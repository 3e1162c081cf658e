"""Real training, accuracy, and the BatchNorm mistakes made to a trained model (each a copy)."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

Builder = Callable[[], nn.Module]


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, *, shuffle: bool = True) -> Iterator[tuple]:
    """Mini-batches as tensors; a size-1 tail is dropped, since BatchNorm refuses it in train mode."""
    order = np.random.default_rng(seed).permutation(len(y)) if shuffle else np.arange(len(y))
    for start in range(0, len(y), batch_size):
        index = order[start : start + batch_size]
        if len(index) > 1:
            yield torch.from_numpy(x[index]), torch.from_numpy(y[index])


def fit(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, batch_size: int, seed: int, lr: float) -> None:
    """Adam on shuffled mini-batches in train mode; leaves the model in eval mode."""
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    model.train()
    for epoch in range(epochs):
        for xb, yb in batches(x, y, batch_size, seed + epoch):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    model.eval()


@torch.no_grad()
def correct(model: nn.Module, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per sample, whether the eval-mode prediction is right."""
    model.eval()
    predictions = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return np.asarray(predictions == y)


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Share of correct predictions in eval mode."""
    return float(correct(model, x, y).mean())


def norm_layers(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


@torch.no_grad()
def forward_in_train_mode(model: nn.Module, x: np.ndarray, batch_size: int, num_batches: int | None = None) -> None:
    """What an evaluation loop without model.eval() does: every batch updates the running statistics.

    With ``num_batches``, exactly that many shuffled batches (passing over the data again if it is short).
    """
    labels = np.zeros(len(x), dtype=np.int64)
    model.train()
    if num_batches is None:
        for xb, _ in batches(x, labels, batch_size, 0, shuffle=False):
            model(xb)
    else:
        for xb, _ in itertools.islice(endless_batches(x, labels, batch_size), num_batches):
            model(xb)
    model.eval()


def endless_batches(x: np.ndarray, y: np.ndarray, batch_size: int) -> Iterator[tuple]:
    for epoch in itertools.count():
        yield from batches(x, y, batch_size, epoch)


def spoiled_without_eval(model: nn.Module, x_other: np.ndarray) -> nn.Module:
    """The model after an evaluation loop over ``x_other`` that forgot eval() (batch 64, momentum 0.1)."""
    spoiled = copy.deepcopy(model)
    forward_in_train_mode(spoiled, x_other, batch_size=64)
    return spoiled


def few_batches(model: nn.Module, x_train: np.ndarray, num_batches: int, batch_size: int) -> nn.Module:
    """Running statistics re-estimated from only ``num_batches`` training batches (num_batches_tracked says so)."""
    short = copy.deepcopy(model)
    for layer in norm_layers(short):
        layer.reset_running_stats()
    forward_in_train_mode(short, x_train, batch_size=batch_size, num_batches=num_batches)
    return short


def partially_loaded(model: nn.Module, build: Builder) -> nn.Module:
    """A fresh model given the state_dict without its BN buffers (strict=False): buffers at 0 / 1 / 0."""
    fresh = build()
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    kept = {k: v for k, v in model.state_dict().items() if not k.endswith(buffers)}
    fresh.load_state_dict(kept, strict=False)
    return fresh.eval()


def half_precision_var(model: nn.Module) -> nn.Module:
    """Running variances cast to float16 and back (values over 65504 become inf)."""
    cast = copy.deepcopy(model)
    for layer in norm_layers(cast):
        assert layer.running_var is not None  # every net here tracks statistics
        layer.running_var.copy_(layer.running_var.half().float())
    return cast


def corrupted_layer(model: nn.Module, *, var_factor: float = 1.0, mean_shift_std: float = 0.0) -> nn.Module:
    """The middle BN layer's running variance scaled, or its mean moved by running stds; others untouched."""
    broken = copy.deepcopy(model)
    layers = norm_layers(broken)
    layer = layers[len(layers) // 2]
    assert layer.running_mean is not None and layer.running_var is not None
    layer.running_mean.add_(mean_shift_std * layer.running_var.sqrt())
    layer.running_var.mul_(var_factor)
    return broken


def finetuned(model: nn.Module, x: np.ndarray, y: np.ndarray, *, batch_size: int, seed: int) -> nn.Module:
    """One epoch of fine-tuning with every parameter trainable (Adam, lr 1e-3)."""
    tuned = copy.deepcopy(model)
    fit(tuned, x, y, epochs=1, batch_size=batch_size, seed=seed, lr=1e-3)
    return tuned


def head_finetuned_bn_train_mode(
    model: nn.Module, head: str, x: np.ndarray, y: np.ndarray, *, batch_size: int, seed: int
) -> nn.Module:
    """Everything but the ``head`` frozen (BN weight and bias included) yet trained in train mode: the BN
    running statistics keep moving with the fine-tuning batches, which the user thought frozen."""
    tuned = copy.deepcopy(model)
    for name, param in tuned.named_parameters():
        param.requires_grad = name.startswith(head)
    fit(tuned, x, y, epochs=1, batch_size=batch_size, seed=seed, lr=1e-3)
    for param in tuned.parameters():
        param.requires_grad = True
    return tuned


def averaged(
    model: nn.Module, x: np.ndarray, y: np.ndarray, *, ema: bool, recompute_bn: bool, batch_size: int, seed: int
) -> nn.Module:
    """SWA (equal weights per epoch) or EMA (decay 0.95 per step) of 3 more epochs of SGD at lr 0.05.

    use_buffers=False copies the last iterate's BN statistics into the average; only update_bn
    recomputes them for the averaged weights (BN-FACTS, "Export, folding and averaging").
    """
    source = copy.deepcopy(model)
    avg_fn = get_ema_multi_avg_fn(0.95) if ema else None
    average = AveragedModel(source, multi_avg_fn=avg_fn, use_buffers=False)
    optimizer = torch.optim.SGD(source.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(seed)
    for epoch in range(3):
        source.train()
        for xb, yb in batches(x, y, batch_size, seed + epoch):
            optimizer.zero_grad()
            nn.functional.cross_entropy(source(xb), yb).backward()
            optimizer.step()
            if ema:
                average.update_parameters(source)
        if not ema:
            average.update_parameters(source)
    if recompute_bn:
        update_bn(batches(x, y, batch_size, seed), average)
    return average.module.eval()


def trained_with_momentum(
    build: Builder, momentum: float, x: np.ndarray, y: np.ndarray, *, epochs: int, batch_size: int, seed: int
) -> nn.Module:
    """A model trained from scratch with every BN layer's momentum set (0: statistics never move; 1: last batch)."""
    model = build()
    for layer in norm_layers(model):
        layer.momentum = momentum
    fit(model, x, y, epochs=epochs, batch_size=batch_size, seed=seed, lr=1e-3)
    return model
