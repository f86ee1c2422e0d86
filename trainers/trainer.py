"""Training loop: AdamW, warm-up + cosine schedule, evaluation, checkpoints.

One process, or data-parallel when torch.distributed is initialised with several ranks (see
`distributed`): then `build_state` wraps the model in DistributedDataParallel, each rank trains
on its rows of every global batch (config.batch_size is the global batch), losses, validation
metrics and pruning importance are averaged over the ranks, and only rank 0 writes the run
folder and checkpoints and calls `report`. The trainer knows nothing of Ray Tune or Optuna: a
search reads its metrics through the `report` callback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
import torch.nn as nn
import yaml

from . import distributed as dist
from .attention_stats import attention_stats
from .benchmark import DeviceLock, StepGate, measure_throughput, sync, warmup_compiles
from .config import TrainConfig, build, to_dict
from .data import IGNORE, load_data, mqar_probe
from .fast_ops import prepare_model
from .model import LanguageModel, build_model, to_device
from .pruning import HeadPruner, compact
from .sequence_parallel import SequenceParallel
from .sequence_parallel import setup as setup_sequence_parallel
from .step_graph import StepGraph, frozen_heap

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "checkpoint.pt"
COMPACT_FILE = "model_compact.pt"
METRICS_LOG = "metrics.jsonl"
PRUNING_LOG = "pruning.jsonl"
Report = Callable[[dict, Path | None], None]


@dataclass
class TrainState:
    """What one optimisation step needs; `model` is the module the step calls (a DDP wrapper
    later), `raw_model` the LanguageModel underneath (for checkpoints and metrics)."""

    model: nn.Module
    raw_model: LanguageModel
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    device: torch.device
    autocast_dtype: torch.dtype | None
    grad_clip: float
    pruner: HeadPruner | None = None
    """Head pruning: `begin_step` before and `end_step` after each train_step."""
    graphs: StepGraph | None = None
    """The step's forward and backward replayed from a CUDA graph (`model.cuda_graphs`)."""

    def autocast(self, cache: bool = True) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # a CUDA graph must not capture autocast's cache of cast weights
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=cache)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available")
    return device


def build_state(config: TrainConfig, device: torch.device) -> TrainState:
    """Model (seeded by config.seed) and AdamW; decay only on the weight matrices. With several
    ranks `model` is a DistributedDataParallel wrapper of `raw_model`."""
    torch.manual_seed(config.seed)
    model = prepare_model(build_model(config.model).to(device), device)
    wrapped: nn.Module = model
    if dist.is_distributed():
        # buffers (head masks, rotary tables) are set identically on every rank
        wrapped = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            forward_sync_buffers=False,
        )
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        # norms and biases are vectors; the (tied) embedding is excluded by identity
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    autocast_dtype = None
    if device.type == "cuda" and config.dtype != "float32":
        autocast_dtype = getattr(torch, config.dtype)
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None
    pruner = None
    if config.pruning.enabled:
        pruner = HeadPruner(model, config.pruning, config.steps)
    graphs = step_graph_for(model, device, scaler)
    return TrainState(
        wrapped, model, optimizer, scaler, device, autocast_dtype, config.grad_clip, pruner, graphs
    )


def compile_kernels_ahead(
    model: LanguageModel, batch: int, seq_len: int, dtype: torch.dtype | None
) -> None:
    """Compile and load the MLA layers' Triton kernels for the training shape in parallel
    threads, one per core (up to 8), before the first step, which would otherwise do it one
    kernel at a time while the GPU waits (gpu.yaml's layer: 14 s one by one, 4.6 s in 8
    threads; bench/RESULTS.md). Where it does not apply (`Attention.compile_kernels`) or fails, the
    first step compiles them as before."""
    threads = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2)
    try:
        model.compile_kernels(batch, seq_len, dtype or torch.float32, threads)
    except Exception as e:  # the real launch compiles (and reports) the same kernels
        log.warning("MLA kernels not compiled ahead, the first step compiles them: %s", e)


