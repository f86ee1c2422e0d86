"""Training throughput of the LM with MLA against the same LM with dense SDPA attention, and of
the rest of the model's fast path: fused ops, float8 linears, activation checkpointing.

    python bench/train_throughput.py [--seq 8192 32768] [--steps 8] [--json out.json]
    python bench/train_throughput.py --seq 32768 --select-tile 1 64 --fused --fp8 \\
        --checkpoint block --wide --loss-steps 300      # the fast-path goals, one GPU run
    python bench/train_throughput.py --tiny            # a CPU smoke run of the script itself

One full training step (forward, backward, clipping, AdamW) on one sequence of each length, bf16
autocast on CUDA; the median step time after warm-up gives tokens/s; peak memory is
torch.cuda.max_memory_allocated from the warm-up on, less what earlier rows left allocated
(reported as left_gb; release() frees it between rows). Each variant times at most --steps steps
and stops early past --max-variant-s; a variant that fails (out of memory, say) is reported and
the rest still run.

- the 125M model (12 layers, d 768, 50k vocabulary) at each --seq, dense and MLA (each
  --select-tile), plain; --fused adds fused ops on, --fp8 float8 linears (with fused ops when
  --fused), --checkpoint MODE activation checkpointing (likewise);
- --memory: what is allocated at each row's peak, summed by the line that allocated it, and
  for MLA rows the difference from the dense row of the same settings (`memory_peak.py`; the
  warm-up's allocations are recorded, the timed steps run without the recording);
- --wide: 8-layer stacks of d_model --wide-widths (heads of 128, 4 query heads per KV head) at
  --wide-seq, dense attention, bf16 against fp8;
- --loss-steps N: N training steps of the --loss-width stack on the stdlib's bytes (the same
  batches and seed) in bf16 and in fp8; reports the largest relative gap of the two loss curves
  (10-step moving averages, after the first 10 steps).

Prints a markdown table last; writes JSON to --json and, when $OUT is set, to
$OUT/train_throughput.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import statistics
import time
from dataclasses import dataclass

import torch
from budgets import budget_config
from memory_peak import Peak, Recording
from timing import kernel_ms, print_kernels

from automla.kernels import AttentionConfig
from automla.trainers import DataConfig, ModelConfig, TrainConfig, fast_ops
from automla.trainers.data import load_data
from automla.trainers.trainer import build_state, lr_at, train_step

# measure() sets these per variant
DEFAULT_LOSS, DEFAULT_NORM = fast_ops.LOSS, fast_ops.NORM
# the settings each given value of which runs rows of its own: flag, values, default, help
AB_SETTINGS = [
    ("loss", ["chunked", "liger"], DEFAULT_LOSS,
     "with --fused: each of these training losses (liger's: a captured step takes the plain "
     "loss over the logits)"),
    ("norm", ["triton-add", "liger"], DEFAULT_NORM,
     "with --fused: each of these RMSNorms (triton-add: with the residual add in it)"),
]  # fmt: skip


@dataclass(frozen=True)
class Variant:
    attention: str
    """dense or mla."""
    select_tile: int = 1
    graphs: str = "off"
    """`model.cuda_graphs`: off, op (the MLA op replayed) or step (the whole step replayed)."""
    fused: bool = False
    precision: str = "bf16"
    checkpoint: str = "none"
    width: int | None = None
    """None: the 125M model; else the d_model of an 8-layer wide stack."""
    loss: str = DEFAULT_LOSS
    """fast_ops.LOSS while it runs: the fused ops' training loss."""
    norm: str = DEFAULT_NORM
    """fast_ops.NORM while it runs: the fused ops' RMSNorm."""

    @property
    def name(self) -> str:
        name = self.attention if self.attention == "dense" else f"mla Bq={self.select_tile}"
        if self.fused and self.loss != DEFAULT_LOSS:
            name += f" {self.loss} loss"
        if self.fused and self.norm != DEFAULT_NORM:
            name += f" {self.norm} norm"
        return name if self.graphs == "off" else f"{name} +{self.graphs} graphs"


# query heads, KV heads, head dim: of the model gpu.yaml searches, and of the CPU smoke run's
SEARCH_HEADS = (8, 2, 64)
TINY_HEADS = (4, 2, 16)


