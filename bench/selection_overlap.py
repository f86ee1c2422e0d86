"""How much do the sparse-branch block selections of consecutive tokens overlap?

    python bench/selection_overlap.py            # CPU, ~4 minutes: train, then measure
    python bench/selection_overlap.py --steps 20 # a quick smoke run

A kernel that processes a tile of M consecutive queries over the UNION of their selected key
blocks loads |union| blocks per tile instead of M * n_select. This trains a small MLA LM on
stdlib bytes, captures each layer's q and k on held-out sequences, recomputes the selection
exactly as the op does (`select_blocks` with the layer's plan at t_max) and reports, per layer
and KV head, averaged over the tokens whose selection is full (n_select real blocks):
  - overlap: mean |S_t & S_(t-1)| / n_select,
  - union M: mean |union of S over an aligned tile of M tokens| / (M * n_select)
    (1.0: nothing shared; 1/M: every token of the tile picks the same blocks).
Baselines: the same model untrained, and i.i.d. normal q, k (the kernel benchmark's inputs).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import contextmanager

import torch

import automla.trainers.model as model_module
from automla.kernels import AttentionConfig, select_blocks
from automla.trainers import DataConfig, ModelConfig, TrainConfig, build_model, train
from automla.trainers.data import load_data
from automla.trainers.trainer import load_checkpoint

TILES = (2, 4, 8, 16)


@contextmanager
def capture_selections():
    """Wrap the model's MLA op; yield a list that gets, per call (= per layer), the selection
    [B, T, HKV, n_select] computed from the op's own q, k, plan and head mask."""
    real = model_module.mla_attention
    found: list[torch.Tensor] = []

    def op(q, k, v, gate, config, **kw):
        plan = config.plan(kw.get("t_max") or q.shape[1])  # the op's plan, as in blocked.py
        found.append(select_blocks(q, k, plan, kw.get("head_mask")))
        return real(q, k, v, gate, config, **kw)

    model_module.mla_attention = op
    try:
        yield found
    finally:
        model_module.mla_attention = real