def step_graph_for(
    model: LanguageModel, device: torch.device, scaler: torch.amp.GradScaler | None
) -> StepGraph | None:
    """A StepGraph for `model` where its `cuda_graphs` asks for one and the step can be
    captured: CUDA, one process (DDP and sequence parallelism communicate inside the step), no
    fp16 loss scaling (its step skips updates on a host decision). The model's per-op graphs
    go off beside it, and come back if a capture fails (the steps then stay eager)."""
    if model.cfg.graph_mode != "step" or device.type != "cuda" or scaler is not None:
        return None
    if dist.is_distributed():
        return None
    model.use_op_graphs(False)
    return StepGraph(list(model.parameters()), device, on_failure=lambda: model.use_op_graphs(True))


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of the step-th update (1-based): linear warm-up, then cosine decay."""
    warmup = min(config.warmup_steps, config.steps)
    if step <= warmup:
        return config.lr * step / warmup
    progress = (step - warmup) / max(1, config.steps - warmup)
    low = config.lr * config.min_lr_ratio
    return low + 0.5 * (1 + math.cos(math.pi * progress)) * (config.lr - low)


def train_step(state: TrainState, x: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
    """One update on batch (x, y); returns the detached loss (no device sync)."""
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    if state.graphs is not None:

        def forward(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            with state.autocast(cache=False):
                return state.model(x, y)[1]

        key = state.raw_model.layout_key()
        loss = state.graphs.forward_backward(x, y, key, forward)
    else:
        with state.autocast():
            _, loss = state.model(x, y)
        if state.scaler is not None:
            state.scaler.scale(loss).backward()
            state.scaler.unscale_(state.optimizer)
        else:
            loss.backward()
    if state.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(state.raw_model.parameters(), state.grad_clip)
    if state.scaler is not None:
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        state.optimizer.step()
    if state.graphs is None or not state.graphs.holds_grads:
        state.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


@torch.no_grad()
def evaluate(
    state: TrainState, batches: list[tuple[torch.Tensor, torch.Tensor]], mqar: bool = False
) -> dict[str, float]:
    """Mean validation loss over `batches` (and MQAR recall accuracy at the query positions)."""
    model = state.model
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=state.device)
    correct = torch.zeros((), device=state.device)
    asked = torch.zeros((), device=state.device)
    for x, y in batches:
        with state.autocast():
            logits, loss = model(x, y)
        loss_sum += loss.float()
        if mqar:
            mask = y != IGNORE
            # masked sums, not boolean indexing: indexing waits for the device to learn sizes
            correct += ((logits.argmax(-1) == y) & mask).sum()
            asked += mask.sum()
    model.train(was_training)
    # each rank holds its rows of every validation batch, with equal target counts per row
    dist.all_reduce_mean(loss_sum)
    out = {"val_loss": (loss_sum / len(batches)).item()}
    if mqar:
        dist.all_reduce_sum(correct)
        dist.all_reduce_sum(asked)
        out["mqar_acc"] = (correct / asked.clamp_min(1)).item()
    return out


def train(
    config: TrainConfig,
    *,
    out_dir: str | Path | None = None,
    report: Report | None = None,
    resume: str | Path | None = None,
    progress: bool = False,
    compact: bool | None = None,
) -> dict:
    """Train `config.model` on `config.data`; return the metrics of the last evaluation.

    out_dir (optional) receives config.yaml, metrics.jsonl (one line per evaluation) and
    checkpoint/checkpoint.pt; with pruning enabled also pruning.jsonl (one line per step: the
    active heads per layer, and the importance at each decision). compact (default: when
    pruning is enabled) writes model_compact.pt at the end, the final model without its pruned
    heads' weights, readable by `load_checkpoint`. report(metrics, checkpoint_dir) is called
    after every evaluation; checkpoint_dir is the folder holding the checkpoint written at that
    evaluation, or None when none was written. resume continues exactly from a checkpoint (its
    folder or file), pruning state included; out_dir's logs then continue the checkpoint's
    copies of them (see `_continue_log`).

    Data-parallel (torch.distributed initialised, several ranks): every rank calls train with
    the same config; config.batch_size is the global batch and must divide by the world size;
    metrics are those of the whole world, and only rank 0 writes out_dir and calls report.
    Raises FloatingPointError, naming the step, when the loss stops being finite.
    """
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        if compact is None:
            compact = config.pruning.enabled
        return _train(config, out_dir, report, resume, progress, compact)
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it


def _train(
    config: TrainConfig,
    out_dir: str | Path | None,
    report: Report | None,
    resume: str | Path | None,
    progress: bool,
    compact_model: bool,
) -> dict:
    t_start = time.perf_counter()
    device = dist.local_device(resolve_device(config.device))
    sp: SequenceParallel | None = None
    shard: Callable[..., tuple[torch.Tensor, ...]] = dist.shard
    if config.sequence_parallel > 1:
        sp = setup_sequence_parallel(config.sequence_parallel)
        shard = sp.shard
    rows = dist.check_batch(config.batch_size, None if sp is None else sp.dp_size)
    if not dist.is_main():
        out_dir, report, progress, compact_model = None, None, False, False
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.cuda.reset_peak_memory_stats(device)

    train_data, val_data = load_data(
        config.data, config.seq_len, vocab_size=config.model.vocab_size
    )
    state = build_state(config, device)
    state.raw_model.set_sequence_parallel(sp)
    generator = torch.Generator().manual_seed(config.seed)
    start_step, prior_elapsed = 0, 0.0
    if resume is not None:
        start_step, prior_elapsed = _restore(Path(resume), state, generator, config)

    compile_kernels_ahead(state.raw_model, rows, config.seq_len, state.autocast_dtype)

    run_dir = Path(out_dir) if out_dir is not None else None
    ckpt_dir = run_dir / CHECKPOINT_DIR if run_dir is not None else None
    metrics_file = pruning_file = None
    pruner = state.pruner
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "config.yaml", "w") as f:
            yaml.safe_dump(to_dict(config), f, sort_keys=False)
        saved = None if resume is None else _checkpoint_file(Path(resume)).parent
        metrics_file = _continue_log(run_dir / METRICS_LOG, saved, start_step)
        if pruner is not None:
            pruning_file = _continue_log(run_dir / PRUNING_LOG, saved, start_step)
    logs = [Path(f.name) for f in (metrics_file, pruning_file) if f is not None]

    is_mqar = config.data.source == "mqar"
    val_batches = _on_device(val_data, config, device, shard)
    probe = mqar_probe(config.data, config.seq_len, config.model.vocab_size)
    probe_batches = _on_device(probe, config, device, shard) if probe is not None else None
    tokens_per_step = config.batch_size * config.seq_len
    model = state.raw_model
    # losses are checked in groups, so that a GPU is not synchronised every step
    losses = _LossLog(sync_every=1 if device.type == "cpu" else 16)
    clock = _StepClock(device)
    metrics: dict[str, Any] = {}
    bench = _Benchmarks(config, state)

    bar = _progress_bar(progress, config.steps, start_step)
    timeline = _Timeline(setup_s=time.perf_counter() - t_start)
    try:
        # CUDA runs capture graphs, and each capture collects garbage first (`no_gc`)
        frozen = frozen_heap() if device.type == "cuda" else contextlib.nullcontext()
        with bar or contextlib.nullcontext(), frozen:
            state.model.train()
            clock.start()
            for step in range(start_step + 1, config.steps + 1):
                if step - start_step == config.throughput_warmup + 1:
                    clock.steady()
                x, y = shard(*train_data.sample(config.batch_size, generator))
                if pruner is not None:
                    pruner.begin_step(step)
                warming_up = step - start_step <= config.throughput_warmup
                bench.before_step(warming_up)
                # a plain host-to-GPU copy waits for the GPU's queue; a pinned one does not
                x, y = to_device(x, device), to_device(y, device)
                loss = train_step(state, x, y, lr_at(step, config))
                bench.after_step(warming_up)
                if pruner is not None:
                    dist.all_reduce_mean(pruner.acc)  # the global batch's Taylor scores
                    record = pruner.end_step(step)
                    if pruning_file is not None:
                        pruning_file.write(json.dumps(record) + "\n")
                clock.tick()
                is_eval = step % config.eval_every == 0 or step == config.steps
                if losses.add(step, loss, flush=is_eval) and bar is not None:
                    tps = clock.tokens_per_s(tokens_per_step)
                    bar.update(_TASK, completed=step, loss=f"{losses.last:.4f}", tps=f"{tps:,.0f}")
                is_checkpoint = ckpt_dir is not None and _checkpoint_due(step, config)
                if not (is_eval or is_checkpoint):
                    continue

                clock.stop()  # evaluation and checkpoint writes are not training throughput
                bench.pause()
                elapsed = prior_elapsed + time.perf_counter() - t_start
                if is_eval:
                    with bench.holding_device():
                        with timeline.timing("val_s"):
                            ev = evaluate(state, val_batches, mqar=is_mqar)
                            if probe_batches is not None:  # MQAR mixed into the training data
                                probe = evaluate(state, probe_batches, mqar=True)
                                ev["mqar_acc"] = probe["mqar_acc"]
                        # one validation row: the gates, heads and sparse reach (the report's
                        # view of what the attention learned)
                        with timeline.timing("stats_s"):
                            learned = attention_stats(model, val_batches[0][0], state.autocast())
                    if not math.isfinite(ev["val_loss"]):
                        raise FloatingPointError(
                            f"validation loss is {ev['val_loss']} at step {step}"
                        )
                    heads = model.active_heads_per_layer()
                    mem, mem_kind = bench.peak_memory()
                    tps = clock.tokens_per_s(tokens_per_step)
                    with timeline.timing("benchmark_s"):
                        measured = bench.measure(tps)
                    metrics = {
                        "step": step,
                        "tokens": step * tokens_per_step,
                        "train_loss": losses.mean(),
                        "val_loss": ev["val_loss"],
                        "val_ppl": math.exp(min(ev["val_loss"], 700.0)),
                        "tokens_per_s": tps,
                        **measured,
                        "peak_mem_gb": mem,
                        "peak_mem_kind": mem_kind,
                        "attn_flops": model.attn_flops_per_token(config.seq_len),
                        "active_heads": sum(heads),
                        "active_heads_per_layer": heads,
                        "active_kv_heads_per_layer": model.active_kv_heads_per_layer(),
                        "elapsed_s": elapsed,
                        **timeline.metrics(clock),
                        "lr": lr_at(step, config),
                        "params": model.num_params(),
                        **({"mqar_acc": ev["mqar_acc"]} if "mqar_acc" in ev else {}),
                        **learned,
                    }
                if is_eval and metrics_file is not None:
                    metrics_file.write(json.dumps(metrics) + "\n")
                if is_eval or is_checkpoint:  # on disk for the report and the checkpoint
                    for f in (metrics_file, pruning_file):
                        if f is not None:
                            f.flush()
                if is_checkpoint:  # after the logs: its copies of them include this step
                    save_checkpoint(ckpt_dir, state, generator, config, step, elapsed, logs)
                if is_eval:
                    if report is not None:
                        report(dict(metrics), ckpt_dir if is_checkpoint else None)
                    if bar is not None:
                        bar.update(_TASK, val=f"{ev['val_loss']:.4f}")
                clock.start()
    finally:
        bench.close()
        for f in (metrics_file, pruning_file):
            if f is not None:
                f.close()
    if compact_model and run_dir is not None:
        save_compact(run_dir / COMPACT_FILE, model, config)
    return metrics


def _on_device(source: Any, config: TrainConfig, device: torch.device, shard: Callable) -> list:
    """The fixed evaluation batches of a source, this rank's share of each, on the device."""
    batches = source.fixed_batches(config.eval_batches, config.batch_size)
    return [(x.to(device), y.to(device)) for x, y in (shard(*b) for b in batches)]


