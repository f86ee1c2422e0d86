"""What one training forward of the 125M model keeps for its backward, dense attention against
MLA, per layer: each saved tensor's storage counted once (parameters left out), in bytes at
--seq and scaled to --at (at batch 1 every activation kept here is linear in T). The peak
memory that train_throughput.py measures on the GPU is this plus the parameters, the optimizer
state and the backward's transients; this says which tensors make the difference.

On CUDA it runs the model as trained. On CPU (run it with TRITON_INTERPRET=1) the MLA op takes
its Triton path in the interpreter, and dense attention the grouped SDPA call that CUDA makes
(the CPU path repeats k and v for speed, which would count two tensors CUDA never keeps).

    TRITON_INTERPRET=1 python bench/saved_memory.py [--seq 1024] [--at 32768] [--layers 2]
"""

from __future__ import annotations

import argparse
import collections

import torch
import torch.nn.functional as F
from budgets import budget_config

from automla.trainers import ModelConfig
from automla.trainers.model import Attention, build_model


def _grouped_sdpa(q, k, v, G):
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=G > 1
    )
    return y.transpose(1, 2)


def saved_per_layer(attention: str, args, device: torch.device) -> tuple[dict, dict]:
    """Bytes kept per block (scaled to --at), and per block the largest storages as
    (bytes, shape, dtype, saving node)."""
    cfg = ModelConfig(
        vocab_size=args.vocab, d_model=768, n_layers=args.layers, n_heads=12, n_kv_heads=4,
        head_dim=64, max_seq_len=args.seq, attention=attention,
        mla=budget_config(args.seq, "nsa", args.select_tile),
        attn_backend="triton" if device.type == "cpu" else "auto",
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    names = {m: n for n, m in model.named_modules()}
    where: list[str] = []  # the module stack, to tell which block saved a tensor
    for m in model.modules():
        m.register_forward_pre_hook(lambda mod, _: where.append(names[mod]))
        m.register_forward_hook(lambda mod, _i, _o: where.pop() and None)
    seen: dict[int, tuple] = {}  # storage -> (block, bytes, shape, dtype)

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            block = next((w.split(".")[1] for w in reversed(where) if w.startswith("blocks.")), "-")
            seen[ptr] = (block, t.untyped_storage().nbytes(), tuple(t.shape), t.dtype)
        return t

    x = torch.randint(0, args.vocab, (1, args.seq), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    with autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, x)
    scale = args.at / args.seq
    total: dict = collections.Counter()
    largest: dict = collections.defaultdict(list)
    for block, nbytes, shape, dtype in seen.values():
        # weight casts (no dimension of T or T / 64) do not grow with T
        grows = any(s in (args.seq, args.seq // 64) for s in shape)
        total[block] += nbytes * scale if grows else nbytes
        largest[block].append((nbytes * scale if grows else nbytes, shape, dtype))
    return total, largest


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=1024, help="the sequence the forward runs")
    ap.add_argument("--at", type=int, default=32768, help="the sequence bytes are scaled to")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--select-tile", type=int, default=64)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        Attention._sdpa = staticmethod(_grouped_sdpa)
    dense, _ = saved_per_layer("dense", args, device)
    mla, largest = saved_per_layer("mla", args, device)
    mb = 1e6
    print(f"| block | dense MB at {args.at} | MLA MB | MLA - dense |")
    print("| --- | --- | --- | --- |")
    for block in sorted(set(dense) | set(mla)):
        d, m = dense[block], mla[block]
        print(f"| {block} | {d / mb:.1f} | {m / mb:.1f} | {(m - d) / mb:+.1f} |")
    print("\nMLA block 0's largest kept storages (MB, shape at --seq, dtype):")
    for nbytes, shape, dtype in sorted(largest["0"], key=lambda r: -r[0])[:12]:
        print(f"  {nbytes / mb:8.1f}  {list(shape)}  {str(dtype).replace('torch.', '')}")


if __name__ == "__main__":
    main()
