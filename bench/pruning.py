"""Head pruning: what 30% fewer heads saves, what the importance hook costs, and whether the
mask ramp (compensation) matters for the loss.

    python bench/pruning.py                  # CUDA: 12 layers, d_model 768, 12 q / 4 KV heads
                                             # of dim 64 (GPT-2-small class), T = 8192, bf16
    python bench/pruning.py --tiny           # CPU, tiny sizes: checks that the script runs
    python bench/pruning.py --json out.json  # where the JSON goes (default pruning_bench.json)

Three parts, each a markdown table:
1. one attention layer (projections + MLA op) and the MLA op alone, fwd and fwd+bwd, unpruned
   against 30% of the query heads removed, in three patterns: `grouped` (whole GQA groups go
   first, so their KV heads are dropped, then single heads), `scattered` (one head per group
   at a time, so every KV head stays) and `whole groups` (only whole groups, as many as fit
   in 30%: what `granularity: group` prunes); and the MLA op summed over all the layers, each
   with its own mask;
2. a full training step (fwd + bwd + AdamW) and its peak memory for the same models, and the
   cost of measuring importance: the unpruned step with and without the hook, run alternately;
3. the ramp_steps ablation: short seeded runs on stdlib bytes, unpruned, pruned with the mask
   cut at once (ramp 0) and pruned with a ramp, final validation loss.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import torch
from timing import device_ms, kernel_ms, median_ms, print_kernels

from automla.kernels import AttentionConfig
from automla.trainers import (
    DataConfig,
    HeadPruner,
    ModelConfig,
    PruningConfig,
    TrainConfig,
    build_model,
    train,
)
from automla.trainers.trainer import build_state, train_step


def pattern(n_heads: int, n_kv: int, n_remove: int, grouped: bool) -> torch.Tensor:
    """bool [n_heads]: heads kept after removing n_remove, whole groups first or spread."""
    G = n_heads // n_kv
    if grouped:
        order = list(range(n_heads - 1, -1, -1))  # the last group empties first
    else:
        order = [g * G + (G - 1 - j) for j in range(G) for g in range(n_kv - 1, -1, -1)]
    keep = torch.ones(n_heads, dtype=torch.bool)
    keep[order[:n_remove]] = False
    return keep


def masks(
    cfg: ModelConfig, fraction: float, grouped: bool, whole_groups: bool = False
) -> list[torch.Tensor]:
    """Per layer masks removing round(fraction * all heads), spread evenly over the layers.
    With `whole_groups`, only whole GQA groups go, as many as fit in that count (what
    `PruningConfig.granularity: group` removes for the same fraction)."""
    total = math.floor(fraction * cfg.n_heads * cfg.n_layers + 0.5)
    unit = cfg.n_heads // cfg.n_kv_heads if whole_groups else 1
    units = total // unit
    per = [unit * (units // cfg.n_layers + (i < units % cfg.n_layers)) for i in range(cfg.n_layers)]
    return [pattern(cfg.n_heads, cfg.n_kv_heads, n, grouped) for n in per]


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def bench_layer(model, mask, x, device, dtype, repeats, profile=False) -> dict:
    """One attention layer with `mask`: the module (projections + op) and the op alone."""
    attn = model.blocks[0].attn
    attn.set_head_mask(mask)
    rot = model.rope[: x.shape[1]]
    xg = x.detach().requires_grad_()

    def module_fwd():
        with torch.no_grad(), autocast(device, dtype):
            attn(x, rot)

    def module_fwd_bwd():
        with autocast(device, dtype):
            out = attn(xg, rot)
        out.float().sum().backward()

    lay = attn.layout(device)
    B, T, D = x.shape[0], x.shape[1], attn.head_dim
    op_dtype = dtype or torch.float32
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=op_dtype, generator=g).requires_grad_()

    q, k, v = rand(B, T, lay.n_slots, D), rand(B, T, lay.n_kv, D), rand(B, T, lay.n_kv, D)
    gate = torch.rand(B, T, lay.n_slots, 3, device=device, dtype=op_dtype, generator=g)
    gate.requires_grad_()

    def op():  # as the layer calls it (from CUDA graphs with --cuda-graphs)
        return attn._attend(q, k, v, gate, lay.slot_mask)

    def op_fwd():
        with torch.no_grad():
            op()

    def op_fwd_bwd():
        op().float().sum().backward()

    def timed(fn):
        # on CUDA the calls are queued back to back: what the GPU spends, which a training
        # loop sees; a sync around each call would add the host's launch time of ~25 kernels
        if device.type == "cuda":
            return device_ms(fn, repeats, warmup=2)
        return median_ms(fn, repeats, warmup=2, device=device)

    out = {
        "active_heads": attn.active_heads(),
        "active_kv_heads": attn.active_kv_heads(),
        "layer_fwd_ms": timed(module_fwd),
        "layer_fwd_bwd_ms": timed(module_fwd_bwd),
        "op_fwd_ms": timed(op_fwd),
        "op_fwd_bwd_ms": timed(op_fwd_bwd),
    }
    if profile and device.type == "cuda":
        out["op_kernels"] = kernel_ms(op_fwd_bwd)
    attn.set_head_mask(torch.ones(attn.n_heads, dtype=torch.bool))
    return out


def step_runner(config: TrainConfig, layer_masks, track: bool):
    """A closure running one training step (fwd + bwd + AdamW) of a fresh model, and the model.

    With `track`, a HeadPruner measures importance every step (no decision is ever due)."""
    device = torch.device(config.device)
    state = build_state(config, device)
    if layer_masks is not None:
        for block, m in zip(state.raw_model.blocks, layer_masks):
            block.attn.set_head_mask(m)
    pruner = None
    if track:
        cfg = PruningConfig(enabled=True, fraction=0.3, warmup_steps=10**9)
        pruner = HeadPruner(state.raw_model, cfg, total_steps=10**9)
    g = torch.Generator().manual_seed(0)
    V = config.model.vocab_size
    x = torch.randint(0, V, (config.batch_size, config.seq_len), generator=g).to(device)
    y = torch.randint(0, V, (config.batch_size, config.seq_len), generator=g).to(device)
    step = [0]

    def one():
        step[0] += 1
        if pruner is not None:
            pruner.begin_step(step[0])
        train_step(state, x, y, 1e-4)
        if pruner is not None:
            pruner.end_step(step[0])

    return one, state.raw_model


def bench_step(config: TrainConfig, layer_masks, repeats: int, profile=False) -> dict:
    """Training step time (median) and peak memory of one model."""
    device = torch.device(config.device)
    one, model = step_runner(config, layer_masks, track=False)
    one()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    ms = median_ms(one, repeats, warmup=1, device=device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    out = {
        "step_ms": ms,
        "peak_mem_gb": peak,
        "active_heads": sum(model.active_heads_per_layer()),
        "active_kv_heads": sum(model.active_kv_heads_per_layer()),
        "params": model.num_params(),
    }
    if profile and device.type == "cuda":
        out["step_kernels"] = kernel_ms(one, runs=2, warmup=0)
    del one, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def hook_overhead(config: TrainConfig, repeats: int) -> dict:
    """Step time without and with importance tracking, two models run alternately (order
    swapped every pair) so that drifts of a shared machine cancel; the paired ratio's median."""
    device = torch.device(config.device)
    off, _ = step_runner(config, None, track=False)
    on, _ = step_runner(config, None, track=True)
    for fn in (off, on):
        median_ms(fn, 1, warmup=1, device=device)
    t_off, t_on, ratios = [], [], []
    for i in range(repeats):
        pair = [(off, t_off), (on, t_on)]
        for fn, times in pair if i % 2 == 0 else pair[::-1]:
            times.append(median_ms(fn, 1, warmup=0, device=device))
        ratios.append(t_on[-1] / t_off[-1])
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {
        "step_ms_off": statistics.median(t_off),
        "step_ms_on": statistics.median(t_on),
        "ratio_median": statistics.median(ratios),
        "ratio_q1": q[0],
        "ratio_q3": q[2],
    }


