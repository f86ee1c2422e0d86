"""Launch tiles per kernel, and the sizes, branches and active heads of one call (`_Layout`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton

from ..config import Plan
from ..heads import HeadGroups
from .common import LOG2E, _interpret
from .launch import descriptors_available

# Tiles per kernel for the H200 (head dim 128, bf16): candidates that compile with little
# spill on Triton 3.6, timed at 32k by `bench/attention.py --sweep` (see bench/NOTES.md).
_GPU_TILES = {
    "score": {"BN": 32, "num_warps": 4},
    "window_fwd": {"BT": 64, "BK": 64, "BC": 64, "HP": 1, "num_warps": 4, "num_stages": 3},
    "sparse_fwd": {"num_warps": 2},
    "window_dq": {"BT": 32, "BK": 64, "BC": 64, "HP": 4, "num_warps": 8},
    "local_dkv": {"BT": 64, "BK": 64, "num_warps": 4},
    "global_dkv": {"BT": 64, "BC": 64, "num_warps": 4},
    "sparse_dq": {"num_warps": 2},
    "sparse_dkv": {"ROWS": 64, "CH": 256, "num_warps": 4},
    # tile-shared selection (select_tile > 1): rows are tokens x the padded group
    # (swept at 32k, 64 q / 4 KV heads, D 128: bench/NOTES.md)
    "tile_score": {"ROWS": 128, "BN": 32, "num_warps": 8},
    # the score on the global branch's lse, blocks outside the row chunks (swept at 32k,
    # 12/4/64 and 64/4/128: bench/RESULTS.md, eighteenth session)
    "tile_score_lse": {"ROWS": 64, "BN": 64, "num_warps": 4},
    "sparse_tile_fwd": {"ROWS": 64, "num_warps": 4, "num_stages": 3},
    "sparse_tile_dq": {"ROWS": 128, "num_warps": 8, "num_stages": 3},
    "sparse_tile_dkv": {"ROWS": 64, "CH": 256, "num_warps": 4},
}
# Small tiles under the interpreter, so that every loop runs more than once in the tests.
_CPU_TILES = {
    "BT": 32, "BK": 16, "BC": 16, "BN": 16, "ROWS": 32, "CH": 8, "HP": 2, "num_warps": 4
}  # fmt: skip


# The window kernels' tiles where the group size is not a multiple of their HP (packs of HP
# heads would run empty rows, e.g. a quarter of them at G = 3 with HP = 4).
_GPU_TILES_ONE_HEAD = {"BT": 64, "BK": 64, "BC": 64, "HP": 1, "num_warps": 4}


# Changes to the tiles above at head dim 64 and below, where a tile's MMAs are half as long
# (swept at 8k, 12 q / 4 KV heads, D 64: bench/NOTES.md, ninth session).
_GPU_TILES_D64 = {
    "window_dq": {"num_stages": 3},
    "local_dkv": {"num_stages": 3},
    "global_dkv": {"BC": 32},
    "sparse_tile_dq": {"ROWS": 64, "num_warps": 4, "num_stages": 3},
    "sparse_tile_dkv": {"ROWS": 32},
}


# Changes to the tiles above from LONG_NC compressed keys (T = 16k at stride 64), where every
# compressed tile streams many query rows and the triangle that a wide tile wastes (its first
# queries see only part of it) weighs little: the global dk/dv's 64-key tiles ran 491 -> 317 us
# at 12/4/64 32k and 140 -> 113 at 16k, but 49 -> 57 at 8k (bench/NOTES.md, sixteenth session).
_GPU_TILES_LONG = {"global_dkv": {"BC": 64}}
LONG_NC = 256


# Kernels that load their streamed tiles (k and v; the global dk/dv's q and dO) through TMA
# descriptors, from head dim TMA_MIN_D up: at D 128 each ran 4-17% faster than with pointer
# loads, at D 64 up to 9% slower, and the local dk/dv slower at both (bench/NOTES.md,
# thirteenth session). The interpreter follows the same rule.
_TMA_KERNELS = frozenset(
    {"window_fwd", "window_dq", "global_dkv", "sparse_tile_fwd", "sparse_tile_dq"}
)
TMA_MIN_D = 128


def _gpu_tiles(kernel: str, G: int | None = None, D: int | None = None, NC: int = 0) -> dict:
    """The GPU launch tiles of `kernel`; G (window kernels): the group size; D: the head dim;
    NC: the compressed keys of the call."""
    tiles = _GPU_TILES[kernel]
    if G is not None and G % tiles.get("HP", 1):
        tiles = _GPU_TILES_ONE_HEAD
    if D is not None and D <= 64:
        tiles = {**tiles, **_GPU_TILES_D64.get(kernel, {})}
    if NC >= LONG_NC:
        tiles = {**tiles, **_GPU_TILES_LONG.get(kernel, {})}
    return {"num_stages": 2, **tiles, "TMA": _tma(kernel, D)}


def _tma(kernel: str, D: int | None) -> bool:
    """Whether `kernel` loads through TMA descriptors at head dim D (`_TMA_KERNELS`)."""
    tma = kernel in _TMA_KERNELS and D is not None and D >= TMA_MIN_D
    return tma and descriptors_available()


def _tiles(kernel: str, G: int | None = None, D: int | None = None, NC: int = 0) -> dict:
    if _interpret():
        return dict(_CPU_TILES, num_stages=1, TMA=_tma(kernel, D))
    return _gpu_tiles(kernel, G, D, NC)


def _options(tiles: dict) -> dict:
    """The launch options (warps, stages) of a `_tiles` entry."""
    return {"num_warps": tiles["num_warps"], "num_stages": tiles["num_stages"]}


@dataclass(frozen=True)
class _HeadLists:
    A: int
    NA: int
    active: torch.Tensor  # [HQ] int32 on the device, 1 where a head is active
    groups: torch.Tensor  # [NA] int32, the KV heads of the groups with an active head
    group_heads: list[list[int]]  # on the host: the active heads of each group in `groups`
    bits: torch.Tensor  # [HKV] int64: bit g of entry j set where head j * G + g is active
    _packs: dict = field(default_factory=dict)

    def packs(self, HP: int) -> torch.Tensor:
        """[NP, HP] int32 on the device: the active heads of each group in packs of HP (the
        window kernels' programs), -1 where a group's last pack is short. Built from host
        lists (no device read), once per HP."""
        if HP not in self._packs:
            rows = [
                (heads[i : i + HP] + [-1] * HP)[:HP]
                for heads in self.group_heads
                for i in range(0, len(heads), HP)
            ]
            rows = rows or [[-1] * HP]
            self._packs[HP] = torch.tensor(rows, dtype=torch.int32).to(self.active.device)
        return self._packs[HP]


_HEAD_LISTS: dict[tuple, _HeadLists] = {}


def _head_lists(
    head_mask: torch.Tensor | None, HQ: int, HKV: int, device: torch.device
) -> _HeadLists:
    """The device's head and group lists for a host mask, built once per mask: no copy to the
    device per call (nor any while a CUDA graph is being captured)."""
    key = (None if head_mask is None else tuple(head_mask.tolist()), HQ, HKV, str(device))
    lists = _HEAD_LISTS.get(key)
    if lists is None:
        host = torch.ones(HQ, dtype=torch.bool) if head_mask is None else head_mask
        geometry = HeadGroups(HQ, HKV)
        G = geometry.size
        by_group = geometry.by_group(host.nonzero().flatten().tolist())
        lists = _HeadLists(
            A=int(host.sum()),
            NA=len(by_group),
            active=host.to(torch.int32).to(device),
            groups=torch.tensor(list(by_group), dtype=torch.int32).to(device),
            group_heads=list(by_group.values()),
            # the bits' sum is their OR; bit 63 (a 64th head) wraps to int64's sign as it should
            bits=(host.view(HKV, G).to(torch.int64) << torch.arange(G)).sum(1).to(device),
        )
        # the packs the window kernels will launch with, now: none is then copied to the
        # device while a CUDA graph is being captured
        for kernel in ("window_fwd", "window_dq"):
            lists.packs(_tiles(kernel, G)["HP"])
        if len(_HEAD_LISTS) > 1024:  # masks change only at pruning decisions
            _HEAD_LISTS.clear()
        _HEAD_LISTS[key] = lists
    return lists


class _Layout:
    """Sizes, effective branches and active heads of one call."""

    def __init__(
        self, q: torch.Tensor, k: torch.Tensor, plan: Plan, head_mask: torch.Tensor | None
    ):
        self.B, self.T, self.HQ, self.D = q.shape
        self.HKV = k.shape[2]
        self.G = self.HQ // self.HKV
        self.plan = plan
        self.scale = self.D**-0.5
        self.scale2 = self.scale * LOG2E
        self.prec = "ieee" if q.dtype == torch.float32 else "tf32"
        # a branch with nothing to read (no complete block yet) is dropped: its output is 0
        self.NC = self.T // plan.stride if plan.has_global else 0
        self.NB = self.T // plan.block_size
        self.NT = -(-self.T // plan.select_tile)  # selection tiles
        self.has_local = plan.has_local
        self.has_global = self.NC > 0
        self.has_sparse = plan.has_sparse and self.NB > 0
        heads = _head_lists(head_mask, self.HQ, self.HKV, q.device)
        self.partial = head_mask is not None
        self.A, self.NA = heads.A, heads.NA
        self.active, self.groups, self.bits = heads.active, heads.groups, heads.bits
        self.packs = heads.packs
        self.has_window = self.has_local or self.has_global  # the window kernels run
        self.any = self.A > 0 and (self.has_window or self.has_sparse)
        # padded group sizes: tl.dot needs 16 rows; the score and dk/dv kernels stack tokens
        self.GP = triton.next_power_of_2(self.G)
        self.GP16 = max(16, self.GP)
        self.stride = max(plan.stride, 1)  # 1 stands in when the global branch is absent
        self.BSP = max(16, plan.block_size)  # key block padded to tl.dot's 16 rows
        # arguments that every attention kernel takes
        self.args = dict(
            scale2=self.scale2, HQ=self.HQ, HKV=self.HKV, G=self.G, D=self.D, PREC=self.prec
        )

    def tiles(self, kernel: str) -> dict:
        """The launch tiles of `kernel` for this call's group size, head dim and prefix."""
        return _tiles(kernel, self.G, self.D, self.NC)
