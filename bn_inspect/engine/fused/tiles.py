"""How the fused kernel tiles its input: shared by the dispatcher and the Triton kernels."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TileConfig:
    """How the fused kernel splits its input (benchmarks/gpu_check.py measures the choices).

    Attributes:
        elements: values in one tile: enough to stream at full bandwidth, few enough that the
            running sums stay in registers.
        tiles_per_program: tiles one program walks through before it reduces and writes its
            partials: more means fewer partials to write and combine.
        max_block_c: channels side by side in a tile.
        num_warps: warps per program.
    """

    elements: int = 8192
    tiles_per_program: int = 16
    max_block_c: int = 64
    num_warps: int = 4


TILE = TileConfig()
