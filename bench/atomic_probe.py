"""How fast float32 tiles add atomically on the GPU, against plain stores and the reads they would
replace: the question before a tile-order sparse backward (bench/NOTES.md, eighteenth and
nineteenth sessions; the kernel it was for lost, twentieth).

    python bench/atomic_probe.py [--T 32768] [--hkv 4] [--G 3] [--D 64] [--hp 1]

The sparse dk/dv today runs per key block over the tiles that chose it, re-reading each tile's
q and dO rows once per block (the `reads` row). In tile order (the kernel tried) a
program holds hp heads of its tile's rows and adds each selected block's dk and dv, [block, D]
float32 each, atomically: `atomic adds` with `tl.atomic_add`, `TMA adds` with a descriptor's
(a TMA reduction, as the kernel does), at random blocks, as i.i.d. inputs select them; G // hp
programs per tile. `stores` writes the same bytes to distinct places: the rate an add could
reach at best. Times are device medians (do_bench).
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl


@triton.jit
def _add_tiles(
    idx, dk, dv, NSEL: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, ADD: tl.constexpr
):
    # One (tile, group) program: a [BS, D] tile into dk and dv at each of its NSEL blocks
    # (ADD: atomically, relaxed, into the shared buffers; else stored to its own rows).
    p = tl.program_id(0)
    o = tl.arange(0, BS)[:, None] * D + tl.arange(0, D)[None, :]
    b_x = tl.full([BS, D], 1.0, tl.float32) * (p % 7 + 1)
    for i in range(NSEL):
        if ADD:
            row = tl.load(idx + p * NSEL + i).to(tl.int64) * BS * D
            tl.atomic_add(dk + row + o, b_x, sem="relaxed")
            tl.atomic_add(dv + row + o, b_x * 0.5, sem="relaxed")
        else:
            row = (p * NSEL + i).to(tl.int64) * BS * D
            tl.store(dk + row + o, b_x)
            tl.store(dv + row + o, b_x * 0.5)


@triton.jit
def _add_tiles_tma(idx, dk, dv, NSEL: tl.constexpr, BS: tl.constexpr, D: tl.constexpr):
    # `_add_tiles`' adds through TMA descriptors of dk and dv ([blocks * BS, D], [BS, D] boxes).
    p = tl.program_id(0)
    b_x = tl.full([BS, D], 1.0, tl.float32) * (p % 7 + 1)
    for i in range(NSEL):
        row = tl.load(idx + p * NSEL + i) * BS
        dk.atomic_add([row, 0], b_x)
        dv.atomic_add([row, 0], b_x * 0.5)


@triton.jit
def _read_rows(tiles, q, do, out, ROWS: tl.constexpr, D: tl.constexpr):
    # One (block, tile) pair of the block-order dk/dv: the tile's q and dO rows, read (summed,
    # so that the loads are kept).
    p = tl.program_id(0)
    row = tl.load(tiles + p).to(tl.int64) * ROWS * D
    o = tl.arange(0, ROWS)[:, None] * D + tl.arange(0, D)[None, :]
    b_s = tl.load(q + row + o).to(tl.float32) + tl.load(do + row + o).to(tl.float32)
    tl.store(out + p, tl.sum(b_s))


def probe(
    T: int, hkv: int, G: int, D: int, hp: int = 1, bq: int = 64, bs: int = 64, nsel: int = 16
) -> list:
    from triton.tools.tensor_descriptor import TensorDescriptor

    dev = torch.device("cuda")
    n_tiles, n_blocks = T // bq * hkv * (G // hp), T // bs * hkv  # "tiles": adding programs
    rows = bq * hp  # a program's query rows
    gen = torch.Generator(device=dev).manual_seed(0)
    idx = torch.randint(0, n_blocks, (n_tiles, nsel), device=dev, generator=gen, dtype=torch.int32)
    pairs = n_tiles * nsel
    dk = torch.zeros(n_blocks * bs * D, device=dev)
    dv = torch.zeros_like(dk)
    out_k = torch.empty(pairs * bs * D, device=dev)
    out_v = torch.empty_like(out_k)
    q = torch.randn(n_tiles * rows * D, device=dev, dtype=torch.bfloat16)
    do = torch.randn_like(q)
    tiles = torch.randint(0, n_tiles, (pairs,), device=dev, generator=gen, dtype=torch.int32)
    sums = torch.empty(pairs, device=dev)
    tile_bytes = 2 * bs * D * 4 * pairs
    dk_t, dv_t = (
        TensorDescriptor(x.view(-1, D), [n_blocks * bs, D], [D, 1], [bs, D]) for x in (dk, dv)
    )
    runs = [
        ("atomic adds", tile_bytes, lambda: _add_tiles[(n_tiles,)](idx, dk, dv, nsel, bs, D, True)),
        ("TMA adds", tile_bytes, lambda: _add_tiles_tma[(n_tiles,)](idx, dk_t, dv_t, nsel, bs, D)),
        ("stores", tile_bytes, lambda: _add_tiles[(n_tiles,)](idx, out_k, out_v, nsel, bs, D, False)),
        ("reads", 2 * rows * D * 2 * pairs, lambda: _read_rows[(pairs,)](tiles, q, do, sums, rows, D)),
    ]  # fmt: skip
    table = []
    for name, nbytes, fn in runs:
        ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
        table.append((name, nbytes / 1e9, ms, nbytes / ms / 1e6))
    torch.cuda.synchronize()
    # the adds arrived: each block's dk holds the sum of what its selecting programs added
    adds = _expected(idx, n_blocks)
    reps = dk.view(n_blocks, -1)[:, 0] / adds.clamp_min(1e-30)
    assert torch.all((adds == 0) | (reps - reps[adds > 0][0]).abs().lt(1e-3 * reps.abs() + 1))
    return table


def _expected(idx: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Per block, what one call adds to the first element of its dk tile."""
    p = torch.arange(idx.shape[0], device=idx.device)
    value = (p % 7 + 1).float()[:, None].expand_as(idx)
    return torch.zeros(n_blocks, device=idx.device).index_add_(
        0, idx.flatten().long(), value.flatten()
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, default=32768)
    ap.add_argument("--hkv", type=int, default=4)
    ap.add_argument("--G", type=int, default=3, help="query heads per KV head")
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--hp", type=int, default=1, help="heads a program holds (divides G)")
    args = ap.parse_args()
    table = probe(args.T, args.hkv, args.G, args.D, args.hp)
    print(
        f"{torch.cuda.get_device_name()}: T {args.T}, {args.hkv} KV heads, G {args.G}, D {args.D}, "
        f"{args.hp} heads a program"
    )
    print("| kernel | GB | ms | GB/s |\n| --- | --- | --- | --- |")
    for name, gb, ms, rate in table:
        print(f"| {name} | {gb:.2f} | {ms:.3f} | {rate:.0f} |")


if __name__ == "__main__":
    main()