def model_config(
    v: Variant,
    T: int,
    tiny: bool,
    heads: tuple[int, int, int],
    vocab_size: int = 50304,
    model: str = "125m",
) -> ModelConfig:
    if tiny:
        hq, hkv, d = TINY_HEADS
        size = dict(vocab_size=256, d_model=hq * d, n_layers=2, n_heads=hq, n_kv_heads=hkv)
    elif model == "search":
        # the model gpu.yaml searches: d 512, 4 layers, 8 q / 2 KV heads of 64, 384 tokens
        hq, hkv, _ = SEARCH_HEADS
        size = dict(vocab_size=384, d_model=512, n_layers=4, n_heads=hq, n_kv_heads=hkv)
    elif v.width is not None:
        n_heads = v.width // 128
        size = dict(
            vocab_size=vocab_size,
            d_model=v.width,
            n_layers=8,
            n_heads=n_heads,
            n_kv_heads=max(1, n_heads // 4),
            head_dim=128,
        )
    else:
        # GPT-2 small sized: ~124M parameters with a 50k vocabulary
        n_heads, n_kv_heads, head_dim = heads
        size = dict(
            vocab_size=vocab_size,
            d_model=768,
            n_layers=12,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
        )
    if tiny:
        mla = AttentionConfig(budget=64, block_size=16, select_tile=v.select_tile)
    else:
        mla = budget_config(T, "small" if model == "search" else "nsa", v.select_tile)
    return ModelConfig(
        **size,
        max_seq_len=T,
        attention=v.attention,
        mla=mla,
        cuda_graphs=False if v.graphs == "off" else v.graphs,
        fused_ops=v.fused,
        precision=v.precision,
        checkpoint=v.checkpoint,
    )


def measure(
    v: Variant, T, steps, warmup, tiny, device, heads, profile=False, max_s=30.0, model="125m",
    batch=1, memory=False,
):  # fmt: skip
    cfg = TrainConfig(
        model=model_config(v, T, tiny, heads, model=model),
        data=DataConfig(),
        steps=steps,
        batch_size=batch,
        seq_len=T,
        dtype="bfloat16",
        device=str(device),
    )
    # read by each training forward
    fast_ops.LOSS, fast_ops.NORM = v.loss, v.norm
    # what earlier rows left allocated (none once run() has cleared up after them): not this
    # row's, so taken off its peak
    left = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    state = build_state(cfg, device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    vocab = cfg.model.vocab_size
    x = torch.randint(0, vocab, (batch, T), generator=gen).to(device)
    y = torch.randint(0, vocab, (batch, T), generator=gen).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        # from the warm-up on: a CUDA graph's memory is allocated when it is captured there
        torch.cuda.reset_peak_memory_stats()
    # the warm-up holds the first eager steps and a step graph's capture: every allocation
    # that the timed steps' peak is made of (a replayed graph allocates nothing)
    recording = Recording() if memory and device.type == "cuda" else None
    with recording or contextlib.nullcontext():
        for _ in range(warmup):  # Triton and torch.compile compile here
            train_step(state, x, y, 1e-4)
    sync()
    times = []
    start = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = train_step(state, x, y, 1e-4)
        sync()
        times.append(time.perf_counter() - t0)
        if len(times) >= 2 and time.perf_counter() - start > max_s:
            break
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{v} at T={T}: loss {loss.item()}")
    step_s = statistics.median(times)
    peak = (torch.cuda.max_memory_allocated() - left) / 2**30 if device.type == "cuda" else math.nan
    if profile and device.type == "cuda":  # after the peak: the profiler's steps are extra
        kernels = kernel_ms(lambda s=state: train_step(s, x, y, 1e-4))
        print_kernels(f"{v.name} T={T} step", kernels, top=30)
    params = sum(p.numel() for p in state.raw_model.parameters())
    del state
    extra = {"memory_peak": recording.peak().to_json()} if recording else {}
    return {
        **_identity(v),
        "T": T,
        "d_model": cfg.model.d_model,
        "params": params,
        "steps_timed": len(times),
        "step_ms": step_s * 1e3,
        "batch": batch,
        "tokens_per_s": batch * T / step_s,
        "peak_mem_gb": peak,
        "left_gb": left / 2**30,
        **extra,
    }


def loss_curve(width: int, precision: str, fused: bool, steps: int, T: int, device) -> list[float]:
    """Per-step training losses of the `width` stack on the stdlib's bytes: the same batches
    (seed 0) and schedule (lr 3e-4, 20 warm-up steps, cosine) whatever the precision."""
    v = Variant("dense", fused=fused, precision=precision, width=width)
    cfg = TrainConfig(
        model=model_config(v, T, False, (0, 0, 0), vocab_size=256),
        data=DataConfig(max_bytes=4_000_000),
        steps=steps,
        batch_size=1,
        seq_len=T,
        lr=3e-4,
        warmup_steps=20,
        dtype="bfloat16",
        device=str(device),
    )
    state = build_state(cfg, device)
    train, _ = load_data(cfg.data, T, vocab_size=256)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(1, steps + 1):
        x, y = train.sample(1, gen)
        losses.append(train_step(state, x.to(device), y.to(device), lr_at(step, cfg)))
    del state
    return torch.stack(losses).float().cpu().tolist()


def curve_gap(reference: list[float], other: list[float], window: int = 10) -> dict:
    """Largest and final relative gap of the two curves' moving averages over `window` steps."""
    ref, oth = (torch.tensor(c).unfold(0, window, 1).mean(1) for c in (reference, other))
    rel = ((oth - ref).abs() / ref)[window:]  # after the first steps' fast drop
    return {"max_rel_gap": rel.max().item(), "final_rel_gap": rel[-1].item()}


def _identity(v: Variant) -> dict:
    """A row's settings: the variant's fields, its name as "attention", its kind (dense or
    mla) as "kind"."""
    return {**dataclasses.asdict(v), "attention": v.name, "kind": v.attention}


def release(device) -> None:
    """Free what a row leaves behind on the GPU: its cached blocks, and the matmul libraries'
    workspaces, which torch keeps per stream (a row's step-graph capture runs on streams of
    its own) and empty_cache() does not free: left, each row's peak would carry every earlier
    row's (~64 MB a row, 2026-12-05)."""
    gc.collect()
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        torch.cuda.synchronize(device)
        clear()
    torch.cuda.empty_cache()


def run(v: Variant, T: int, args, device) -> dict:
    """measure(), or the error's row: one failing variant must not lose the others."""
    try:
        return measure(
            v, T, args.steps, args.warmup, args.tiny, device, tuple(args.heads), args.profile,
            args.max_variant_s, args.model, args.batch, args.memory,
        )  # fmt: skip
    except Exception as e:  # noqa: BLE001 - reported in the table
        # (not from model_config: the error may be its own)
        d_model = 64 if args.tiny else v.width or (512 if args.model == "search" else 768)
        return {**_identity(v), "T": T, "d_model": d_model, "error": repr(e)[:300]}
    finally:
        if device.type == "cuda":
            release(device)


def variants(args, device) -> list[tuple[Variant, int]]:
    """(variant, T) in the order run: per length, each attention plain then its fast paths."""
    fast = []
    if args.fused:
        fast += [
            {"fused": True, "loss": loss, "norm": norm} for loss in args.loss for norm in args.norm
        ]
    if args.fp8:
        fast.append({"fused": args.fused, "precision": "fp8"})
    for mode in args.checkpoint:
        fast.append({"fused": args.fused, "checkpoint": mode})
    attentions = [("dense", 1)] + [("mla", bq) for bq in args.select_tile]
    graphs = ["off"] + args.cuda_graphs
    out = []
    for T in [128, 256] if args.tiny else args.seq:
        for attention, bq in attentions:
            for mode in graphs:
                if attention == "dense" and mode == "op":
                    continue  # "op" graphs only the MLA op
                base = Variant(attention, bq, graphs=mode)
                out.append((base, T))
                for change in fast:
                    v = dataclasses.replace(base, **change)
                    if v.checkpoint != "none" and mode != "off":
                        continue  # a config error: graphs are not recomputed
                    out.append((v, T))
    if args.wide and not args.tiny:
        for width in args.wide_widths:
            for precision in ("bf16", "fp8"):
                v = Variant("dense", fused=args.fused, precision=precision, width=width)
                out.append((v, args.wide_seq))
    if args.fast_only:
        out = [
            (v, T) for v, T in out
            if (v.fused or not args.fused) and (v.graphs != "off" or not args.cuda_graphs)
        ]  # fmt: skip
    if device.type != "cuda":
        # the CPU smoke run: what runs there (no fused ops, no float8), each once
        cpu = [
            (dataclasses.replace(v, fused=False, loss=DEFAULT_LOSS, norm=DEFAULT_NORM), T)
            for v, T in out
            if v.precision == "bf16"
        ]
        out = list(dict.fromkeys(cpu))
    return out


class Peers:
    """The rows of a run by their settings: `of(r, **change)` is the row (not failed) of r's
    length and settings with those in `change` replaced, `dense(r, ...)` r's dense peer."""

    FIELDS = (
        "T", "kind", "select_tile", "fused", "precision", "checkpoint", "width", "graphs", "loss",
        "norm",
    )  # fmt: skip

    def __init__(self, rows: list[dict]):
        self.rows = {self._key(r): r for r in rows if "error" not in r}

    def _key(self, r: dict, **change) -> tuple:
        return tuple({**{f: r[f] for f in self.FIELDS}, **change}.values())

    def of(self, r: dict, **change) -> dict | None:
        return self.rows.get(self._key(r, **change))

    def dense(self, r: dict, graphs: str | None = None, **change) -> dict | None:
        """The dense row of r's length, width and settings, those in `change` replaced;
        graphs: r's unless given ("op" graphs only the MLA op: its dense peer has none)."""
        graphs = graphs or (r["graphs"] if r["graphs"] != "op" else "off")
        return self.of(r, kind="dense", select_tile=1, graphs=graphs, **change)


def print_table(rows: list[dict]) -> None:
    peers = Peers(rows)
    plain_settings = dict(
        fused=False, precision="bf16", checkpoint="none", loss=DEFAULT_LOSS, norm=DEFAULT_NORM
    )

    print(
        "| T | d_model | attention | fused | precision | checkpoint | step ms | tokens/s | "
        "peak GB | speed vs plain | memory vs plain | speed vs plain dense | "
        "speed vs dense, same settings |"
    )
    print("| --- " * 13 + "|")
    for r in rows:
        head = (
            f"| {r['T']} | {r['d_model']} | {r['attention']} | {'on' if r['fused'] else 'off'} | "
            f"{r['precision']} | {r['checkpoint']} |"
        )
        if "error" in r:
            print(f"{head} failed: {r['error'][:120]} | | | | | | |")
            continue
        plain = peers.of(r, graphs="off", **plain_settings)
        print(
            f"{head} {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {r['peak_mem_gb']:.2f} | "
            f"{_ratio(r, plain, 'step_ms', invert=True)} | {_ratio(r, plain, 'peak_mem_gb')} | "
            f"{_ratio(r, peers.dense(r, 'off', **plain_settings), 'step_ms', invert=True)} | "
            f"{_ratio(r, peers.dense(r), 'step_ms', invert=True)} |"
        )


def print_memory(rows: list[dict]) -> None:
    """--memory: what each row held at its peak, by site; an MLA row also against the dense row
    of its settings (its length, width, graphs and fast paths)."""
    traced = [r for r in rows if "memory_peak" in r]
    peers = Peers(traced)
    for r in traced:
        peak = Peak.from_json(r["memory_peak"])
        print(f"\nMemory, {r['attention']} T={r['T']}: {peak.describe()}")
        base = peers.dense(r)
        if r["kind"] == "mla" and base is not None:
            print(f"against dense: {peak.against(Peak.from_json(base['memory_peak']))}")


def _ratio(row: dict, base: dict | None, field: str, invert: bool = False) -> str:
    """row / base of `field` (base / row with invert: a speed-up of times), '' against itself."""
    if base is None or base is row or math.isnan(row[field]):
        return ""
    a, b = row[field], base[field]
    return f"{(b / a if invert else a / b):.2f}x"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--max-variant-s", type=float, default=20.0, help="cap on a variant's timing")
    ap.add_argument("--tiny", action="store_true", help="small model on CPU: checks the script")
    ap.add_argument(
        "--heads",
        type=int,
        nargs=3,
        default=[12, 4, 64],
        metavar=("Q", "KV", "DIM"),
        help="query heads, KV heads, head dim (the sparse branch is cheapest per query at G=16)",
    )
    ap.add_argument("--profile", action="store_true", help="CUDA: print each step's kernels")
    ap.add_argument(
        "--memory", action="store_true",
        help="CUDA: what is allocated at each row's memory peak, by the line that allocated it",
    )  # fmt: skip
    ap.add_argument(
        "--cuda-graphs",
        nargs="*",
        default=[],
        choices=["op", "step"],
        help="also with CUDA graphs: the MLA op replayed (op), the whole step replayed (step)",
    )
    ap.add_argument(
        "--model",
        choices=["125m", "search"],
        default="125m",
        help="the 125M model (--heads), or the model gpu.yaml searches (small MLA budget)",
    )
    ap.add_argument("--batch", type=int, default=1, help="sequences per step")
    ap.add_argument(
        "--select-tile", type=int, nargs="+", default=[1], help="MLA's select_tile values to run"
    )
    ap.add_argument("--fused", action="store_true", help="also with fused ops (liger) on")
    ap.add_argument("--fp8", action="store_true", help="also with float8 linears (torchao)")
    ap.add_argument(
        "--checkpoint",
        nargs="+",
        default=[],
        choices=["attention", "block"],
        help="also with activation checkpointing of these kinds",
    )
    ap.add_argument("--wide", action="store_true", help="8-layer wide stacks, bf16 against fp8")
    ap.add_argument("--wide-widths", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--wide-seq", type=int, default=8192)
    ap.add_argument("--loss-steps", type=int, default=0, help="fp8 vs bf16 loss curves (0: off)")
    ap.add_argument("--loss-width", type=int, default=4096)
    for name, choices, default, help in AB_SETTINGS:
        ap.add_argument(f"--{name}", nargs="+", choices=choices, default=[default], help=help)
    ap.add_argument(
        "--fast-only", action="store_true",
        help="only the rows with every fast path asked for (--fused, --cuda-graphs)",
    )  # fmt: skip
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    t_start = time.perf_counter()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    paths = [args.json] if args.json else []
    if os.environ.get("OUT"):
        paths.append(os.path.join(os.environ["OUT"], "train_throughput.json"))
    rows = []
    for v, T in variants(args, device):
        t0 = time.perf_counter()
        rows.append(run(v, T, args, device))
        r = rows[-1]
        tag = f"{r['attention']:14s} d={r['d_model']:<5d} fused={int(v.fused)} {v.precision} "
        tag += f"ckpt={v.checkpoint:9s} T={T:6d}"
        if "error" in r:
            print(f"{tag} FAILED {r['error']}", flush=True)
        else:
            print(
                f"{tag} {r['step_ms']:9.1f} ms/step {r['peak_mem_gb']:7.2f} GB "
                f"(+{r['left_gb']:.3f} GB left by earlier rows; {time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
        write_json(paths, name, rows, None)  # after each variant: a cut-off run keeps its rows
    loss = None
    if args.loss_steps and device.type == "cuda":
        curves = {}
        for precision in ("bf16", "fp8"):
            t0 = time.perf_counter()
            try:
                curves[precision] = loss_curve(
                    args.loss_width, precision, args.fused, args.loss_steps, args.wide_seq, device
                )
            except Exception as e:  # noqa: BLE001 - reported below
                curves[precision] = repr(e)[:300]
            release(device)
            print(f"loss curve {precision}: {time.perf_counter() - t0:.0f} s", flush=True)
        loss = {"width": args.loss_width, "T": args.wide_seq, "steps": args.loss_steps, **curves}
        if all(isinstance(c, list) for c in curves.values()):
            loss.update(curve_gap(curves["bf16"], curves["fp8"]))
    hq, hkv, d = TINY_HEADS if args.tiny else SEARCH_HEADS if args.model == "search" else args.heads
    print(
        f"\n{name}, torch {torch.__version__}, heads {hq} q / {hkv} KV of {d} "
        f"({args.model} model), batch {args.batch}, "
        f"{time.perf_counter() - t_start:.0f} s in all\n"
    )
    if loss is not None:
        for precision in ("bf16", "fp8"):
            c = loss[precision]
            print(
                f"loss d={loss['width']} {precision}: "
                + (f"first {c[0]:.3f}, last {c[-1]:.3f}" if isinstance(c, list) else f"failed {c}")
            )
        if "max_rel_gap" in loss:
            print(
                f"fp8 vs bf16 over {loss['steps']} steps (10-step means): max relative gap "
                f"{loss['max_rel_gap']:.2%}, at the end {loss['final_rel_gap']:.2%}\n"
            )
    print_table(rows)
    print_memory(rows)
    write_json(paths, name, rows, loss)


def write_json(paths: list[str], device: str, rows: list[dict], loss: dict | None) -> None:
    result = {"device": device, "torch": torch.__version__, "rows": rows, "loss_curves": loss}
    for path in paths:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