def save_compact(path: Path, model: LanguageModel, config: TrainConfig) -> Path:
    """Write `compact(model)` with its TrainConfig (pruning off: its heads are already gone),
    in the checkpoint format that `load_checkpoint` reads."""
    small = compact(model)
    config = dataclasses.replace(
        config, model=small.cfg, pruning=dataclasses.replace(config.pruning, enabled=False)
    )
    tmp = path.with_suffix(".tmp")
    torch.save({"model": small.state_dict(), "config": to_dict(config)}, tmp)
    os.replace(tmp, path)
    return path


def save_checkpoint(
    ckpt_dir: Path,
    state: TrainState,
    generator: torch.Generator,
    config: TrainConfig,
    step: int,
    elapsed_s: float,
    logs: Iterable[Path] = (),
) -> Path:
    """Everything resume needs: weights, optimizer, RNG streams, step, config (atomic write),
    and copies of the run folder's `logs` (metrics.jsonl, pruning.jsonl) for `_continue_log`.
    The copies go first: a crash between the writes leaves logs ahead of the checkpoint, whose
    extra lines a resume drops, never logs behind it."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for log_path in logs:
        tmp = ckpt_dir / f"{log_path.name}.tmp"
        shutil.copyfile(log_path, tmp)
        os.replace(tmp, ckpt_dir / log_path.name)
    payload = {
        "model": state.raw_model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "step": step,
        "elapsed_s": elapsed_s,
        "data_rng": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if state.device.type == "cuda" else None,
        "config": to_dict(config),
        "pruning": state.pruner.state_dict() if state.pruner is not None else None,
    }
    path = ckpt_dir / CHECKPOINT_FILE
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path) -> tuple[LanguageModel, TrainConfig]:
    """The model (on CPU, in eval mode) and the TrainConfig stored in a checkpoint (its folder
    or file; also a model_compact.pt)."""
    payload = _read_checkpoint(Path(path))
    config = build(TrainConfig, payload["config"])
    model = build_model(config.model)
    model.load_state_dict(payload["model"])
    return model.eval(), config


def _restore(
    path: Path, state: TrainState, generator: torch.Generator, config: TrainConfig
) -> tuple[int, float]:
    payload = _read_checkpoint(path)
    if payload["config"]["model"] != to_dict(config.model):
        raise ValueError(
            f"checkpoint {path} holds a different model config than the one given; "
            "resume needs the same model"
        )
    step = payload["step"]
    if step >= config.steps:
        raise ValueError(
            f"checkpoint {path} is at step {step}: nothing left of steps={config.steps}"
        )
    state.raw_model.load_state_dict(payload["model"])
    if state.pruner is not None and payload.get("pruning") is not None:
        state.pruner.load_state_dict(payload["pruning"])
    elif state.pruner is not None:
        # pruning starts on a checkpoint written without it: masks as loaded, fresh scores
        state.pruner = HeadPruner(state.raw_model, config.pruning, config.steps)
    state.optimizer.load_state_dict(payload["optimizer"])
    if state.scaler is not None and payload["scaler"] is not None:
        state.scaler.load_state_dict(payload["scaler"])
    generator.set_state(payload["data_rng"])
    torch.set_rng_state(payload["torch_rng"])
    if payload["cuda_rng"] is not None and state.device.type == "cuda":
        torch.cuda.set_rng_state_all(payload["cuda_rng"])
    return step, float(payload["elapsed_s"])


def _checkpoint_file(path: Path) -> Path:
    return path / CHECKPOINT_FILE if path.is_dir() else path


def _read_checkpoint(path: Path) -> dict:
    path = _checkpoint_file(path)
    if not path.is_file():
        raise ValueError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def _continue_log(path: Path, checkpoint_dir: Path | None, step: int) -> IO[str]:
    """The run folder's log `path`, opened for appending: empty when not resuming, else holding
    the lines of steps up to `step`, the checkpoint's, taken from its copy (`save_checkpoint`).
    The folder's own log may lack them: a retried Tune trial writes into a staging folder that
    is empty on another node or in a resumed search, and Tune's sync then overwrites the synced
    log with it. Lines of later steps are dropped, as those steps run again. A checkpoint
    without copies (written before they were kept) continues the folder's own log."""
    lines: list[str] = []
    if checkpoint_dir is not None:
        source = checkpoint_dir / path.name
        if not source.is_file():
            source = path
        if source.is_file():
            lines = [s for s in source.read_text().splitlines(True) if _logged_step(s) <= step]
    path.write_text("".join(lines))
    return open(path, "a")