def overlap_stats(idx: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """idx [B, T, HKV, n] -> [HKV, 1 + len(TILES)]: consecutive overlap, then union ratios.

    Only tokens with a full selection count (no -1 slot): early tokens have fewer candidate
    blocks than n_select, and their small sets would inflate the sharing.
    """
    B, T, H, n = idx.shape
    full = (idx >= 0).all(-1)  # [B, T, H]
    # one-hot sets [B, T, H, NB]; -1 slots go to an extra column that is then dropped
    sets = torch.zeros(B, T, H, n_blocks + 1, dtype=torch.bool)
    sets.scatter_(-1, idx.where(idx >= 0, n_blocks), True)
    sets = sets[..., :n_blocks]
    both = full[:, 1:] & full[:, :-1]
    inter = (sets[:, 1:] & sets[:, :-1]).sum(-1).float() / n
    cols = [(inter * both).sum((0, 1)) / both.sum((0, 1))]
    for M in TILES:
        # aligned tiles, as a kernel's program would take them; only tiles of full tokens
        t = T // M * M
        tiles = sets[:, :t].reshape(B, t // M, M, H, n_blocks)
        ok = full[:, :t].reshape(B, t // M, M, H).all(2)
        union = tiles.any(2).sum(-1).float() / (M * n)
        cols.append((union * ok).sum((0, 1)) / ok.sum((0, 1)))
    return torch.stack(cols, -1)


@torch.no_grad()
def model_stats(model, x: torch.Tensor) -> list[torch.Tensor]:
    """Per layer [HKV, 1 + len(TILES)] for the model run on token ids x [B, T]."""
    model.eval()
    with capture_selections() as sels:
        model(x)
    n_blocks = x.shape[1] // model.cfg.mla.block_size
    return [overlap_stats(s, n_blocks) for s in sels]


def random_stats(cfg: ModelConfig, B: int, T: int, seed: int) -> torch.Tensor:
    """[HKV, ...] for i.i.d. standard normal q, k of the model's attention shapes."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, cfg.n_heads, cfg.head_dim, generator=g)
    k = torch.randn(B, T, cfg.n_kv_heads, cfg.head_dim, generator=g)
    idx = select_blocks(q, k, cfg.mla.plan(cfg.max_seq_len))
    return overlap_stats(idx, T // cfg.mla.block_size)


def full_fraction(cfg: ModelConfig, T: int) -> float:
    """Share of the T positions whose candidate count reaches n_select (same for any input)."""
    q = torch.zeros(1, T, cfg.n_kv_heads, cfg.head_dim)
    k = torch.zeros(1, T, cfg.n_kv_heads, cfg.head_dim)
    return (select_blocks(q, k, cfg.mla.plan(cfg.max_seq_len)) >= 0).all(-1).float().mean().item()


def row(name: str, s: torch.Tensor) -> str:
    """One markdown row: s [..., 1 + len(TILES)] averaged over everything but the last dim."""
    vals = s.reshape(-1, s.shape[-1]).mean(0).tolist()
    return f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--ratios", type=float, nargs=3, default=[0.25, 0.25, 0.5])
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--max-bytes", type=int, default=3_000_000)
    ap.add_argument("--eval-seqs", type=int, default=4, help="held-out sequences measured")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()

    mla = AttentionConfig(budget=args.budget, ratios=tuple(args.ratios), block_size=args.block_size)
    model_cfg = ModelConfig(
        vocab_size=256, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
        n_kv_heads=args.kv_heads, head_dim=args.head_dim, max_seq_len=args.seq, mla=mla,
        attn_backend="torch",
    )  # fmt: skip
    config = TrainConfig(
        model=model_cfg, data=DataConfig(max_bytes=args.max_bytes), steps=args.steps,
        batch_size=args.batch, seq_len=args.seq, lr=args.lr,
        warmup_steps=max(1, args.steps // 20), eval_every=args.steps, eval_batches=4,
        device="cpu", threads=2, seed=args.seed,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as run_dir:
        # train() returns metrics only; its final checkpoint holds the trained model
        metrics = train(config, out_dir=run_dir, progress=True)
        trained, _ = load_checkpoint(f"{run_dir}/checkpoint")
    t_train = time.perf_counter() - t0
    print(f"trained {args.steps} steps in {t_train:.0f}s, val_loss {metrics['val_loss']:.4f}")

    _, val = load_data(config.data, args.seq, vocab_size=256)
    x, _ = val.fixed_batches(1, args.eval_seqs)[0]  # held-out files (validation split)
    torch.manual_seed(args.seed)  # the initialisation train() started from
    untrained = build_model(model_cfg)
    results = {
        "trained": model_stats(trained, x),
        "untrained": model_stats(untrained, x),
    }
    rand = random_stats(model_cfg, args.eval_seqs, args.seq, args.seed)

    plan = mla.plan(args.seq)
    G = args.heads // args.kv_heads
    print()
    print(
        f"layers {args.layers}, heads {args.heads} q / {args.kv_heads} kv (G {G}), "
        f"head_dim {args.head_dim}, T {args.seq}, block_size {plan.block_size}, "
        f"n_select {plan.n_select}, window {plan.window}, steps {args.steps}, "
        f"final val_loss {metrics['val_loss']:.4f}, {args.eval_seqs} held-out sequences, "
        f"tokens with a full selection {full_fraction(model_cfg, args.seq):.1%}"
    )
    print()
    print("| inputs | overlap | " + " | ".join(f"union M={M}" for M in TILES) + " |")
    print("|---|" + "---|" * (1 + len(TILES)))
    for name, layers in results.items():
        print(row(f"{name} (all layers)", torch.stack(layers)))
        for i, s in enumerate(layers):
            print(row(f"{name} layer {i}", s))
    print(row("random normal q, k", rand))
    print()
    print(f"wall time {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
