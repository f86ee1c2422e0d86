"""Sequence parallelism for the 125M model: All-to-All volume per layer and per-rank memory.

    python bench/sequence_parallel.py [--seq 131072 262144] [--ranks 1 2 4] [--json out.json]
    python bench/sequence_parallel.py --time     # adds each rank's layer time, on one device
    python bench/sequence_parallel.py --tiny --time   # a CPU smoke run of the script itself

Everything is read off the real code path (`automla.trainers.sequence_parallel`) on meta
tensors, run by one rank whose exchanges are stand-ins that only count what they would send:
- a2a MiB/layer: bytes one rank sends to the others in one transformer layer (forward: k/v,
  q + gate, outputs; backward: the same three the other way), bf16, one sequence per step.
- saved GiB: activations the autograd graph keeps for the backward over the whole model
  (saved-tensor hooks, each storage counted once, weights excluded), bf16 throughout, the MLA
  op standing in by what the Triton op saves of its inputs (q, k, v, gate; its per-row
  statistics are a few floats per query and head, not counted).
- states GiB: fp32 weights, gradients and AdamW's two moments, replicated on every rank.
With --time, the forward + backward of one layer on this machine's device, at one rank's share
(its T/P tokens outside attention, all T tokens of its KV groups inside), the exchanges
replaced by zero-filled buffers: the compute each rank does per layer, without communication.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field

import torch
from train_throughput import Variant, model_config

from automla.kernels import AttentionConfig
from automla.trainers import ModelConfig
from automla.trainers.model import Block, build_model, rotary_table
from automla.trainers.sequence_parallel import SequenceParallel, split_groups

HEADS = (12, 4, 64)  # query heads, KV heads, head dim: bench/train_throughput.py's 125M model


class _Done:
    def wait(self) -> None:
        pass


@dataclass
class DrySequenceParallel(SequenceParallel):
    """Rank `rank` of `size`, alone: each exchange returns a zero-filled buffer of the size it
    would receive and adds what it would send to the other ranks to `sent[phase]`."""

    phase: str = "forward"
    sent: dict[str, int] = field(default_factory=lambda: {"forward": 0, "backward": 0})

    def exchange(self, send, send_sizes, recv_sizes):
        self.sent[self.phase] += (sum(send_sizes) - send_sizes[self.rank]) * send.element_size()
        return send.new_zeros(sum(recv_sizes)), _Done()


class _SavedOp(torch.autograd.Function):
    """The MLA op's memory stand-in on meta tensors: keeps q, k, v and gate like the Triton op."""

    @staticmethod
    def forward(ctx, q, k, v, gate):
        ctx.save_for_backward(q, k, v, gate)
        return torch.empty_like(q)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, gate = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(gate)


def _on_meta(module: torch.nn.Module) -> torch.nn.Module:
    """Weights on the meta device in bf16; the head masks' host copies stay on the CPU."""
    module.to("meta")
    for t in [*module.parameters(), *module.buffers()]:
        if t.is_floating_point():
            t.data = t.data.to(torch.bfloat16)
    return module


def config(T: int, tiny: bool, select_tile: int = 1) -> ModelConfig:
    if tiny:
        mla = AttentionConfig(
            budget=64, ratios=(0.5, 0.25, 0.25), block_size=16, select_tile=select_tile
        )
        return ModelConfig(
            vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=T, mla=mla
        )
    return model_config(Variant("mla", select_tile), T, False, HEADS)


def layer_volume(cfg: ModelConfig, T: int, P: int) -> dict[str, float]:
    """Bytes rank 0 sends in one layer's forward and backward (meta tensors, bf16)."""
    sp = DrySequenceParallel(size=P, rank=0, group=None, seq_len=T)
    block = _on_meta(Block(cfg))
    block.attn.sequence_parallel = sp
    block.attn._attend = lambda q, k, v, gate, mask: _SavedOp.apply(q, k, v, gate)
    tl = sp.shard_len(T)
    x = torch.zeros(1, tl, cfg.d_model, device="meta", dtype=torch.bfloat16, requires_grad=True)
    rot = sp.rotary(rotary_table(T, cfg.head_dim, cfg.rope_base), tl).to("meta")
    y = block(x, rot)
    sp.phase = "backward"
    y.backward(torch.empty_like(y))
    return {k: v / 2**20 for k, v in sp.sent.items()}