def _logged_step(line: str) -> float:
    """A log line's step; infinite (dropped) for a line cut short by a killed process."""
    try:
        return json.loads(line)["step"] if line.endswith("\n") else math.inf
    except (ValueError, KeyError, TypeError):
        return math.inf


def _checkpoint_due(step: int, config: TrainConfig) -> bool:
    if config.checkpoint_every:
        return step % config.checkpoint_every == 0 or step == config.steps
    return step % config.eval_every == 0 or step == config.steps


class _LossLog:
    """Training losses since the last evaluation, read off the device in groups; a loss that
    is not finite raises FloatingPointError naming its step."""

    def __init__(self, sync_every: int):
        self.sync_every = sync_every
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.total, self.count, self.last = 0.0, 0, float("nan")

    def add(self, step: int, loss: torch.Tensor, flush: bool = False) -> bool:
        """Queue one step's loss; returns True when the queue was read (and checked)."""
        self.pending.append((step, loss))
        if not flush and len(self.pending) < self.sync_every:
            return False
        # averaged over ranks: every rank sees, and raises on, the same values
        stacked = torch.stack([loss.float() for _, loss in self.pending])
        values = dist.all_reduce_mean(stacked).tolist()
        for (s, _), value in zip(self.pending, values):
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"training loss is {value} at step {s}: the run diverged "
                    "(a lower lr, a longer warm-up or gradient clipping may help)"
                )
        self.pending.clear()
        self.total += sum(values)
        self.count += len(values)
        self.last = values[-1]
        return True

    def mean(self) -> float:
        """Mean loss since the previous call, which starts a new window."""
        mean = self.total / max(1, self.count)
        self.total, self.count = 0.0, 0
        return mean


