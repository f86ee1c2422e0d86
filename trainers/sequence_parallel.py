"""Ulysses-style sequence parallelism: P ranks share every sequence, T/P tokens each.

Everything outside attention is per token, so each rank runs it on its own T/P tokens. Before
attention one All-to-All trades the token shard for a head shard: rank p receives all T tokens
of its KV groups (with their G query heads and gate weights) and runs the unchanged attention
op on the whole sequence for them; one All-to-All brings the outputs back to the token shards.
The backward mirrors it (the autograd Functions below: an exchange's adjoint is the exchange
the other way).

MLA splits whole KV groups between the ranks, never a group: the G query heads of a group
share one sparse selection, scored over all of them, so a group cut in two would select
differently. With HKV % P == 0 every rank holds HKV/P groups (the fast case); otherwise, or
after head pruning has emptied groups, the ranks hold unequal numbers of groups (the busiest
sets the pace, and a rank with none idles). Dense attention splits query heads evenly instead
and sends a KV head to every rank that holds one of its query heads (replicated KV heads).

Sequences whose length does not divide by P are padded at the end: padding sits after every
real token, so causal attention never lets a real token see it, its targets are ignored by the
loss, and attention runs on the real T tokens only (the MLA op's `t_max` stays the model's
`max_seq_len`, the global stride). Rotary positions are the tokens' global positions.

Overlap: the k/v projection runs first and its exchange starts asynchronously; the q
projection, the rotary of q and the gate MLP run while it travels, then the q/gate exchange.
The backward exchanges run synchronously. `SequenceParallel.overlap = False` makes the k/v
exchange synchronous too, the baseline of `bench/sequence_parallel_overlap.py`.

Data parallelism composes: a world of W ranks forms W/P groups of P consecutive ranks;
DistributedDataParallel still averages gradients over all W ranks, and each rank's loss is
scaled so that this average is the gradient of the global batch's mean loss (see `loss`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import ConfigError
from .data import IGNORE
from .model import Attention, HeadLayout, apply_rotary


@dataclass
class HeadSplit:
    """Which heads each rank of a group attends, as contiguous ranges of the layout's order."""

    q: list[tuple[int, int]]
    """Per rank, [lo, hi) of the query heads (slots)."""
    kv: list[tuple[int, int]]
    """Per rank, [lo, hi) of the KV heads its query heads read."""
    kv_index: list[torch.Tensor | None]
    """Dense only, per rank: for each of its query heads the local index of its KV head, when
    they do not come in groups of G in order (None: they do)."""


def split_groups(n_kv: int, group: int, ranks: int) -> HeadSplit:
    """MLA: whole KV groups per rank, as evenly as they go (the first ranks take one more)."""
    kv = _even_ranges(n_kv, ranks)
    return HeadSplit(q=[(lo * group, hi * group) for lo, hi in kv], kv=kv, kv_index=[None] * ranks)


def split_heads(
    kv_of: list[int], group: int, ranks: int, device: torch.device | None = None
) -> HeadSplit:
    """Dense: query heads evenly per rank; each rank gets the KV heads its query heads read
    (`kv_of[i]`, in non-decreasing order), so a KV head spanning two ranks goes to both."""
    q = _even_ranges(len(kv_of), ranks)
    kv, index = [], []
    for lo, hi in q:
        if lo == hi:
            kv.append((0, 0))
            index.append(None)
            continue
        first, last = kv_of[lo], kv_of[hi - 1]
        kv.append((first, last + 1))
        local = [h - first for h in kv_of[lo:hi]]
        aligned = (hi - lo) == group * (last + 1 - first) and local == [
            j // group for j in range(hi - lo)
        ]
        index.append(None if aligned else torch.tensor(local, device=device))
    return HeadSplit(q=q, kv=kv, kv_index=index)


