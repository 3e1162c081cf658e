"""Eval mode against train mode on the same data: where, layer by layer, the two part.

Both modes run in one forward. Each batch is stacked on itself, (x; x), and the model runs in
eval mode; at every normalization layer the first half is normalized as in eval (running
statistics) and the second half as in training (statistics of the second half alone, running
buffers left untouched), and the two halves go on to the next layer. So each layer sees exactly
what it would see in an eval pass and in a train pass, side by side, and the differences are
reduced on the device as they pass: nothing but per-layer sums of squares (float64) is kept.

For each layer call, with x_e, x_t its input and y_e, y_t its output in eval and train mode:

* ``input_rel_diff = ||x_t - x_e|| / ||x_e||``: what arrives already different from upstream;
* ``output_rel_diff = ||y_t - y_e|| / ||y_e||``: what leaves (upstream difference included);
* ``own_rel_diff = ||f_train(x_e) - f_eval(x_e)|| / ||f_eval(x_e)||``: what this layer alone
  changes, given the eval input: its own share of the gap.

Norms are Frobenius norms over the whole tensor, summed over batches as squares before the root.
"Train mode" here means the normalization layers train and every other module stays in eval:
dropout (and stochastic depth, and any branch a module takes on its own ``training`` flag) would
otherwise add noise that has nothing to do with normalization.

Stacking is exact only when no other module mixes samples of a batch; the first batch is run
again in each mode alone (on the same stacked input, so the same kernels run) to check, and a
ModeComparisonError says so when the halves disagree.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from bn_inspect.analyses.inspection import run_model
from bn_inspect.analyses.passes import Tally, guarded_pass, iter_batches
from bn_inspect.data.batch import Batch
from bn_inspect.engine.capture import PlainDispatchMode, StatisticsRecorder
from bn_inspect.engine.preserve import preserved_state
from bn_inspect.errors import InputError, ModeComparisonError, NoNormLayersError
from bn_inspect.model.layers import NormFamily, NormLayer, iter_norm_layers
from bn_inspect.model.modules import (
    model_device,
    model_float_dtype,
    refuse_lazy_modules,
    set_norm_layers_training,
    unwrap_compiled,
)
from bn_inspect.report import shift
from bn_inspect.report.comparisons import LayerModeGap, ModeComparison, OutputGap
from bn_inspect.report.departure import ERROR, WARNING, measure
from bn_inspect.text import Untrusted

DEFAULT_THRESHOLD = 0.05
# How far each half of the side-by-side output may sit from a plain forward in its mode (relative
# norm). The eval halves run the very same kernels, so they agree to the bit. The train halves
# reduce batch statistics over N rows instead of the plain run's 2N identical ones; that rounding,
# amplified through deep stacks under TF32, was 8e-3 on ResNet-50 (H100), 1.4e-5 without TF32.
# A module that mixes samples moves the halves by a share of the eval/train gap itself.
_EVAL_TOLERANCE = 1e-3
_TRAIN_TOLERANCE = 5e-2


class _Sums:
    """Sums of squares of one layer call, float64 on the device (no host sync until the end)."""

    def __init__(self) -> None:
        self.values: dict[str, torch.Tensor] = {}

    def add(self, key: str, tensor: torch.Tensor) -> None:
        square = torch.linalg.vector_norm(tensor, dtype=torch.float64).square()
        previous = self.values.get(key)
        self.values[key] = square if previous is None else previous + square

    def ratio(self, difference: str, reference: str) -> float:
        return _ratio(self.values.get(difference), self.values.get(reference))


def _ratio(difference: torch.Tensor | None, reference: torch.Tensor | None) -> float:
    if difference is None or reference is None:
        return math.nan
    top, bottom = float(difference), float(reference)
    if math.isnan(top) or math.isnan(bottom):
        return math.nan
    if bottom == 0:
        return 0.0 if top == 0 else math.inf
    return math.sqrt(top / bottom)


class _Lockstep:
    """Per layer call: splits the stacked input, normalizes each half in its mode, keeps the sums."""

    def __init__(self, recorder: StatisticsRecorder) -> None:
        self.recorder = recorder
        self.num_samples = 0
        self.sums: dict[tuple[str, int], _Sums] = {}
        self._calls: Counter[str] = Counter()

    def start_batch(self, num_samples: int) -> None:
        self.num_samples = num_samples
        self._calls.clear()

    def compare(
        self,
        layer: NormLayer,
        x: torch.Tensor,
        eval_forward: Callable[[torch.Tensor], torch.Tensor],
        train_forward: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor | None:
        """The stacked output (eval half; train half), or None where ``x`` is not stacked."""
        if not _is_stacked(x, self.num_samples):
            return None
        call = self._calls[layer.name]
        self._calls[layer.name] += 1
        half = x.shape[0] // 2
        x_eval, x_train = x[:half], x[half:]
        self.recorder.observe(layer, x_eval)
        y_eval = eval_forward(x_eval)
        y_train = train_forward(x_train)
        y_own = train_forward(x_eval)
        sums = self.sums.setdefault((layer.name, call), _Sums())
        sums.add("input_diff", x_train - x_eval)
        sums.add("input", x_eval)
        sums.add("output_diff", y_train - y_eval)
        sums.add("output", y_eval)
        sums.add("own_diff", y_own - y_eval)
        return torch.cat([y_eval, y_train])


def compare_modes(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    threshold: float = DEFAULT_THRESHOLD,
) -> ModeComparison:
    """Run ``batches`` in eval and in train mode and report where the outputs part.

    The model is left as it was: training flags and every buffer are restored and every hook
    removed, even on error. See the module docstring for the method and the formulas.

    Args:
        model: an eager ``nn.Module`` or a TorchScript module (whose batch-norm kernels are
            intercepted at the dispatcher; TorchScript InstanceNorm is not supported).
        batches: tensors, dicts of tensors, (inputs, targets) pairs or ``Batch`` objects; every
            input tensor needs the batch in dim 0.
        threshold: relative output difference above which a layer counts as departing.

    Returns:
        The ModeComparison.

    Raises:
        NoNormLayersError, LazyModelError, InputError, ForwardError, ShapeMismatchError,
        ModeComparisonError: the model mixes samples of a batch, so the modes cannot run stacked.
    """
    model = unwrap_compiled(model)
    refuse_lazy_modules(model, "", "Run one forward pass first, then compare")
    layers = iter_norm_layers(model)
    if not layers:
        raise NoNormLayersError.for_action("compare")
    device = model_device(model)
    dtype = model_float_dtype(model)
    is_script = isinstance(model, torch.jit.ScriptModule)
    recorder = StatisticsRecorder()
    lockstep = _Lockstep(recorder)
    outputs = _OutputComparison()
    intercept = _script_lockstep if is_script else _eager_lockstep
    tally = Tally(device)
    with guarded_pass(model, None):
        # An empty batch has nothing to compare, and BatchNorm refuses one in train mode.
        for batch in iter_batches(batches, device, dtype, tally, skip_empty=True):
            n = batch.num_samples
            stacked = _stack(batch)
            model.eval()
            recorder.start_batch()
            lockstep.start_batch(n)
            with intercept(layers, lockstep):
                output = _forward(model, stacked, recorder)
            if tally.num_batches == 1:
                _check_stacking(model, layers, stacked, n, output)
            outputs.add(output, n)
    num_batches, num_samples = tally.num_batches, tally.num_samples
    if num_batches == 0:
        raise InputError("no batch ran", "Give at least one batch of input")
    by_name = {layer.name: layer for layer in layers}
    entries = tuple(
        _entry(by_name[name], call, sums, recorder, num_samples)
        for (name, call), sums in lockstep.sums.items()
        if name in by_name
    )
    beyond = [e for e in entries if not e.output_rel_diff <= threshold]
    opens = next((e.label for e in beyond if e.departure_tier in (WARNING, ERROR)), None)
    noise = beyond[0].label if beyond and opens is None else None
    seen = {name for name, _ in lockstep.sums}
    return ModeComparison(
        layers=entries,
        output=outputs.gap(num_samples),
        threshold=threshold,
        gap_opens_at=opens,
        batch_noise_from=noise,
        not_executed=tuple(Untrusted(layer.name) for layer in layers if layer.name not in seen),
        num_batches=num_batches,
        num_samples=num_samples,
    )


class _OutputComparison:
    """The model output's eval half against its train half, summed over batches on the device."""

    def __init__(self) -> None:
        self.sums = _Sums()
        self.num_changed: torch.Tensor | int = 0  # a device tensor: no host sync per batch
        self.num_compared = 0
        self.has_output = self.has_logits = True

    def add(self, output: Any, n: int) -> None:
        """Add one stacked forward's output (eval half first, ``n`` samples each)."""
        tensors = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        batched = _stacked_outputs(output, n)
        self.has_output = self.has_output and bool(batched)
        is_logits = len(tensors) == len(batched) == 1 and batched[0].dim() == 2 and batched[0].shape[0] == 2 * n
        self.has_logits = self.has_logits and is_logits
        for tensor in batched:
            half = tensor.shape[0] // 2
            self.sums.add("diff", tensor[half:] - tensor[:half])
            self.sums.add("reference", tensor[:half])
        if self.has_logits:
            logits = batched[0]
            self.num_changed = self.num_changed + (logits[:n].argmax(1) != logits[n:].argmax(1)).sum()
            self.num_compared += n

    def gap(self, num_samples: int) -> OutputGap | None:
        """The OutputGap, or None when an output had no batch dim."""
        if not self.has_output:
            return None
        has_argmax = self.has_logits and self.num_compared
        return OutputGap(
            rel_diff=self.sums.ratio("diff", "reference"),
            argmax_change_fraction=int(self.num_changed) / self.num_compared if has_argmax else None,
            num_samples=num_samples,
        )