class _Benchmarks:
    """The exclusive throughput benchmark at each evaluation (config.benchmark), and the
    per-device lock that training steps share with the benchmarks of other processes.

    With several ranks the trial owns its GPUs, so the training clock already is the honest
    figure: only the `contexts` are measured, by rank 0 on its device, while the other ranks
    wait at the next gradient all-reduce.
    """

    def __init__(self, config: TrainConfig, state: TrainState):
        self.cfg, self.state, self.config = config.benchmark, state, config
        self.replace = self.cfg.enabled and not dist.is_distributed()
        self.active = self.replace or bool(self.cfg.contexts)
        self.lock = self.gate = None
        if self.active and not dist.is_distributed():
            self.lock = DeviceLock.for_device(state.device)
            # a GPU runs ahead of Python: sync and release only every few steps
            self.gate = StepGate(self.lock, state.device, 8 if state.device.type == "cuda" else 1)
        self._peak = 0.0
        self._evaluated = False
        self._measured: dict[tuple, dict[str, float]] = {}
        """Results by (head layout, seq_len, batch): measured once unless `every_eval`."""

    @property
    def compiles(self) -> bool:
        """The warm-up steps and the first evaluation then hold no lock (`warmup_compiles`)."""
        return warmup_compiles(self.state.device)

    def _holds(self, warming_up: bool) -> bool:
        return self.gate is not None and not (warming_up and self.compiles)

    def before_step(self, warming_up: bool = False) -> None:
        if self._holds(warming_up):
            self.gate.before_step()

    def after_step(self, warming_up: bool = False) -> None:
        if self._holds(warming_up):
            self.gate.after_step()

    def pause(self) -> None:
        if self.gate is not None:
            self.gate.pause()

    @contextlib.contextmanager
    def holding_device(self) -> Iterator[None]:
        """Evaluations use the device too: a neighbour's benchmark waits for them (except for
        the first where it compiles, see `compiles`)."""
        first, self._evaluated = not self._evaluated, True
        if not self._holds(warming_up=first):
            yield
            return
        self.gate.before_step()
        try:
            yield
        finally:
            self.gate.pause()

    def peak_memory(self) -> tuple[float, str]:
        """The training peak: benchmarks at a longer context reset CUDA's counter after them."""
        mem, kind = _peak_memory(self.state.device)
        self._peak = max(self._peak, dist.all_max(mem))
        return self._peak, kind

    def measure(self, train_tps: float) -> dict[str, float]:
        """Metrics to merge: tokens_per_s (replaced), train_tokens_per_s, tokens_per_s@T."""
        if not self.active:
            return {}
        out: dict[str, float] = {"train_tokens_per_s": train_tps}
        runs = []
        if self.replace:
            runs.append(("tokens_per_s", self.config.seq_len, self.config.batch_size))
        runs += [(f"tokens_per_s@{t}", t, self.cfg.context_batch) for t in self.cfg.contexts]
        if dist.is_main():
            wait = 0.0
            layout = self.state.raw_model.layout_key()
            for key, seq_len, batch in runs:
                r = self._measured.get((layout, seq_len, batch))
                if r is None or self.cfg.every_eval:
                    r = measure_throughput(
                        self.state,
                        seq_len,
                        batch,
                        steps=self.cfg.steps,
                        warmup=self.cfg.warmup,
                        lock=self.lock,
                    )
                    self._measured[(layout, seq_len, batch)] = r
                else:
                    r = {**r, "wait_s": 0.0}
                out[key] = r["tokens_per_s"]
                # a launch-bound step shows as host_ms close to step_ms (see measure_throughput)
                at = key.removeprefix("tokens_per_s")
                out[f"benchmark_step_ms{at}"] = r["step_ms"]
                out[f"benchmark_host_ms{at}"] = r["host_ms"]
                wait += r["wait_s"]
            out["benchmark_wait_s"] = wait
            if self.state.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.state.device)
        return out

    def close(self) -> None:
        if self.lock is not None:
            self.lock.close()


