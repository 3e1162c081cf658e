"""Tiny deterministic models for every case bn-inspect must handle, with trained-looking statistics."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def randomize_norm_state(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every normalization layer non-trivial running statistics and affine terms."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name in ("running_mean", "weight", "bias"):
                tensor = getattr(module, name, None)
                if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.numel():
                    tensor.copy_(
                        torch.randn(tensor.shape, generator=generator) * 0.5 + (1.0 if name == "weight" else 0)
                    )
            running_var = getattr(module, "running_var", None)
            if isinstance(running_var, torch.Tensor):
                running_var.copy_(torch.rand(running_var.shape, generator=generator) * 2 + 0.1)
            tracked = getattr(module, "num_batches_tracked", None)
            if isinstance(tracked, torch.Tensor):
                tracked.fill_(100)
    return model


class ConvBN2d(nn.Module):
    """Conv2d -> BatchNorm2d -> ReLU(inplace) -> Conv2d -> BatchNorm2d: input (N, 3, H, W)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))


class ResidualStack(nn.Module):
    """Conv stem and three residual blocks (conv -> BN -> ReLU -> conv -> BN, plus the block's input), in a
    custom forward as a ResNet's: input (N, 3, H, W), seven BatchNorm2d, each depending on the ones before."""

    def __init__(self, width: int = 8, num_blocks: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "conv1": nn.Conv2d(width, width, 3, padding=1),
                    "bn1": nn.BatchNorm2d(width),
                    "conv2": nn.Conv2d(width, width, 3, padding=1),
                    "bn2": nn.BatchNorm2d(width),
                }
            )
            for _ in range(num_blocks)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        for block in self.blocks:
            inner = torch.relu(block["bn1"](block["conv1"](x)))
            x = torch.relu(block["bn2"](block["conv2"](inner)) + x)
        return x


class BN1dFeatures(nn.Module):
    """BatchNorm1d on (N, C) features."""

    def __init__(self, features: int = 5) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)


class BN1dSequence(nn.Module):
    """BatchNorm1d on (N, C, L)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)


class BN3dVolume(nn.Module):
    """BatchNorm3d on (N, C, D, H, W)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm3d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)


class SharedBN(nn.Module):
    """One BatchNorm2d called twice per forward, and one that is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.unused = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.bn(x) * 2 + 1)


class KeywordCall(nn.Module):
    """Calls its BatchNorm with the input as a keyword argument."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(input=x)


