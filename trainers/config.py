"""Typed configs of the model, the data and the trainer, and a strict builder from plain dicts.

`build(cls, data)` turns nested dicts (from YAML) into these dataclasses. Every error names the
key path and what was expected, so a bad file is reported as `model.mla.ratios: ...`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from automla.kernels import AttentionConfig, HeadGroups
from automla.kernels.ops import Backend  # the op's own list, so the two cannot drift apart

DataSource = Literal["stdlib", "text", "tokens", "mqar"]


class ConfigError(ValueError):
    """A config value is wrong; `path` is the dotted key path ('' for the root)."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


@dataclass(kw_only=True)
class ModelConfig:
    """Decoder-only LM: pre-norm, RMSNorm, rotary positions, SwiGLU MLP, tied embeddings."""

    vocab_size: int = 256
    """256 fits the byte-level stdlib/text data."""
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    """Query heads."""
    n_kv_heads: int = 2
    """Key/value heads; n_heads / n_kv_heads query heads share one (GQA)."""
    head_dim: int | None = None
    """None: d_model // n_heads."""
    ffn_mult: float = 8 / 3
    """SwiGLU hidden width = ffn_mult * d_model, rounded up to a multiple of 32."""
    max_seq_len: int = 256
    """Longest sequence; also fixes the MLA global stride (the plan's t_max)."""
    rope_base: float = 10_000.0
    """Rotary frequency base."""
    attention: Literal["mla", "dense"] = "mla"
    mla: AttentionConfig = field(default_factory=AttentionConfig)
    attn_backend: Backend = "auto"
    """auto: Triton kernels on CUDA, the budget-cost PyTorch path elsewhere."""
    cuda_graphs: bool | Literal["op", "step"] = False
    """CUDA graphs, for models whose kernels take less time than Python needs to launch them.
    "op": each layer's MLA op (~22 launches, forward and backward) replayed from graphs
    captured once per input shape and head mask, where it runs on the Triton kernels. "step"
    (and true): the whole forward and backward of a training step replayed from one graph
    (`trainers/step_graph.py`; CUDA, one process, bfloat16 or float32), and "op" wherever
    that does not apply (fp16, several ranks, a step that cannot be captured); evaluations
    and the first step of each head layout then run eagerly (as fast as per-op graphs with
    warm compile caches, and faster with cold ones: bench/RESULTS.md).
    With fused ops a captured step takes the chunked linear + cross-entropy
    (`trainers/cross_entropy.py`), which never holds the logits; without them, the loss over
    the whole logits, the memory peak of long contexts with large vocabularies."""
    fused_ops: bool | None = None
    """Triton ops for RMSNorm and (training) linear + cross-entropy without the logits tensor
    (our own, `trainers/rms_norm.py` and `cross_entropy.py`), and liger-kernel's for SwiGLU and
    rotary. None: on where the model runs on CUDA and liger-kernel is installed (the `gpu`
    extra); the plain PyTorch ops elsewhere."""
    precision: Literal["bf16", "fp8"] = "bf16"
    """fp8: torchao float8 training for the q/k/v/o projections and the MLP's linears (CUDA
    only, their widths multiples of 16); the gate MLP, embeddings, norms, attention and loss
    stay in `train.dtype` / float32. bf16: every linear in `train.dtype`."""
    checkpoint: Literal["none", "attention", "block"] = "none"
    """Activation checkpointing in training: recompute each block's attention sublayer (with
    its norm), or the whole block, in the backward instead of keeping its activations."""
    kept_heads: list[list[int]] | None = None
    """A compacted model (see `pruning.compact`): per layer, the original ids of the query heads
    whose weights remain; a KV head remains while any head of its group does. None: all."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                "n_kv_heads", f"must divide n_heads ({self.n_heads}), got {self.n_kv_heads}"
            )
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ConfigError(
                    "n_heads", f"must divide d_model ({self.d_model}) when head_dim is unset"
                )
            self.head_dim = self.d_model // self.n_heads
        if self.head_dim < 2 or self.head_dim % 2:
            raise ConfigError("head_dim", f"must be even and >= 2 (rotary), got {self.head_dim}")
        if self.ffn_mult <= 0:
            raise ConfigError("ffn_mult", f"must be > 0, got {self.ffn_mult}")
        if self.kept_heads is not None:
            if len(self.kept_heads) != self.n_layers:
                raise ConfigError(
                    "kept_heads",
                    f"needs one list per layer ({self.n_layers}), got {len(self.kept_heads)}",
                )
            for i, heads in enumerate(self.kept_heads):
                if not heads or list(heads) != sorted(set(heads)):
                    raise ConfigError(
                        f"kept_heads[{i}]", f"must be non-empty, sorted and unique, got {heads}"
                    )
                if heads[0] < 0 or heads[-1] >= self.n_heads:
                    raise ConfigError(
                        f"kept_heads[{i}]", f"head ids must lie in [0, {self.n_heads}), got {heads}"
                    )

        if self.checkpoint != "none" and self.cuda_graphs:
            raise ConfigError(
                "checkpoint",
                "cannot recompute the MLA op replayed from CUDA graphs (cuda_graphs: its "
                "capture and static buffers assume one forward per backward); turn one off",
            )
        if self.precision == "fp8":
            self._check_fp8()

    @property
    def graph_mode(self) -> Literal["off", "op", "step"]:
        """What `cuda_graphs` asks for: true is "step"."""
        if self.cuda_graphs is False:
            return "off"
        return "step" if self.cuda_graphs is True else self.cuda_graphs

    def _check_fp8(self) -> None:
        """float8 matmuls need both dimensions of every converted linear divisible by 16."""
        hidden = 32 * math.ceil(self.ffn_mult * self.d_model / 32)  # a multiple of 32
        widths = {"d_model": self.d_model, "MLP hidden": hidden}
        kv = [len(g) for g in self.group_sizes()]
        for layer, (hq, hkv) in enumerate(zip(self.heads_per_layer(), kv)):
            widths[f"layer {layer} query heads x head_dim"] = hq * self.head_dim
            widths[f"layer {layer} q/k/v rows"] = (hq + 2 * hkv) * self.head_dim
        for name, width in widths.items():
            if width % 16:
                raise ConfigError(
                    "precision", f"fp8 needs widths divisible by 16; {name} is {width}"
                )

    def heads_per_layer(self) -> list[int]:
        """Query heads each layer holds weights for."""
        return [sum(groups) for groups in self.group_sizes()]

    def group_sizes(self) -> list[list[int]]:
        """Per layer, the query heads held in each GQA group that still has any."""
        groups = HeadGroups(self.n_heads, self.n_kv_heads)
        if self.kept_heads is None:
            return [[groups.size] * self.n_kv_heads for _ in range(self.n_layers)]
        return [
            [len(members) for members in groups.by_group(heads).values()]
            for heads in self.kept_heads
        ]


@dataclass(kw_only=True)
class DataConfig:
    """Where training tokens come from; all sources are offline."""

    source: DataSource = "stdlib"
    path: str | None = None
    """The file for `text` (UTF-8, byte tokens) or `tokens` (flat uint16, nanoGPT .bin)."""
    val_fraction: float = 0.05
    """Share of files (stdlib, by a hash of the path) or of tokens held out for validation."""
    max_bytes: int | None = None
    """Bytes read from the source: the stdlib corpus (None: the first 8 MB, to keep start-up
    fast), or the head of a `text` or `tokens` file (None: the whole file)."""
    mqar_pairs: int = 8
    """MQAR: key-value pairs per sequence (the queries ask for all of them)."""
    mqar_vocab: int = 128
    """MQAR: token ids used: 0 fills the gaps, keys come from the lower half of the rest and
    values from the upper half."""
    mqar_examples: int = 16_384
    """MQAR: training sequences generated from `seed` (a fixed set, as in Zoology)."""
    mqar_val_examples: int = 1_024
    """MQAR: validation sequences, generated from a seed derived from `seed`."""
    mqar_mix: float = 0.0
    """With another source: this share of every training batch's rows is MQAR, its token ids
    moved to the top `mqar_vocab` ids of the model's vocabulary (above the main data's), and
    each evaluation also reports mqar_acc on the MQAR validation set; val_loss stays the main
    data's."""
    seed: int = 0
    """Seeds the MQAR sets and the fixed validation windows."""

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise ConfigError("val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        if self.source in ("text", "tokens") and not self.path:
            raise ConfigError("path", f"source '{self.source}' needs a file path")
        if self.mqar_pairs < 1 or self.mqar_vocab < 4:
            raise ConfigError("mqar_pairs", "needs mqar_pairs >= 1 and mqar_vocab >= 4")
        if self.mqar_pairs > (self.mqar_vocab - 1) // 2:
            raise ConfigError(
                "mqar_pairs",
                f"{self.mqar_pairs} distinct keys need mqar_vocab >= {2 * self.mqar_pairs + 1}, "
                f"got {self.mqar_vocab}",
            )
        if self.mqar_examples < 1 or self.mqar_val_examples < 1:
            raise ConfigError("mqar_examples", "mqar_examples and mqar_val_examples must be >= 1")
        if not 0.0 <= self.mqar_mix < 1.0:
            raise ConfigError("mqar_mix", f"must be in [0, 1), got {self.mqar_mix}")
        if self.mqar_mix > 0 and self.source == "mqar":
            raise ConfigError("mqar_mix", "mixes MQAR into another source; source is mqar")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise ConfigError("max_bytes", f"must be >= 1 or null, got {self.max_bytes}")


@dataclass(kw_only=True)
class PruningConfig:
    """Dynamic head pruning (DESIGN §2): Taylor importance, a schedule, a ramped mask.

    Importance is |dL/dxi_h| = |sum over tokens of <o_h, dL/d(xi_h o_h)>| per step, divided by
    the mean of the same score over the layer's kept heads (so 1.0 is a typical surviving head
    of that layer), then smoothed by an EMA. Every `interval` steps after `warmup_steps` the
    least important heads are chosen, across all layers, for removal.
    """

    enabled: bool = False
    fraction: float = 0.0
    """Share of query heads to remove, reached linearly from warmup_steps to end_step. With a
    threshold as well, an upper bound on the heads the threshold may remove."""
    threshold: float | None = None
    """Remove heads whose normalised importance is below this (None: off)."""
    warmup_steps: int = 50
    """Steps of training before the first decision (scores are still gathered)."""
    interval: int = 10
    """Steps between decisions."""
    end_step: int | None = None
    """Step at which the whole fraction is reached; None: half of the run."""
    ramp_steps: int = 20
    """A removed head's mask falls linearly to 0 over these steps, so the network can
    compensate; 0 cuts it at once."""
    regrow: bool = False
    """Removed heads stay candidates: at each decision they are computed for that one step
    (mask value 0, so no effect on the loss and no gradient) to measure their importance, and
    a head that ranks among the kept again ramps back in."""
    ema: float = 0.9
    """Per-step decay of the importance EMA; a head measured after a gap of n steps decays
    by ema**n."""
    min_heads_per_layer: int = 1
    """No layer keeps fewer query heads than this."""
    granularity: Literal["head", "group"] = "head"
    """What one decision removes: a query head, or a whole GQA group (its query heads, and with
    them their KV head) ranked by its heads' mean importance. Only whole groups shrink the
    sparse branch's kernels, which work per KV head (bench/RESULTS.md, head pruning). The
    fraction still counts query heads: a group goes only while it fits in what is left of it,
    and a threshold applies to the group's mean."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise ConfigError("fraction", f"must be in [0, 1), got {self.fraction}")
        if self.threshold is not None and not (0.0 <= self.threshold < float("inf")):
            raise ConfigError("threshold", f"must be >= 0 and finite or null, got {self.threshold}")
        for name in ("warmup_steps", "ramp_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.interval < 1:
            raise ConfigError("interval", f"must be >= 1, got {self.interval}")
        if self.end_step is not None and self.end_step <= self.warmup_steps:
            raise ConfigError(
                "end_step", f"must exceed warmup_steps ({self.warmup_steps}), got {self.end_step}"
            )
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError("ema", f"must be in [0, 1), got {self.ema}")
        if self.min_heads_per_layer < 1:
            raise ConfigError(
                "min_heads_per_layer", f"must be >= 1, got {self.min_heads_per_layer}"
            )
        if self.enabled and self.fraction == 0.0 and self.threshold is None:
            raise ConfigError(
                "fraction", "pruning is enabled but neither fraction nor threshold is set"
            )

    def heads_to_remove(self, n_heads: int) -> int:
        """Heads the whole fraction removes out of n_heads."""
        return math.floor(self.fraction * n_heads + 0.5)


def _removable_in_groups(groups: list[int], floor: int) -> int:
    """Query heads a layer with these group sizes can lose in whole groups, keeping >= floor:
    the fewest groups that reach the floor stay (the largest ones)."""
    kept = 0
    for size in sorted(groups, reverse=True):
        if kept >= floor:
            break
        kept += size
    return sum(groups) - kept


@dataclass(kw_only=True)
class BenchmarkConfig:
    """The exclusive throughput benchmark run at each evaluation (see `trainers.benchmark`):
    `tokens_per_s` then is the configuration's speed alone on the device, and the training
    clock's figure moves to `train_tokens_per_s`."""

    enabled: bool = False
    steps: int = 5
    """Timed steps; the median counts."""
    warmup: int = 2
    """Steps before timing (kernel compilation, allocator, optimiser state)."""
    contexts: list[int] = field(default_factory=list)
    """Also measure at these sequence lengths (batch `context_batch`), as `tokens_per_s@T`:
    the speed at the length the model will be deployed at, longer than it trains at."""
    context_batch: int = 1
    every_eval: bool = False
    """Measure again at every evaluation. Off: once per head layout (a model's speed changes
    when pruning changes its heads, not as its weights train), so a search's trials spend
    less time waiting for each other's exclusive benchmarks."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.warmup < 0:
            raise ConfigError("steps", "needs steps >= 1 and warmup >= 0")
        if self.context_batch < 1:
            raise ConfigError("context_batch", f"must be >= 1, got {self.context_batch}")
        for i, t in enumerate(self.contexts):
            if t < 1:
                raise ConfigError(f"contexts[{i}]", f"must be >= 1, got {t}")


@dataclass(kw_only=True)
class TrainConfig:
    """One training run: model, data and optimisation."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    """Cosine schedule ends at lr * min_lr_ratio."""
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    checkpoint_every: int = 0
    """0: checkpoint at each evaluation and at the end."""
    throughput_warmup: int = 5
    """Steps left out of tokens_per_s (compilation, allocator warm-up); on CUDA they also run
    outside the device lock that neighbours' benchmarks wait on (`train.benchmark`)."""
    seed: int = 0
    """Seeds the model's initialisation and the order of training batches."""
    device: str = "auto"
    """auto: cuda if available, else cpu."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Autocast dtype on CUDA; CPU always trains in float32."""
    threads: int | None = None
    """torch.set_num_threads on CPU; None leaves torch's default."""
    pruning: PruningConfig = field(default_factory=PruningConfig)
    """Off by default."""
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    """Off by default: tokens_per_s is the training clock's."""
    sequence_parallel: int = 1
    """P: ranks sharing each sequence (Ulysses-style, `sequence_parallel.py`); the world's
    ranks form world / P data-parallel groups of P. A search sets it from
    `resources.sequence_parallel`."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if self.seq_len > self.model.max_seq_len:
            raise ConfigError(
                "seq_len", f"{self.seq_len} exceeds model.max_seq_len {self.model.max_seq_len}"
            )
        d = self.data
        if d.mqar_mix > 0 and d.source in ("stdlib", "text"):
            need = 256 + d.mqar_vocab  # bytes, then MQAR's ids
            if self.model.vocab_size < need:
                raise ConfigError(
                    "model.vocab_size",
                    f"data.mqar_mix puts MQAR's {d.mqar_vocab} ids above the 256 byte ids: "
                    f"needs at least {need}, got {self.model.vocab_size}",
                )
        if self.model.attention == "mla":
            self._check_mla_fits()
        if self.pruning.enabled:
            self._check_pruning()
        if self.sequence_parallel != 1:
            self._check_sequence_parallel()
        if self.device.startswith("cpu"):
            if self.model.precision == "fp8":
                raise ConfigError("model.precision", "fp8 needs a CUDA GPU; device is cpu")
            if self.model.fused_ops:
                raise ConfigError("model.fused_ops", "the fused ops need CUDA; device is cpu")

    def _check_sequence_parallel(self) -> None:
        """Each rank attends whole KV groups (MLA) or at least one query head (dense)."""
        P, m = self.sequence_parallel, self.model
        if P < 1:
            raise ConfigError("sequence_parallel", f"must be >= 1, got {P}")
        if m.attention == "mla" and m.n_kv_heads < P:
            raise ConfigError(
                "sequence_parallel",
                f"{P} ranks share each sequence, but MLA splits them whole KV groups and the "
                f"model has {m.n_kv_heads} (model.n_kv_heads): a group's query heads share "
                "one sparse selection, so a group is never split; use n_kv_heads >= P "
                "(a multiple of P runs fastest: equal groups per rank)",
            )
        if m.attention == "dense" and m.n_heads < P:
            raise ConfigError(
                "sequence_parallel",
                f"{P} ranks share each sequence, but the model has {m.n_heads} query heads "
                "(model.n_heads): each rank needs at least one",
            )
        if self.benchmark.contexts:
            raise ConfigError(
                "benchmark.contexts",
                "not measured with sequence_parallel > 1 (rank 0 measures them alone)",
            )

    def _check_mla_fits(self) -> None:
        """Reject MLA sizes that no sequence can use (they would only fail in the kernels):
        sequences hold at most model.max_seq_len keys."""
        mla, t_max = self.model.mla, self.model.max_seq_len
        if mla.budget > t_max:
            raise ConfigError(
                "model.mla.budget",
                f"{mla.budget} exceeds model.max_seq_len ({t_max}): no query reads more than "
                f"{t_max} keys; lower the budget or raise max_seq_len",
            )
        plan = mla.plan(t_max)
        if (plan.has_global or plan.has_sparse) and mla.block_size > t_max:
            raise ConfigError(
                "model.mla.block_size",
                f"{mla.block_size} exceeds model.max_seq_len ({t_max}): no sequence holds a "
                "whole block for the global and sparse branches",
            )
        if plan.n_select * plan.block_size > t_max:
            raise ConfigError(
                "model.mla.block_size",
                f"the sparse branch would select {plan.n_select} blocks of {plan.block_size} "
                f"keys, more than the {t_max} keys of the longest sequence (model.max_seq_len); "
                "use smaller blocks or a smaller sparse share",
            )

    def _check_pruning(self) -> None:
        """Reject schedules the model cannot follow: the floor and the fraction against the
        heads of each layer, and decisions that would fall outside the run."""
        p = self.pruning
        sizes = self.model.heads_per_layer()
        smallest = min(sizes)
        if p.min_heads_per_layer > smallest:
            layer = sizes.index(smallest)
            raise ConfigError(
                "pruning.min_heads_per_layer",
                f"{p.min_heads_per_layer} exceeds the {smallest} query heads of layer {layer}",
            )
        total = sum(sizes)
        removable = total - p.min_heads_per_layer * len(sizes)
        unit = ""
        if p.granularity == "group":
            removable = sum(
                _removable_in_groups(g, p.min_heads_per_layer) for g in self.model.group_sizes()
            )
            unit = " in whole groups"
        if p.heads_to_remove(total) > removable:
            raise ConfigError(
                "pruning.fraction",
                f"{p.fraction} removes {p.heads_to_remove(total)} of {total} query heads, but "
                f"min_heads_per_layer={p.min_heads_per_layer} leaves only {removable} "
                f"removable{unit} ({len(sizes)} layers of {sizes}); lower the fraction or the floor",
            )
        if p.warmup_steps >= self.steps:
            raise ConfigError(
                "pruning.warmup_steps",
                f"{p.warmup_steps} >= steps ({self.steps}): no head would ever be pruned",
            )
        if p.end_step is not None and p.end_step > self.steps:
            raise ConfigError(
                "pruning.end_step", f"{p.end_step} is past the run's last step ({self.steps})"
            )


def build(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from nested dicts, rejecting unknown keys and wrong types."""
    if dataclasses.is_dataclass(data) and isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a mapping for {cls.__name__}, got {_kind(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            join_path(path, str(unknown[0])),
            f"unknown key; {cls.__name__} takes: {', '.join(sorted(fields))}",
        )
    hints = typing.get_type_hints(cls)
    kwargs = {
        name: _coerce(hints[name], value, join_path(path, name)) for name, value in data.items()
    }
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(join_path(path, e.path), e.message) from None
    except (ValueError, TypeError) as e:
        # a plain error ('budget must be >= 1, got 0') is blamed on the field it opens with
        raise ConfigError(join_path(path, _field_named(str(e), fields)), str(e)) from None


def _field_named(message: str, fields: typing.Iterable[str]) -> str:
    """The field a message opens with ('ratios must ...', 'gate.hidden widths ...'), or ''."""
    first = message.split(" ", 1)[0].rsplit(".", 1)[-1]
    return first if first in fields else ""


def to_dict(obj: Any) -> Any:
    """Plain dicts/lists of a config tree, for YAML and JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(x) for x in obj]
    return obj


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as e:
                errors.append(e.message)
        raise ConfigError(path, " or ".join(errors))
    if origin is Literal:
        if value not in args:
            raise ConfigError(path, f"expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"expected a list, got {_kind(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(path, f"expected {len(args)} entries, got {len(value)}")
            return tuple(_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {_kind(value)}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {_kind(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {_kind(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {_kind(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {_kind(value)}")
        return value
    return value


def join_path(path: str, key: str) -> str:
    """Dotted key path: join_path('model', 'mla') == 'model.mla', join_path('a', '[0]') == 'a[0]'."""
    if not key:
        return path
    if not path:
        return key
    return f"{path}{key}" if key.startswith("[") else f"{path}.{key}"


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return f"{type(value).__name__} {value!r}"


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading exponent numbers as YAML 1.2 does (see `read_yaml`)."""


# YAML 1.1 (PyYAML) wants a dot and a signed exponent: 1.0e-3 is a float, but 3e-3, 1E+2 and
# 1.5e3 are strings. YAML 1.2 reads all of them as floats; so do we.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_yaml(text: str) -> Any:
    """`yaml.safe_load`, except that unquoted exponent numbers (`3e-3`, `1E+4`, `-2e5`, `1.5e3`)
    are floats, as in YAML 1.2, wherever they appear. A quoted `'3e-3'` stays a string; an
    unquoted one in a text setting is a float, so that setting rejects it: quote it there."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)
