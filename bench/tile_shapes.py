"""MLA at the head shapes searches train, per-query and tile-shared selection, against dense
attention (cuDNN and FlashAttention-2 through SDPA), all in one run.

For each head shape (query heads / KV heads, head dim), length T and budget, times MLA's
forward and forward+backward with `select_tile` 1 and 64 (and any others asked for), and the
dense peers on the same inputs; counts the kernel launches of one call and the host time to
issue it (a call whose host time exceeds its device time is launch-bound). Budgets:
NSA-sized (window 512, 16 blocks of 64, stride 64) and small (window 256, 4 blocks of 64,
stride 128). Before timing, each select_tile is checked against the float32 reference at
one small size (outputs and gradients).

    python bench/tile_shapes.py [--shapes 12/4/64 8/2/64 16/16/64 64/4/128]
        [--lengths 2048 8192 32768 65536] [--tiles 1 64] [--budgets nsa small] [--out DIR]

Writes tile_shapes.json and tile_shapes.md to --out (default: $OUT or bench/) and prints the
table last. Bq = select_tile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    from automla.kernels import mla_attention, mla_reference
    from automla.trainers.step_graph import no_gc
except ImportError:  # not installed: import the folder directly
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kernels import mla_attention, mla_reference
    from trainers.step_graph import no_gc

import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))  # timing.py, budgets.py
from budgets import budget_config  # noqa: E402

DTYPE = torch.bfloat16


def inputs(T: int, hq: int, hkv: int, d: int, seed: int = 0, batch: int = 1):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=DTYPE, generator=g)

    B = batch
    q, k, v = randn(B, T, hq, d), randn(B, T, hkv, d), randn(B, T, hkv, d)
    gate = torch.rand(B, T, hq, 3, device="cuda", generator=g).to(DTYPE)
    for x in (q, k, v, gate):
        x.requires_grad_()
    return q, k, v, gate, randn(B, T, hq, d)


def point_inputs(point: str, config_class: type | None = None):
    """A bench point SHAPE:T:BUDGET:BQ[:B] (e.g. `12/4/64:8192:nsa:64`, or `...:64:8` for a
    batch of 8): its AttentionConfig (of `config_class`, another tree's, when given) and its
    inputs (q, k, v, gate, do)."""
    shape, T, budget, bq, *batch = point.split(":")
    hq, hkv, d = (int(x) for x in shape.split("/"))
    extra = {} if config_class is None else {"config_class": config_class}
    cfg = budget_config(int(T), budget, int(bq), **extra)
    return cfg, inputs(int(T), hq, hkv, d, batch=int(batch[0]) if batch else 1)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("inf")
    return ((x - ref).norm() / ref.norm()).item()


def check(select_tile: int, hq: int = 12, hkv: int = 4, d: int = 64, T: int = 2048 + 37) -> dict:
    """MLA (Triton, bf16) against the float32 reference: relative errors of o and the grads."""
    cfg = budget_config(2048, "nsa", select_tile)
    q, k, v, gate, do = inputs(T, hq, hkv, d, seed=select_tile)
    o = mla_attention(q, k, v, gate, cfg, t_max=4096, backend="triton")
    o.backward(do)
    got = [o.detach()] + [x.grad for x in (q, k, v, gate)]
    ref_in = [x.detach().float().requires_grad_() for x in (q, k, v, gate)]
    o_ref = mla_reference(*ref_in, cfg, t_max=4096)
    o_ref.backward(do.float())
    want = [o_ref.detach()] + [x.grad for x in ref_in]
    return {n: rel_err(a, b) for n, a, b in zip(("o", "dq", "dk", "dv", "dgate"), got, want)}


def sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v, gate):
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        with sdpa_kernel(backend):
            try:
                o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
            except RuntimeError:  # a backend without GQA: expand K/V
                G = qt.shape[1] // kt.shape[1]
                kt, vt = kt.repeat_interleave(G, 1), vt.repeat_interleave(G, 1)
                o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        return o.transpose(1, 2)

    return run


def launches(fn) -> int:
    """CUDA kernels one call of fn launches (profiler count)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if str(e.device_type).endswith("CUDA"))