class Family(nn.Module):
    """InstanceNorm (tracking and not), GroupNorm, LayerNorm and RMSNorm side by side."""

    def __init__(self) -> None:
        super().__init__()
        self.inorm = nn.InstanceNorm2d(4, affine=True, track_running_stats=True)
        self.inorm_plain = nn.InstanceNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm(5)
        self.rms = nn.RMSNorm(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gn(self.inorm_plain(self.inorm(x)))
        return self.rms(self.ln(y[..., :5]))


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over C of an NCHW map, as ConvNeXt's LayerNorm2d: normalizes a permuted view."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class ChannelLayerNormCopy(nn.LayerNorm):
    """As ChannelLayerNorm, but the kernel gets a contiguous copy: only the sizes are left to match."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.layer_norm(x.permute(0, 2, 3, 1).contiguous(), self.normalized_shape, self.weight, self.bias)
        return y.permute(0, 3, 1, 2)


class ChannelRMSNorm(nn.RMSNorm):
    """RMSNorm over C of an (N, C, L) sequence, through a transposed view."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.transpose(1, 2), self.normalized_shape, self.weight, self.eps).transpose(1, 2)


class ArithmeticLayerNorm(nn.LayerNorm):
    """A LayerNorm subclass that normalizes over C with its own arithmetic: no kernel call to watch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x, dim=1, correction=0, keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps)


class ChannelNorms(nn.Module):
    """Channel-wise LayerNorm and RMSNorm subclasses, next to a plain LayerNorm on tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.ln_view = ChannelLayerNorm(6)
        self.ln_copy = ChannelLayerNormCopy(6)
        self.ln_tokens = nn.LayerNorm(6)
        self.rms_view = ChannelRMSNorm(6)
        self.ln_own = ArithmeticLayerNorm(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_own(self.ln_copy(self.ln_view(self.conv(x))))
        tokens = self.ln_tokens(y.flatten(2).transpose(1, 2))
        return self.rms_view(tokens.transpose(1, 2))


class Untracked(nn.Module):
    """BatchNorm without running statistics: normalizes with batch statistics even in eval."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3, track_running_stats=False, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)


class LazyConvBN(nn.Module):
    """LazyConv2d -> LazyBatchNorm2d: nothing is materialized before the first forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.LazyConv2d(4, 3)
        self.bn = nn.LazyBatchNorm2d()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class Raises(nn.Module):
    """Runs one BatchNorm, then fails."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.bn(x)
        raise RuntimeError("deliberate failure after bn")


class FunctionalBN(nn.Module):
    """Calls F.batch_norm with its own buffers: there is no module to hook."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(3))
        self.register_buffer("var", torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.mean, self.var, training=self.training)


class NoNorm(nn.Module):
    """A model without any normalization layer."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class Versioned(nn.Module):
    """Refuses a state_dict without its module version, as torchvision's MNASNet does."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):  # type: ignore[no-untyped-def]
        if local_metadata.get("version") != 2:
            raise ValueError(f"version should be 2 instead of {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3×3 conv-BN pairs and a shortcut (1×1 conv-BN where the shape changes)."""

    def __init__(self, inputs: int, outputs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.downsample = (
            nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))
            if stride != 1 or inputs != outputs
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + shortcut)


class TinyResNet(nn.Module):
    """A ResNet in miniature, many norms of one shape: stem (8 channels), layer1 (4 blocks of 8 channels,
    the stem's shape), layer2 (2 blocks of 16 channels at half the size): 14 BatchNorm2d. Input (N, 3, 8, 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(*(BasicBlock(8, 8) for _ in range(4)))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16))
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x)))))
        return self.fc(x.mean(dim=(2, 3)))


def resnet_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two halves of one ``make_input((256, 3, 8, 8))`` draw: 128 samples to calibrate on, 128 to inspect."""
    data = make_input((256, 3, 8, 8), seed=seed)
    return data[:128], data[128:]


def calibrated_resnet(seed: int = 0) -> TinyResNet:
    """A TinyResNet whose running statistics are exactly those of ``resnet_data(seed)[0]`` (a cumulative
    average over one batch), marked as long trained, in eval mode: the other half sits within them."""
    torch.manual_seed(seed)
    model = TinyResNet()
    norms = [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    for norm in norms:
        norm.momentum = None
    model.train()
    with torch.no_grad():
        model(resnet_data(seed)[0])
        for norm in norms:
            norm.momentum = 0.1
            norm.num_batches_tracked.fill_(1000)
    return model.eval()


def make_input(shape: tuple[int, ...], *, mean: float = 0.0, std: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Normal data with a different offset per channel (dim 1), drawn in float64 then rounded to float32."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * std
    channel_offsets = torch.randn(shape[1], generator=generator, dtype=torch.float64) * std * 3
    x = x + mean + channel_offsets.view(1, -1, *([1] * (len(shape) - 2)))
    return x.float()


def uneven_batches(
    sizes: tuple[int, ...] = (1, 5, 2, 9, 3), seed: int = 0, *, draw: Callable[[int, int], torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """Batches of the given sizes, in order.

    By default one ``make_input`` draw of (3, 6, 5) samples around 2.0 (std 1.5) from ``seed``, split
    into the batches. With ``draw``, batch i is ``draw(size, seed + i)``: each batch has a seed of its
    own, so a test can remake any one of them alone.
    """
    if draw is not None:
        return [draw(size, seed + index) for index, size in enumerate(sizes)]
    data = make_input((sum(sizes), 3, 6, 5), mean=2.0, std=1.5, seed=seed)
    return list(data.split(list(sizes)))


def qat_digits(freeze_bn: bool = False) -> nn.Module:
    """The sample DigitsCNN fused and prepared for quantization-aware training (an --arch for its state_dict).

    Conv+BN+ReLU twice as ConvBnReLU2d, Conv+BN once as ConvBn2d (its ReLU stays separate), each
    BatchNorm the child ``bn`` of its fused module; ``freeze_bn`` freezes their statistics.
    """
    import torch.ao.quantization as quantization

    from sample_models.architectures import DigitsCNN

    model = DigitsCNN().train()
    quantization.fuse_modules_qat(
        model,
        [
            ["features.0", "features.1", "features.2"],
            ["features.3", "features.4"],
            ["features.7", "features.8", "features.9"],
        ],
        inplace=True,
    )
    model.qconfig = quantization.get_default_qat_qconfig("fbgemm")  # type: ignore[assignment]
    quantization.prepare_qat(model, inplace=True)
    if freeze_bn:
        from torch.ao.nn.intrinsic.qat import freeze_bn_stats

        model.apply(freeze_bn_stats)
    return model


class LinearBNHead(nn.Module):
    """Linear+BatchNorm1d on flattened 8x8 digits, for LinearBn1d once fused."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 24)
        self.bn = nn.BatchNorm1d(24)
        self.out = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.bn(self.fc(torch.flatten(x, 1)))))


def qat_linear_head() -> nn.Module:
    """LinearBNHead prepared for quantization-aware training: ``fc`` a LinearBn1d holding ``bn``."""
    import torch.ao.quantization as quantization

    model = LinearBNHead().train()
    quantization.fuse_modules_qat(model, [["fc", "bn"]], inplace=True)
    model.qconfig = quantization.get_default_qat_qconfig("fbgemm")  # type: ignore[assignment]
    quantization.prepare_qat(model, inplace=True)
    return model