def saved_bytes(cfg: ModelConfig, T: int, P: int) -> tuple[float, int]:
    """Bytes of activations saved for the backward by rank 0's whole model at T/P tokens, and
    the parameter count."""
    sp = DrySequenceParallel(size=P, rank=0, group=None, seq_len=T)
    model = build_model(cfg)
    n_params = model.num_params()  # before the move, which unties the embedding
    model = _on_meta(model)
    model.set_sequence_parallel(sp if P > 1 else None)
    for block in model.blocks:
        block.attn._attend = lambda q, k, v, gate, mask: _SavedOp.apply(q, k, v, gate)
    params = {id(p) for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) not in params and id(t) not in params:
            seen[id(base)] = base.numel() * base.element_size()
        return t

    tl = sp.shard_len(T)
    idx = torch.zeros(1, tl, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(idx)[0]
        # the trainer's loss reads the logits in float32
        torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), idx.flatten())
    return float(sum(seen.values())), n_params


def layer_ms(cfg: ModelConfig, T: int, P: int, device: torch.device, steps: int) -> float:
    """Median forward + backward of one layer at rank 0's share, exchanges zero-filled."""
    sp = DrySequenceParallel(size=P, rank=0, group=None, seq_len=T) if P > 1 else None
    torch.manual_seed(0)
    block = Block(cfg).to(device)
    block.attn.sequence_parallel = sp
    tl = sp.shard_len(T) if sp else T
    rope = rotary_table(T, cfg.head_dim, cfg.rope_base).to(device)
    rot = sp.rotary(rope, tl) if sp else rope
    x = torch.randn(1, tl, cfg.d_model, device=device, requires_grad=True)
    grad = torch.randn_like(x)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            y = block(x, rot)
        y.backward(grad)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def kv_groups(cfg: ModelConfig, P: int) -> str:
    groups = split_groups(cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, P).kv
    return "/".join(str(hi - lo) for lo, hi in groups)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[131072, 262144])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--time", action="store_true", help="also time one layer per rank share")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="small model and T: checks the script")
    ap.add_argument(
        "--select-tile", type=int, default=1, help="MLA's select_tile (64: the tile-shared kernels)"
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seqs = [255, 512] if args.tiny else args.seq
    rows = []
    for T in seqs:
        cfg = config(T, args.tiny, args.select_tile)
        for P in args.ranks:
            if P > 1 and cfg.n_kv_heads < P:
                print(f"skip P={P}: {cfg.n_kv_heads} KV groups cannot go one or more per rank")
                continue
            vol = layer_volume(cfg, T, P) if P > 1 else {"forward": 0.0, "backward": 0.0}
            saved, params = saved_bytes(cfg, T, P)
            row = {
                "T": T,
                "P": P,
                "tokens_per_rank": -(-T // P),
                "kv_groups_per_rank": kv_groups(cfg, P),
                "a2a_fwd_mb_per_layer": vol["forward"],
                "a2a_bwd_mb_per_layer": vol["backward"],
                "a2a_mb_per_step": (vol["forward"] + vol["backward"]) * cfg.n_layers,
                "saved_gb": saved / 2**30,
                "states_gb": 16 * params / 2**30,
                "params": params,
            }
            if args.time:
                try:
                    row["layer_ms"] = layer_ms(cfg, T, P, device, args.steps)
                except torch.OutOfMemoryError as e:  # recorded: the rows after it still run
                    row["layer_ms"] = float("nan")
                    row["error"] = f"out of memory: {str(e)[:120]}"
                    torch.cuda.empty_cache()
                row["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
            rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(table(rows, args.time))


def table(rows: list[dict], timed: bool) -> str:
    head = ["T", "P", "tokens/rank", "KV groups/rank", "a2a MiB/layer fwd", "a2a MiB/layer bwd"]
    head += ["a2a GiB/step", "saved GiB/rank", "states GiB/rank", "total GiB/rank"]
    head += ["layer ms (one device, no comm)"] if timed else []
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [
            str(r["T"]),
            str(r["P"]),
            str(r["tokens_per_rank"]),
            r["kv_groups_per_rank"],
            f"{r['a2a_fwd_mb_per_layer']:.0f}",
            f"{r['a2a_bwd_mb_per_layer']:.0f}",
            f"{r['a2a_mb_per_step'] / 1024:.2f}",
            f"{r['saved_gb']:.1f}",
            f"{r['states_gb']:.2f}",
            f"{r['saved_gb'] + r['states_gb']:.1f}",
        ]
        if timed:
            cells.append("out of memory" if "error" in r else f"{r['layer_ms']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