def host_ms(fn, repeats: int = 20) -> float:
    """Median host milliseconds to issue one call (the device idle before each)."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def measure(fn, args, rep: int, graphs: bool = True, uses_gate: bool = True) -> dict:
    q, k, v, gate, do = args
    qd, kd, vd, gd = (x.detach() for x in (q, k, v, gate))

    def fwd():
        return fn(qd, kd, vd, gd)

    def fwd_bwd():
        fn(q, k, v, gate).backward(do)

    row = {"fwd_ms": do_bench(fwd, warmup=50, rep=rep, return_mode="median")}
    row["fwd_bwd_ms"] = do_bench(
        fwd_bwd, warmup=50, rep=rep, return_mode="median", grad_to_none=[q, k, v, gate]
    )
    row["launches_fwd"] = launches(fwd)
    row["launches_fwd_bwd"] = launches(fwd_bwd)
    row["host_fwd_bwd_ms"] = host_ms(fwd_bwd, repeats=20 if row["fwd_bwd_ms"] < 20 else 3)
    if graphs:
        # replayed from CUDA graphs, as the model runs the op (`model.cuda_graphs`): device time
        # the peers ignore the gate: graph them on (q, k, v) alone
        leaves = (q, k, v, gate) if uses_gate else (q, k, v)
        samples = tuple(x.detach().clone().requires_grad_() for x in leaves)
        # no garbage collection while capturing: a graph of an earlier row freed by the cycle
        # collector in the middle of a capture invalidates it
        with no_gc():
            graphed = torch.cuda.make_graphed_callables(
                fn if uses_gate else (lambda q, k, v: fn(q, k, v, None)), samples
            )

        def replay():
            graphed(*leaves).backward(do)

        row["graph_fwd_bwd_ms"] = do_bench(
            replay, warmup=50, rep=rep, return_mode="median", grad_to_none=[q, k, v, gate]
        )
        row["step_graph_fwd_bwd_ms"] = in_one_graph(fn, args, rep, uses_gate)
    return row


def captured(fn, args, uses_gate: bool) -> torch.cuda.CUDAGraph:
    """fwd+bwd of fn(q, k, v, gate) (gate None where not `uses_gate`) warmed up and captured in
    one CUDA graph with nothing else, as a whole-step graph (`cuda_graphs: step`) runs the op:
    no host work per call, only the kernels and their gaps."""
    q, k, v, gate, do = args

    def fwd_bwd():
        fn(q, k, v, gate if uses_gate else None).backward(do)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on the capture stream
        for _ in range(2):
            fwd_bwd()
    torch.cuda.current_stream().wait_stream(side)
    for x in (q, k, v, gate):
        x.grad = None  # the captured backward allocates them in the graph's pool
    graph = torch.cuda.CUDAGraph()
    with no_gc(), torch.cuda.graph(graph, stream=side):
        fwd_bwd()
    return graph


def in_one_graph(fn, args, rep: int, uses_gate: bool) -> float:
    """Median ms of fwd+bwd replayed from one graph (`captured`). The peers ignore the gate
    (fn(q, k, v, None))."""
    graph = captured(fn, args, uses_gate)
    ms = do_bench(graph.replay, warmup=50, rep=rep, return_mode="median")
    for x in args[:4]:
        x.grad = None
    del graph
    return ms


def tile_table() -> dict:
    """The Triton launcher's GPU tile table (bench-only access, for --sweep)."""
    from automla.kernels.parallel.layout import _GPU_TILES

    return _GPU_TILES