def ablation(args, device: torch.device) -> list[dict]:
    """Final validation loss: unpruned, pruned with ramp 0, pruned with ramp args.ramp."""
    model = model_config(args, args.ablation_seq, vocab=256)
    rows = []
    variants = [("unpruned", None), ("ramp_steps=0", 0), (f"ramp_steps={args.ramp}", args.ramp)]
    steps = args.ablation_steps
    for seed in range(args.seeds):
        for name, ramp in variants:
            pruning = PruningConfig()
            if ramp is not None:
                pruning = PruningConfig(
                    enabled=True, fraction=args.fraction, warmup_steps=steps // 5,
                    interval=max(1, steps // 20), end_step=3 * steps // 5, ramp_steps=ramp,
                )  # fmt: skip
            config = TrainConfig(
                model=model, data=DataConfig(max_bytes=args.max_bytes), steps=steps,
                batch_size=args.ablation_batch, seq_len=args.ablation_seq, lr=args.lr,
                warmup_steps=max(1, steps // 20), eval_every=steps, eval_batches=8,
                device=str(device), dtype=args.dtype, seed=seed, pruning=pruning,
            )  # fmt: skip
            m = train(config, compact=False)
            rows.append(
                {
                    "variant": name,
                    "seed": seed,
                    "val_loss": m["val_loss"],
                    "active_heads": m["active_heads"],
                    "tokens_per_s": m["tokens_per_s"],
                }
            )
            print(f"  ablation seed {seed} {name}: val_loss {m['val_loss']:.4f}", flush=True)
    return rows


def model_config(args, seq: int, vocab: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
        n_kv_heads=args.kv_heads, head_dim=args.head_dim, max_seq_len=seq,
        mla=AttentionConfig(
            budget=args.budget, ratios=tuple(args.ratios), block_size=args.block_size
        ),
        attn_backend=args.backend, cuda_graphs=args.cuda_graphs,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="CPU, tiny sizes: a smoke run")
    ap.add_argument("--device", default=None)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=50304, help="timing model's vocabulary")
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--budget", type=int, default=1536)
    ap.add_argument("--ratios", type=float, nargs=3, default=[1 / 3, 1 / 6, 1 / 2])
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--fraction", type=float, default=0.3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--ramp", type=int, default=50, help="ramp_steps of the ablation")
    ap.add_argument("--ablation-steps", type=int, default=400)
    ap.add_argument("--ablation-seq", type=int, default=1024)
    ap.add_argument("--ablation-batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--max-bytes", type=int, default=8_000_000)
    ap.add_argument("--skip-ablation", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--profile", action="store_true", help="CUDA: print each variant's kernels")
    ap.add_argument("--cuda-graphs", action="store_true", help="the MLA op replayed from graphs")
    ap.add_argument("--json", default="pruning_bench.json")
    args = ap.parse_args()
    if args.tiny:
        args.device = args.device or "cpu"
        args.layers, args.d_model, args.heads, args.kv_heads, args.head_dim = 2, 64, 6, 3, 16
        args.vocab, args.seq, args.batch, args.budget, args.block_size = 256, 256, 2, 64, 16
        args.repeats, args.ramp, args.ablation_steps = 3, 10, 60
        args.ablation_seq, args.ablation_batch, args.lr, args.max_bytes = 64, 8, 1e-2, 300_000
        args.threads = args.threads or 1  # OpenMP threads spin badly on a busy shared CPU
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else None
    dtype_name = args.dtype if device.type == "cuda" else "float32"

    cfg = model_config(args, args.seq, args.vocab)
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    x = torch.randn(args.batch, args.seq, args.d_model, device=device)
    pct = f"{args.fraction:.0%}"
    patterns = {
        "unpruned": None,
        f"{pct} grouped": masks(cfg, args.fraction, grouped=True),
        f"{pct} scattered": masks(cfg, args.fraction, grouped=False),
        f"{pct} whole groups": masks(cfg, args.fraction, grouped=True, whole_groups=True),
    }
    layer_rows, model_rows = [], []
    timed: dict[tuple, dict] = {}  # each distinct mask once: layer 0's rows and the sums share it
    for name, ms in patterns.items():
        ms = ms or [torch.ones(cfg.n_heads, dtype=torch.bool)] * cfg.n_layers
        keys = [tuple(m.tolist()) for m in ms]
        for key, m in zip(keys, ms):
            if key not in timed:
                timed[key] = bench_layer(model, m, x, device, dtype, args.repeats, args.profile)
        layer_rows.append({"model": name, **timed[keys[0]]})
        # the model's attention: the op's fwd+bwd summed over the layers, each with its own
        # mask (all layers have the same shapes, so one layer's op stands in for each)
        attention_ms = sum(timed[key]["op_fwd_bwd_ms"] for key in keys)
        heads = sum(int(m.sum()) for m in ms)
        model_rows.append(
            {"model": name, "attention_fwd_bwd_ms": attention_ms, "active_heads": heads}
        )
    del model

    train_cfg = TrainConfig(
        model=cfg, steps=10**6, batch_size=args.batch, seq_len=args.seq, device=str(device),
        dtype=args.dtype, data=DataConfig(),
    )  # fmt: skip
    step_rows = []
    for name, ms in patterns.items():
        step_rows.append({"model": name, **bench_step(train_cfg, ms, args.repeats, args.profile)})
    hook = hook_overhead(train_cfg, max(args.repeats, 2 * args.repeats))
    ablation_rows = [] if args.skip_ablation else ablation(args, device)

    title = (
        f"{device.type}, {dtype_name}, {args.layers} layers, d_model {args.d_model}, "
        f"{args.heads} q / {args.kv_heads} KV heads of {args.head_dim}, B={args.batch} "
        f"T={args.seq}, budget {args.budget} ratios {tuple(round(r, 3) for r in args.ratios)} "
        f"block {args.block_size}; {args.fraction:.0%} of heads removed"
    )
    for r in layer_rows + step_rows:
        for part in ("op_kernels", "step_kernels"):
            if part in r:
                print_kernels(f"{r['model']}, {part.replace('_', ' ')}", r[part])
    print(f"\n{title}\n")
    print(
        "| layer 0 | q / KV heads | layer fwd ms | layer fwd+bwd ms | op fwd ms | op fwd+bwd ms |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    base = layer_rows[0]
    for r in layer_rows:
        rel = r["op_fwd_bwd_ms"] / base["op_fwd_bwd_ms"]
        print(
            f"| {r['model']} | {r['active_heads']} / {r['active_kv_heads']} "
            f"| {r['layer_fwd_ms']:.2f} | {r['layer_fwd_bwd_ms']:.2f} "
            f"| {r['op_fwd_ms']:.2f} | {r['op_fwd_bwd_ms']:.2f} ({rel:.2f}x) |"
        )
    print("\n| model, all layers | q heads | attention fwd+bwd ms |")
    print("| --- | --- | --- |")
    base = model_rows[0]
    for r in model_rows:
        rel = r["attention_fwd_bwd_ms"] / base["attention_fwd_bwd_ms"]
        print(
            f"| {r['model']} | {r['active_heads']} | {r['attention_fwd_bwd_ms']:.2f} ({rel:.3f}x) |"
        )
    print("\n| model | q / KV heads | params | step ms | peak GiB |")
    print("| --- | --- | --- | --- | --- |")
    base = step_rows[0]
    for r in step_rows:
        peak = f"{r['peak_mem_gb']:.2f}" if r["peak_mem_gb"] is not None else "-"
        rel = r["step_ms"] / base["step_ms"]
        print(
            f"| {r['model']} | {r['active_heads']} / {r['active_kv_heads']} | {r['params']:,} "
            f"| {r['step_ms']:.1f} ({rel:.3f}x) | {peak} |"
        )
    print(
        f"\nimportance tracking (unpruned): step {hook['step_ms_off']:.1f} ms off, "
        f"{hook['step_ms_on']:.1f} ms on; paired ratio {hook['ratio_median']:.4f} "
        f"(quartiles {hook['ratio_q1']:.3f}-{hook['ratio_q3']:.3f})"
    )
    if ablation_rows:
        print(
            f"\nramp ablation: {args.ablation_steps} steps, B={args.ablation_batch} "
            f"T={args.ablation_seq}, stdlib bytes\n"
        )
        print("| variant | seeds | mean val_loss | active heads |")
        print("| --- | --- | --- | --- |")
        for name in dict.fromkeys(r["variant"] for r in ablation_rows):
            rs = [r for r in ablation_rows if r["variant"] == name]
            mean = statistics.mean(r["val_loss"] for r in rs)
            print(f"| {name} | {len(rs)} | {mean:.4f} | {rs[0]['active_heads']} |")
    with open(args.json, "w") as f:
        json.dump(
            {
                "title": title,
                "args": vars(args),
                "layer": layer_rows,
                "model_attention": model_rows,
                "step": step_rows,
                "hook_overhead": hook,
                "ablation": ablation_rows,
            },
            f,
            indent=2,
        )


if __name__ == "__main__":
    main()
