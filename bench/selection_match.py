"""How often the op's tile-shared selection differs from the float32 reference, by path.

    python bench/selection_match.py [--points 12/4/64:16384:nsa:64 ...]

The op scores blocks with float32 means on bf16 queries; where the global stride is the block
size it may normalise them by the global branch's lse (bf16 pooled keys) instead of a pass of
its own (`autograd.SELECT_AFTER_NC`). Per point (heads/KV heads/head dim : T : budget :
select_tile), both paths on the same inputs: the fraction of selection slots whose block is not
in the reference's set for that tile (`selection.select_tiles` in float32).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, as `kernels`
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tile_shapes import point_inputs  # noqa: E402

from kernels.parallel import autograd  # noqa: E402
from kernels.parallel.layout import _Layout  # noqa: E402
from kernels.selection import select_tiles  # noqa: E402


def mismatch(got: torch.Tensor, want: torch.Tensor) -> float:
    """Fraction of real reference slots whose block is missing from the same row of `got`."""
    got, want = got.long(), want.long()
    real = want >= 0
    found = (want[..., :, None] == got[..., None, :]).any(-1)
    return ((~found) & real).sum().item() / max(real.sum().item(), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", nargs="+", default=["12/4/64:16384:nsa:64"])
    args = ap.parse_args()
    print("| point | two passes | global lse | slots |")
    print("| --- | --- | --- | --- |")
    for point in args.points:
        cfg, (q, k, v, gate, _) = point_inputs(point)
        q, k, v, gate = (x.detach() for x in (q, k, v, gate))
        plan = cfg.plan(q.shape[1])
        want = select_tiles(q, k, plan)
        row = []
        for after_nc in (10**9, 0):
            autograd.SELECT_AFTER_NC = after_nc
            _, saved = autograd.mla_fwd(q, k, v, gate, _Layout(q, k, plan, None), store=True)
            row.append(mismatch(saved["idx"], want))
        n = int((want >= 0).sum())
        print(f"| {point} | {row[0]:.2e} | {row[1]:.2e} | {n} |", flush=True)


if __name__ == "__main__":
    main()