SWEEP = {
    "tile_score": [
        {"ROWS": 64, "BN": 32, "num_warps": 4},
        {"ROWS": 128, "BN": 32, "num_warps": 8},
        {"ROWS": 64, "BN": 64, "num_warps": 4},
    ],
    "sparse_tile_fwd": [
        {"ROWS": 64, "num_warps": 4},
        {"ROWS": 128, "num_warps": 8},
        {"ROWS": 128, "num_warps": 4},
        {"ROWS": 64, "num_warps": 4, "num_stages": 3},
        {"ROWS": 128, "num_warps": 8, "num_stages": 3},
    ],
    "sparse_tile_dq": [
        {"ROWS": 64, "num_warps": 4},
        {"ROWS": 128, "num_warps": 8},
        {"ROWS": 64, "num_warps": 4, "num_stages": 3},
        {"ROWS": 128, "num_warps": 8, "num_stages": 3},
    ],
    "sparse_tile_dkv": [
        {"ROWS": 64, "CH": 256, "num_warps": 4},
        {"ROWS": 128, "CH": 256, "num_warps": 8},
        {"ROWS": 64, "CH": 512, "num_warps": 4},
        {"ROWS": 64, "CH": 1024, "num_warps": 4},
        {"ROWS": 64, "CH": 256, "num_warps": 4, "num_stages": 3},
    ],
}
KERNEL_OF = {
    "tile_score": "_tile_score_kernel",
    "sparse_tile_fwd": "_sparse_tile_fwd_kernel",
    "sparse_tile_dq": "_sparse_tile_dq_kernel",
    "sparse_tile_dkv": "_sparse_tile_dkv_kernel",
}


def kernel_breakdown(shape: str, T: int, budget: str, bq: int) -> dict[str, float]:
    from timing import kernel_ms

    hq, hkv, d = (int(x) for x in shape.split("/"))
    cfg = budget_config(T, budget, bq)
    q, k, v, gate, do = inputs(T, hq, hkv, d)
    return kernel_ms(
        lambda: mla_attention(q, k, v, gate, cfg, backend="triton").backward(do), runs=3
    )