def _stack(batch: Batch) -> Batch:
    n = batch.num_samples
    for position, tensor in enumerate(batch.tensors()):
        if tensor.dim() == 0 or tensor.shape[0] != n:
            raise InputError(
                f"input tensor {position} of shape {tuple(tensor.shape)} has no batch of {n} in dim 0",
                "Comparing modes stacks each batch twice along dim 0; give inputs batched in dim 0",
            )
    return Batch(
        tuple(torch.cat([t, t]) for t in batch.args),
        {k: torch.cat([v, v]) for k, v in batch.kwargs.items()},
    )


def _forward(model: nn.Module, batch: Batch, recorder: StatisticsRecorder) -> Any:
    """run_model (failures become ForwardErrors naming the layer), keeping the model's output."""
    kept: list[Any] = []
    if isinstance(model, torch.jit.ScriptModule):
        # ScriptModules take no hooks; their frames are not Python's, so nothing is lost by wrapping.
        run_model(_Calling(model, kept), batch, recorder)
    else:
        handle = model.register_forward_hook(lambda _module, _args, output: kept.append(output))
        try:
            run_model(model, batch, recorder)
        finally:
            handle.remove()
    return kept[-1] if kept else None


class _Calling(nn.Module):
    """Calls a model it does not own (it is no submodule) and keeps the output."""

    def __init__(self, model: nn.Module, kept: list[Any]) -> None:
        super().__init__()
        self._call = model.__call__
        self._kept = kept

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._kept.append(self._call(*args, **kwargs))
        return self._kept[-1]


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    candidate = kwargs.get("input")
    return candidate if isinstance(candidate, torch.Tensor) else None