def _even_ranges(n: int, ranks: int) -> list[tuple[int, int]]:
    sizes = [n // ranks + (1 if p < n % ranks else 0) for p in range(ranks)]
    starts = [sum(sizes[:p]) for p in range(ranks)]
    return [(s, s + size) for s, size in zip(starts, sizes)]


@dataclass
class SequenceParallel:
    """One rank's place in a sequence-parallel world; hand it to `LanguageModel.set_sequence_
    parallel`. `shard` records the length of the sequences it cut, which attention needs."""

    size: int
    """P, the ranks sharing each sequence."""
    rank: int
    """This rank's position in its group (its token shard)."""
    group: dist.ProcessGroup | None
    dp_rank: int = 0
    """Which of the W/P groups this rank belongs to (its rows of the global batch)."""
    dp_size: int = 1
    seq_len: int = 0
    """Length of the sequences last sharded (before padding)."""
    overlap: bool = True
    """Let the k/v exchange travel while q and the gate are computed. False waits for every
    exchange as it starts (the same results): what the overlap is measured against."""
    _splits: dict = field(default_factory=dict, repr=False)
    """Per attention module, its last layout and that layout's split."""

    def shard_len(self, seq_len: int) -> int:
        """Tokens per rank: ceil(T / P)."""
        return -(-seq_len // self.size)

    def shard(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows (its data-parallel group's) and tokens of a global batch of inputs
        and targets (B, T); the last shard is padded with token 0 and ignored targets."""
        rows = x.shape[0] // self.dp_size
        x = x[self.dp_rank * rows : (self.dp_rank + 1) * rows]
        y = y[self.dp_rank * rows : (self.dp_rank + 1) * rows]
        self.seq_len = x.shape[1]
        return self.tokens(x, 0), self.tokens(y, IGNORE)

    def tokens(self, t: torch.Tensor, fill: float = 0) -> torch.Tensor:
        """This rank's tokens of t (B, T, ...), the sequence padded to a multiple of P with
        `fill`."""
        T = t.shape[1]
        tl = self.shard_len(T)
        pad = tl * self.size - T
        if pad:
            t = torch.cat([t, t.new_full((t.shape[0], pad, *t.shape[2:]), fill)], dim=1)
        return t[:, self.rank * tl : (self.rank + 1) * tl]

    def rotary(self, rope: torch.Tensor, local_len: int) -> torch.Tensor:
        """Rotations at this shard's global positions (padding: no rotation)."""
        lo = self.rank * local_len
        rot = rope[lo : min(lo + local_len, self.seq_len)]
        if rot.shape[0] < local_len:
            ones = torch.ones(local_len - rot.shape[0], rope.shape[1], dtype=rope.dtype)
            rot = torch.cat([rot, ones.to(rope.device)])
        return rot

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """This rank's share of its group's mean loss, times P: the sum over its tokens over
        the group's target count, times P. Summed over the group that is P x the mean, and
        the average over all W ranks (DDP's, and the trainer's loss log) is the mean over the
        W/P groups: the global batch's mean loss, as with one process."""
        total = F.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum"
        )
        count = (targets != IGNORE).sum().to(total.dtype)
        dist.all_reduce(count, group=self.group)
        return total * self.size / count.clamp_min(1)

    def exchange(
        self, send: torch.Tensor, send_sizes: list[int], recv_sizes: list[int]
    ) -> tuple[torch.Tensor, dist.Work]:
        """Start one All-to-All of flat buffers within the group: `send_sizes[p]` elements
        to rank p, `recv_sizes[p]` from it. Returns the receive buffer and the handle to wait
        on (every exchange of this module goes through here)."""
        recv = send.new_empty(sum(recv_sizes))
        work = dist.all_to_all_single(
            recv, send, recv_sizes, send_sizes, group=self.group, async_op=True
        )
        if not self.overlap:
            work.wait()
        return recv, work

    def attend(
        self, attn: Attention, x: torch.Tensor, rot: torch.Tensor, lay: HeadLayout
    ) -> torch.Tensor:
        """The attention outputs (B, T/P, S, D) of `attn` for this rank's tokens, every slot of
        the layout, computed across the group (called by `Attention.forward`)."""
        B, tl, _ = x.shape
        S, K, d = lay.n_slots, lay.n_kv, attn.head_dim
        split = self._split(attn, lay)
        w = attn.qkv.weight if lay.rows is None else attn.qkv.weight.index_select(0, lay.rows)
        w_q, w_kv = w.split([S * d, 2 * K * d])
        # k and v first: their exchange travels while q and the gate are computed
        kv = F.linear(x, w_kv).view(B, tl, 2, K, d)
        k = apply_rotary(kv[:, :, 0], rot)
        kv = torch.cat([k, kv[:, :, 1]], dim=-1)  # (B, T/P, K, 2D): one exchange for both
        kv_pending = _start_scatter(kv, split.kv, self)
        q_raw = F.linear(x, w_q).view(B, tl, S, d)
        q = apply_rotary(q_raw, rot)
        if attn.gate is None:
            qg = q
        else:
            if attn.cfg.mla.gate.input == "hidden":
                logits = attn.gate(x, lay.gate_rows).view(B, tl, S, 3)
            else:
                logits = attn.gate(q_raw)  # the query before rotary: its content
            qg = torch.cat([q, torch.sigmoid(logits).to(q.dtype)], dim=-1)  # (B, T/P, S, D+3)
        qg = _finish_scatter(_start_scatter(qg, split.q, self))  # (B, P*T/P, s, D(+3))
        kv = _finish_scatter(kv_pending)  # (B, P*T/P, k, 2D)
        T = self.seq_len
        q_lo, q_hi = split.q[self.rank]
        if q_hi == q_lo:
            # no heads here: an empty output still tied to both exchanges, so that this rank
            # takes part in their backward exchanges
            y = qg[..., :d] + kv[..., :d].sum(2, keepdim=True)
        else:
            q, k, v = qg[:, :T, :, :d], kv[:, :T, :, :d], kv[:, :T, :, d:]
            if attn.gate is None:
                index = split.kv_index[self.rank]
                if index is None:
                    y = attn._sdpa(q, k, v, (q_hi - q_lo) // k.shape[2])
                else:
                    y = attn._sdpa(q, k.index_select(2, index), v.index_select(2, index), 1)
            else:
                mask = None if lay.slot_mask is None else lay.slot_mask[q_lo:q_hi]
                y = attn._attend(q, k, v, qg[:, :T, :, d:], mask)
            if qg.shape[1] > T:
                y = F.pad(y, (0, 0, 0, 0, 0, qg.shape[1] - T))  # the padding's outputs: 0
        return _Gather.apply(y, split.q, S, self)  # (B, T/P, S, D)

    def _split(self, attn: Attention, lay: HeadLayout) -> HeadSplit:
        # the layout is rebuilt whenever the head mask changes; holding it keeps its identity
        held = self._splits.get(id(attn))
        if held is not None and held[0] is lay:
            return held[1]
        if attn.gate is not None:
            split = split_groups(lay.n_kv, attn.group, self.size)
        else:
            # dense packs the active heads in order; each reads its group's kept KV head
            heads = attn.head_ids()
            kept = attn.kv_ids(heads)
            kv_of = [kept.index(attn.geometry.group_of(h)) for h in heads]
            split = split_heads(kv_of, attn.group, self.size, lay.device)
        self._splits[id(attn)] = (lay, split)
        return split


def setup(size: int) -> SequenceParallel:
    """Form the sequence-parallel groups of the running world (P consecutive ranks each) and
    return this rank's place. Every rank must call it (group creation is collective)."""
    if size < 1:
        raise ConfigError("sequence_parallel", f"must be >= 1, got {size}")
    initialised = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialised else 1
    if world % size:
        raise ConfigError(
            "sequence_parallel",
            f"{size} must divide the number of training processes ({world}): "
            "a search starts them from its resources (workers, or gpus); run `automla train` "
            f"under a launcher, e.g. `torchrun --nproc-per-node {size} -m automla.cli train "
            f"--config F`; a direct call needs torch.distributed initialised with a multiple "
            f"of {size} ranks",
        )
    rank = dist.get_rank() if initialised else 0
    group = None
    for g in range(world // size):
        ranks = list(range(g * size, (g + 1) * size))
        created = dist.new_group(ranks)
        if rank in ranks:
            group = created
    return SequenceParallel(
        size=size, rank=rank % size, group=group, dp_rank=rank // size, dp_size=world // size
    )


# The exchanges. Between the two layouts a rank's data travels as one flat buffer of P chunks,
# chunk p (h_p, B, Tl, F) contiguous: its tokens' heads for rank p one way, rank p's tokens of
# this rank's heads the other way, so every chunk is one contiguous run for the collective.


def _send_heads(
    x: torch.Tensor, ranges: list[tuple[int, int]], sp: SequenceParallel
) -> tuple[torch.Tensor, dist.Work]:
    """Start sending x (B, Tl, H, F): heads [lo_p, hi_p) of this rank's tokens to rank p."""
    B, tl, _, f = x.shape
    chunks = [x[:, :, lo:hi].permute(2, 0, 1, 3).reshape(-1) for lo, hi in ranges]
    lo, hi = ranges[sp.rank]
    per_head = B * tl * f
    sizes = [(b - a) * per_head for a, b in ranges]
    return sp.exchange(torch.cat(chunks), sizes, [(hi - lo) * per_head] * sp.size)


def _unpack_tokens(flat: torch.Tensor, shape: tuple[int, ...], size: int) -> torch.Tensor:
    """P chunks (h, B, Tl, F), one per token shard -> (B, P*Tl, h, F)."""
    B, tl, h, f = shape
    return flat.view(size, h, B, tl, f).permute(2, 0, 3, 1, 4).reshape(B, size * tl, h, f)


def _pack_tokens(y: torch.Tensor, size: int) -> torch.Tensor:
    """(B, P*Tl, h, F) -> P chunks (h, B, Tl, F), one per token shard (`_unpack_tokens`'s
    inverse)."""
    B, T, h, f = y.shape
    return y.reshape(B, size, T // size, h, f).permute(1, 3, 0, 2, 4).reshape(-1)


def _send_tokens(
    flat: torch.Tensor,
    shape: tuple[int, ...],
    ranges: list[tuple[int, int]],
    n_heads: int,
    sp: SequenceParallel,
) -> torch.Tensor:
    """Send `_pack_tokens`' chunks back (chunk p to rank p) and assemble what comes: every
    rank's heads of this rank's tokens, (B, Tl, n_heads, F); a head held by several ranks (a
    replicated KV head) gets the sum of their parts, one held by none 0."""
    B, tl, h, f = shape
    recv_sizes = [(hi - lo) * B * tl * f for lo, hi in ranges]
    recv, work = sp.exchange(flat, [h * B * tl * f] * sp.size, recv_sizes)
    work.wait()
    out = flat.new_zeros(B, tl, n_heads, f)
    for (lo, hi), chunk in zip(ranges, recv.split(recv_sizes)):
        if hi > lo:
            out[:, :, lo:hi] += chunk.view(hi - lo, B, tl, f).permute(1, 2, 0, 3)
    return out


@dataclass
class _Pending:
    """A token-to-head exchange in flight: its receive buffer (already in the autograd graph,
    not yet filled) and the collective's handle."""

    recv: torch.Tensor
    work: dist.Work
    shape: tuple[int, ...]
    """(B, Tl, h, F): what arrives from each rank."""
    sp: SequenceParallel


class _StartHeads(torch.autograd.Function):
    """Forward: start the token-to-head exchange and return its receive buffer (the handle
    goes into `box`). Backward: the head-to-token exchange of the gradient."""

    @staticmethod
    def forward(ctx, x, ranges, sp, box):
        recv, work = _send_heads(x, ranges, sp)
        box.append(work)
        lo, hi = ranges[sp.rank]
        ctx.ranges, ctx.sp, ctx.n_heads = ranges, sp, x.shape[2]
        ctx.shape = (x.shape[0], x.shape[1], hi - lo, x.shape[3])
        return recv

    @staticmethod
    def backward(ctx, grad):
        # the gradient arrives in the receive buffer's layout: already `_pack_tokens`' chunks
        out = _send_tokens(grad.contiguous(), ctx.shape, ctx.ranges, ctx.n_heads, ctx.sp)
        return out, None, None, None


class _FinishHeads(torch.autograd.Function):
    """Forward: wait for the exchange, then lay the buffer out as (B, P*Tl, h, F)."""

    @staticmethod
    def forward(ctx, recv, work, shape, sp):
        work.wait()
        ctx.size = sp.size
        return _unpack_tokens(recv, shape, sp.size)

    @staticmethod
    def backward(ctx, grad):
        return _pack_tokens(grad, ctx.size), None, None, None


def _start_scatter(x: torch.Tensor, ranges: list[tuple[int, int]], sp: SequenceParallel):
    """Start moving x (B, Tl, H, F) to the head layout; `_finish_scatter` waits for it."""
    box: list[dist.Work] = []
    recv = _StartHeads.apply(x, ranges, sp, box)
    lo, hi = ranges[sp.rank]
    return _Pending(recv, box[0], (x.shape[0], x.shape[1], hi - lo, x.shape[3]), sp)


def _finish_scatter(p: _Pending) -> torch.Tensor:
    """(B, P*Tl, h, F): all tokens of this rank's heads."""
    return _FinishHeads.apply(p.recv, p.work, p.shape, p.sp)


class _Gather(torch.autograd.Function):
    """Forward: the head-to-token exchange of the outputs, (B, P*Tl, h, F) -> (B, Tl, S, F).
    Backward: token-to-head."""

    @staticmethod
    def forward(ctx, y, ranges, n_heads, sp):
        ctx.ranges, ctx.sp = ranges, sp
        B, T, h, f = y.shape
        shape = (B, T // sp.size, h, f)
        return _send_tokens(_pack_tokens(y, sp.size), shape, ranges, n_heads, sp)

    @staticmethod
    def backward(ctx, grad):
        recv, work = _send_heads(grad.contiguous(), ctx.ranges, ctx.sp)
        work.wait()
        lo, hi = ctx.ranges[ctx.sp.rank]
        B, tl, _, f = grad.shape
        return _unpack_tokens(recv, (B, tl, hi - lo, f), ctx.sp.size), None, None, None