class _Timeline:
    """Where this process's run time went, in cumulative seconds: set-up before the first
    step, the warm-up and steady steps (from the step clock), validation, the attention
    statistics and the benchmark. A search's trials are short, so their start-up and
    evaluations weigh as much as their training."""

    def __init__(self, setup_s: float):
        self.seconds = {"setup_s": setup_s, "val_s": 0.0, "stats_s": 0.0, "benchmark_s": 0.0}

    @contextlib.contextmanager
    def timing(self, key: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[key] += time.perf_counter() - t0

    def metrics(self, clock: _StepClock) -> dict[str, float]:
        return {**self.seconds, "warmup_s": clock.time[0], "steady_s": clock.time[1]}


class _StepClock:
    """Training time in two buckets, warm-up steps and steady-state steps; the device is
    synchronised only where a bucket opens or closes (around evaluations)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.time = [0.0, 0.0]
        self.steps = [0, 0]
        self.bucket = 0
        self.t0: float | None = None

    def _now(self) -> float:
        sync(self.device)
        return time.perf_counter()

    def start(self) -> None:
        self.t0 = self._now()

    def stop(self) -> None:
        if self.t0 is not None:
            self.time[self.bucket] += self._now() - self.t0
            self.t0 = None

    def steady(self) -> None:
        self.stop()
        self.bucket = 1
        self.start()

    def tick(self) -> None:
        self.steps[self.bucket] += 1

    def tokens_per_s(self, tokens_per_step: int) -> float:
        """Steady-state throughput; all steps when no step is past the warm-up yet."""
        b = 1 if self.steps[1] else 0
        seconds = self.time[b]
        if self.t0 is not None and self.bucket == b:
            seconds += time.perf_counter() - self.t0  # an open interval: progress bar only
        return self.steps[b] * tokens_per_step / seconds if seconds > 0 else 0.0


def _peak_memory(device: torch.device) -> tuple[float, str]:
    """(GiB, kind): the CUDA allocator's peak, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_allocated"
    import resource  # POSIX only, and only needed on CPU

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB
    return rss_bytes / 2**30, "cpu_peak_rss"


def _progress_bar(enabled: bool, steps: int, start: int):
    if not enabled:
        return None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("val {task.fields[val]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    bar.add_task("train", total=steps, completed=start, loss="-", val="-", tps="-")
    return bar


_TASK = 0  # the progress bar's only task