@contextmanager
def _train_semantics(module: nn.Module) -> Iterator[None]:
    """The module alone in training mode, its own buffers put back after (no running update)."""
    saved = [(b, b.detach().clone()) for b in module.buffers(recurse=False)]
    module.training = True  # not module.train(): its submodules (a dropout inside) stay in eval
    try:
        yield
    finally:
        module.training = False
        for buffer, copy in saved:
            buffer.copy_(copy)


@contextmanager
def _eager_lockstep(layers: list[NormLayer], lockstep: _Lockstep) -> Iterator[None]:
    handles = []

    def make_hook(layer: NormLayer) -> Callable[..., torch.Tensor | None]:
        module = layer.module

        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], _output: Any) -> Any:
            x = _first_tensor(args, kwargs)
            if x is None:
                return None

            def call(half: torch.Tensor) -> torch.Tensor:
                if args and args[0] is x:
                    return module.forward(half, *args[1:], **kwargs)  # type: ignore[no-any-return]
                return module.forward(*args, **{**kwargs, "input": half})  # type: ignore[no-any-return]

            def train_call(half: torch.Tensor) -> torch.Tensor:
                with _train_semantics(module):
                    return call(half)

            return lockstep.compare(layer, x, call, train_call)

        return hook

    try:
        for layer in layers:
            handles.append(layer.module.register_forward_hook(make_hook(layer), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


class _ScriptLockstep(PlainDispatchMode):
    """For TorchScript: replaces each batch-norm kernel of a known layer by the two-mode version."""

    def __init__(self, owners: dict[int, NormLayer], lockstep: _Lockstep) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._owners = owners
        self._lockstep = lockstep

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        layer = None
        if "batch_norm" in func.overloadpacket.__name__ and args and isinstance(args[0], torch.Tensor):
            layer = next(
                (
                    self._owners[a.data_ptr()]
                    for a in args[1:5]
                    if isinstance(a, torch.Tensor) and a.data_ptr() in self._owners
                ),
                None,
            )
        if layer is None:
            return func(*args, **kwargs)
        names = [argument.name for argument in func._schema.arguments]
        # CPU kernels call it eps, cuDNN's epsilon; both sit among the positional arguments.
        position = next((names.index(e) for e in ("eps", "epsilon") if e in names), len(args))
        eps = args[position] if position < len(args) else 1e-5
        weight, bias = args[1], args[2]
        rest: list[Any] = []

        def eval_forward(half: torch.Tensor) -> torch.Tensor:
            result = func(half, *args[1:], **kwargs)
            rest[:] = list(result[1:])
            return result[0]  # type: ignore[no-any-return]

        def train_forward(half: torch.Tensor) -> torch.Tensor:
            # Running statistics None: normalize with the batch's own, update nothing.
            result = torch.ops.aten.native_batch_norm(half, weight, bias, None, None, True, 0.0, eps)
            return result[0]  # type: ignore[no-any-return]

        stacked = self._lockstep.compare(layer, args[0], eval_forward, train_forward)
        if stacked is None:
            return func(*args, **kwargs)
        return (stacked, *rest)


@contextmanager
def _script_lockstep(layers: list[NormLayer], lockstep: _Lockstep) -> Iterator[None]:
    owners: dict[int, NormLayer] = {}
    for layer in layers:
        if layer.family is not NormFamily.BATCH or layer.is_frozen:
            continue  # other kernels behave the same in both modes, or cannot be told apart
        for tensor in (*layer.module.parameters(recurse=False), *layer.module.buffers(recurse=False)):
            if tensor.numel() and tensor.is_floating_point():
                owners.setdefault(tensor.data_ptr(), layer)
    with _ScriptLockstep(owners, lockstep):
        yield


def _check_stacking(model: nn.Module, layers: list[NormLayer], stacked: Batch, num_samples: int, output: Any) -> None:
    """Each half of the side-by-side output against a plain forward in that mode alone.

    The plain forwards run on the same stacked batch (x; x): the same shapes pick the same
    kernels (cuDNN and TF32 results depend on the batch size), and with two identical copies a
    module that mixes samples computes what it would on x alone. Only mixing *between the two
    different halves* of the side-by-side run makes them disagree.
    """
    halves = _stacked_outputs(output, num_samples)
    if not halves:
        return
    for is_train in (False, True):
        with preserved_state(model):
            set_norm_layers_training(model, layers if is_train else [])
            scratch = StatisticsRecorder()
            scratch.start_batch()
            plain = _stacked_outputs(_forward(model, stacked, scratch), num_samples)
        for side_by_side, alone in zip(halves, plain, strict=False):
            rows = side_by_side.shape[0] // 2
            part = slice(rows, None) if is_train else slice(None, rows)
            if not _close(side_by_side[part], alone[part], _TRAIN_TOLERANCE if is_train else _EVAL_TOLERANCE):
                mode = "train" if is_train else "eval"
                raise ModeComparisonError(
                    f"the model's {mode}-mode output changes when another batch runs beside it, "
                    "so some module mixes the samples of a batch",
                    "Comparing modes side by side needs a model whose samples are independent; "
                    "compare separate inspect runs in --mode eval and --mode train instead",
                )


def _stacked_outputs(output: Any, num_samples: int) -> list[torch.Tensor]:
    leaves = pytree.tree_leaves(output)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point() and _is_stacked(t, num_samples)]


def _is_stacked(tensor: torch.Tensor, num_samples: int) -> bool:
    """A tensor whose dim 0 holds both copies of the batch: 2N rows, or 2N x T after a reshape
    that folds other dims into the batch (the halves stay contiguous either way)."""
    return num_samples > 0 and tensor.dim() > 0 and tensor.shape[0] > 0 and tensor.shape[0] % (2 * num_samples) == 0


def _close(a: torch.Tensor, b: torch.Tensor, tolerance: float) -> bool:
    if a.shape != b.shape:
        return False
    both_nan = a.isnan() & b.isnan()
    a, b = a.masked_fill(both_nan, 0), b.masked_fill(both_nan, 0)
    difference = float(torch.linalg.vector_norm(a - b, dtype=torch.float64))
    scale = float(torch.linalg.vector_norm(b, dtype=torch.float64))
    return difference <= tolerance * scale or difference == 0.0


def _entry(layer: NormLayer, call: int, sums: _Sums, recorder: StatisticsRecorder, num_samples: int) -> LayerModeGap:
    record = recorder.records.get((layer.name, call))
    moments = record.moments if record is not None else None
    values_per_channel = max_z = mean_z = worst_ratio = found = None
    if moments is not None:
        values_per_channel = moments.values_per_channel
        if layer.running_mean is not None and layer.running_var is not None:
            mean, var = _floats(moments.mean), _floats(moments.biased_var())
            z = shift.mean_shift_z(mean, layer.running_mean, layer.running_var, layer.eps or 0.0)
            max_z, mean_z = shift.max_abs(z), shift.mean_abs(z)
            worst_ratio = shift.worst_ratio(shift.var_ratio(var, layer.running_var))
            if num_samples and mean:
                found = measure(mean, var, layer.running_mean, layer.running_var, layer.eps or 0.0, num_samples)
    return LayerModeGap(
        name=Untrusted(layer.name),
        call=call,
        type=Untrusted(layer.type_name),
        family=layer.family.value,
        eval_uses=layer.normalizes_with(is_training=False),
        input_rel_diff=sums.ratio("input_diff", "input"),
        output_rel_diff=sums.ratio("output_diff", "output"),
        own_rel_diff=sums.ratio("own_diff", "output"),
        values_per_channel=values_per_channel,
        max_abs_shift_z=max_z,
        mean_abs_shift_z=mean_z,
        worst_var_ratio=worst_ratio,
        departure=None if found is None else found.score,
        departure_tier=None if found is None else found.tier,
    )


def _floats(tensor: torch.Tensor) -> tuple[float, ...]:
    return tuple(float(v) for v in tensor.detach().to("cpu", torch.float64).tolist())