def sweep(shape: str, T: int, bq: int) -> dict:
    """Each tile kernel's candidates timed at (shape, T, NSA budget); the fastest kept."""
    table, chosen = tile_table(), {}
    for name, candidates in SWEEP.items():
        best = None
        for cand in candidates:
            table[name] = cand
            try:
                ms = kernel_breakdown(shape, T, "nsa", bq)[KERNEL_OF[name]]
            except Exception as e:
                print(f"sweep {name} {cand}: {type(e).__name__} {str(e)[:120]}", flush=True)
                continue
            print(f"sweep {name:16s} {ms:7.3f} ms  {cand}", flush=True)
            if best is None or ms < best[1]:
                best = (cand, ms)
        if best is not None:
            table[name] = chosen[name] = best[0]
    print("chosen tiles:", json.dumps(chosen), flush=True)
    return chosen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["12/4/64", "8/2/64", "16/16/64", "64/4/128"])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768, 65536])
    ap.add_argument("--tiles", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--budgets", nargs="+", default=["nsa", "small"])
    ap.add_argument("--peers", default="cudnn,flash")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph timings")
    ap.add_argument(
        "--kernels",
        nargs="*",
        default=[],
        metavar="SHAPE:T:BUDGET:BQ",
        help="print the per-kernel device times of these MLA calls",
    )
    ap.add_argument(
        "--sweep",
        default="",
        metavar="SHAPE:T:BQ",
        help="tune the tile kernels' tiles at this point first",
    )
    ap.add_argument("--out", default=os.environ.get("OUT", str(Path(__file__).parent)))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from torch.nn.attention import SDPBackend

    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "command": "python bench/tile_shapes.py " + " ".join(sys.argv[1:]),
        "checks": {},
        "rows": [],
    }
    if args.sweep:
        shape, T, bq = args.sweep.split(":")
        result["sweep"] = sweep(shape, int(T), int(bq))
    for spec in args.kernels:
        shape, T, budget, bq = spec.split(":")
        times = kernel_breakdown(shape, int(T), budget, int(bq))
        result.setdefault("kernels", {})[spec] = times
        print(f"\n{spec}: {sum(times.values()):.3f} ms of kernels", flush=True)
        for name, ms in list(times.items())[:14]:
            print(f"  {ms:8.3f} ms  {name}", flush=True)
    if not args.skip_check:
        for bq in args.tiles:
            result["checks"][bq] = check(bq)
            print(f"check select_tile={bq}", result["checks"][bq], flush=True)
    for shape in args.shapes:
        hq, hkv, d = (int(x) for x in shape.split("/"))
        for T in args.lengths:
            data = inputs(T, hq, hkv, d)
            entries = []
            for name in filter(None, args.peers.split(",")):
                entries.append((name, "", 0, sdpa(backends[name])))
            for budget in args.budgets:
                for bq in args.tiles:
                    cfg = budget_config(T, budget, bq)

                    def run(q, k, v, g, cfg=cfg):
                        return mla_attention(q, k, v, g, cfg, backend="triton")

                    entries.append(("mla", budget, bq, run))
            for impl, budget, bq, fn in entries:
                row = {"shape": shape, "T": T, "impl": impl, "budget": budget, "select_tile": bq}
                try:
                    row.update(
                        measure(fn, data, args.rep, not args.no_graphs, uses_gate=impl == "mla")
                    )
                except Exception as e:  # recorded, not fatal (e.g. out of memory)
                    row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
                print(json.dumps(row), flush=True)
                result["rows"].append(row)
            del data
            torch.cuda.empty_cache()
    (out / "tile_shapes.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (out / "tile_shapes.md").write_text(table)
    print(table)


def markdown(result: dict) -> str:
    """One row per (shape, T, MLA variant): its times, launches, host time and its speed-up
    over cuDNN and FlashAttention-2 (peer time / MLA time, fwd+bwd)."""
    rows = result["rows"]
    peers = {(r["shape"], r["T"], r["impl"]): r for r in rows if r["impl"] != "mla"}
    lines = [
        f"{result['gpu']}, torch {result['torch']}, triton {result['triton']}, {result['date']}",
        "",
        "| q/kv/D | T | budget | Bq | fwd ms | fwd+bwd ms | launches fwd / fwd+bwd "
        "| host ms | graphed fwd+bwd ms | in one graph ms | cuDNN fwd+bwd ms (graphed; one graph) "
        "| ×cuDNN (graphed; one graph) | FA2 fwd+bwd ms | ×FA2 |",
        "| --- " * 14 + "|",
    ]
    for r in rows:
        if r["impl"] != "mla":
            continue
        head = f"| {r['shape']} | {r['T']} | {r['budget']} | {r['select_tile']} "
        if "error" in r:
            lines.append(head + f"| {r['error'][:50]} | | | | | | | | |")
            continue
        cells = [
            f"{r['fwd_ms']:.2f}",
            f"{r['fwd_bwd_ms']:.2f}",
            f"{r['launches_fwd']} / {r['launches_fwd_bwd']}",
            f"{r['host_fwd_bwd_ms']:.2f}",
            _ms(r.get("graph_fwd_bwd_ms")),
            _ms(r.get("step_graph_fwd_bwd_ms")),
        ]
        for peer in ("cudnn", "flash"):
            p = peers.get((r["shape"], r["T"], peer))
            if p is None or "error" in p:
                cells += ["—", "—"]
                continue
            time_cell = f"{p['fwd_bwd_ms']:.2f}"
            ratio = f"{p['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}"
            if peer == "cudnn" and "graph_fwd_bwd_ms" in r and "graph_fwd_bwd_ms" in p:
                one, p_one = r["step_graph_fwd_bwd_ms"], p["step_graph_fwd_bwd_ms"]
                time_cell += f" ({p['graph_fwd_bwd_ms']:.2f}; {p_one:.2f})"
                ratio += (
                    f" ({p['graph_fwd_bwd_ms'] / r['graph_fwd_bwd_ms']:.2f}; {p_one / one:.2f})"
                )
            cells += [time_cell, ratio]
        lines.append(head + "| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("bench/tile_shapes.py needs a CUDA GPU")
    main()
