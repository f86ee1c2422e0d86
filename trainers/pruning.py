"""Dynamic head pruning (DESIGN §2): Taylor importance, the schedule, ramps, and compaction.

`HeadPruner` runs beside the optimiser. Each step the attention layers add, in their normal
backward, the Taylor score of every computed head (`Attention.importance`); `end_step` turns
them into normalised importance, smooths it, makes the pruning decisions on schedule and moves
every head's mask value one step along its ramp. A head whose mask value reaches 0 is masked
out: it is no longer projected or attended, and a KV head goes with the last query head of its
group. `compact` then removes the pruned heads' weights from the model.

Schedule, per decision step s (s > warmup_steps, every `interval` steps):
* fraction: the lowest-ranked heads are removed until round(fraction * heads * p) are gone,
  p = (s - warmup_steps) / (end_step - warmup_steps) capped at 1;
* threshold: heads whose normalised importance is below it are removed (with a fraction too,
  at most that many);
* never below `min_heads_per_layer` in any layer; heads are ranked across all layers, which
  the per-layer normalisation makes comparable;
* with granularity "group" the unit is a GQA group (its candidate heads at their mean
  importance), so KV heads go with their groups and the sparse kernels shrink.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .config import PruningConfig
from .model import Attention, LanguageModel, to_device


class HeadPruner:
    """Importance, schedule and mask values of every query head of `model`.

    State per head: `keep` (the current decision) and an integer ramp `level` in [0, R]
    (R = max(ramp_steps, 1)); the mask value is level / R. Each step the level moves one step
    towards R (kept) or 0 (removed); the head is computed while its level is above 0.
    """

    def __init__(self, model: LanguageModel, cfg: PruningConfig, total_steps: int):
        self.cfg = cfg
        self.layers: list[Attention] = [block.attn for block in model.blocks]
        self.sizes = [attn.n_heads for attn in self.layers]
        L, H = len(self.sizes), max(self.sizes)
        self.device = model.embed.weight.device
        self.full_at = cfg.end_step if cfg.end_step is not None else max(1, total_steps // 2)
        self.ramp = max(cfg.ramp_steps, 1)
        self.valid = torch.zeros(L, H, dtype=torch.bool)
        self.keep = torch.zeros(L, H, dtype=torch.bool)
        # the layers add their Taylor scores into rows of one tensor: one EMA update per step
        self.acc = torch.zeros(L, H, device=self.device)
        for i, (attn, n) in enumerate(zip(self.layers, self.sizes)):
            self.valid[i, :n] = True
            self.keep[i, :n] = attn._mask  # heads masked already count as pruned
            attn.importance = self.acc[i, :n]
        self.ema = torch.zeros(L, H, device=self.device)
        self.last_seen = torch.full((L, H), -1, dtype=torch.long)
        self.level = torch.where(self.keep, self.ramp, 0)
        self.probe = torch.zeros(L, H, dtype=torch.bool)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._pushed: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * L
        self._push()

    def is_decision(self, step: int) -> bool:
        w = self.cfg.warmup_steps
        return step > w and (step - w) % self.cfg.interval == 0

    def begin_step(self, step: int) -> None:
        """Before step `step`'s forward: with regrow, removed heads are measured at decisions."""
        if self.cfg.regrow and self.is_decision(step):
            self.probe = ~self.keep & (self.level == 0) & self.valid
            if self.probe.any():
                self._push()

    def end_step(self, step: int) -> dict:
        """After step `step`'s backward: update importance, decide, advance the ramps.

        Returns the step's log record: the query and KV heads active during the step (heads
        probed for regrow not counted) and, at decisions, the importance and the removed heads'
        original ids."""
        running = (self.level > 0) & self.valid
        record: dict = {"step": step, **self._counts(running)}
        self._update_importance(step, (running | self.probe) & self.valid)
        if self.is_decision(step):
            imp = self.ema.cpu()  # the one device sync per decision: ranking and log share it
            self._decide(step, imp)
            record["importance"] = [
                [round(v, 4) for v in row[:n]] for row, n in zip(imp.tolist(), self.sizes)
            ]
            record["removed"] = self.removed()
        self.level = torch.where(self.keep, self.level + 1, self.level - 1).clamp(0, self.ramp)
        self.level = torch.where(self.valid, self.level, 0)
        self.probe.zero_()
        self._push()
        return record

    def _counts(self, running: torch.Tensor) -> dict:
        heads, kv = [], []
        for i, attn in enumerate(self.layers):
            ids = attn.head_ids(running[i, : self.sizes[i]])
            heads.append(len(ids))
            kv.append(len(attn.kv_ids(ids)))
        return {"active_heads_per_layer": heads, "active_kv_heads_per_layer": kv}

    def removed(self) -> list[list[int]]:
        """Per layer, the original ids of the heads decided away (ramping or gone)."""
        return [
            [attn.heads[h] for h in range(n) if not self.keep[i, h]]
            for i, (attn, n) in enumerate(zip(self.layers, self.sizes))
        ]

    def scores(self) -> torch.Tensor:
        """[L, H] raw Taylor scores |sum <o_h, dL/d(xi_h o_h)>| gathered since the last step."""
        return self.acc.abs()

    def target(self, step: int) -> int | None:
        """Heads the fraction schedule has removed by decision step `step` (None: no fraction)."""
        if self.cfg.fraction == 0:
            return None
        w = self.cfg.warmup_steps
        progress = min(1.0, (step - w) / (self.full_at - w)) if self.full_at > w else 1.0
        return math.floor(self.cfg.fraction * sum(self.sizes) * progress + 0.5)

    def _update_importance(self, step: int, measured: torch.Tensor) -> None:
        raw = self.acc.abs()
        kept = self._on_device("kept", self.keep & measured)
        # normalised per layer by the mean score of its kept heads: a typical survivor is 1
        denom = (raw * kept).sum(1, keepdim=True) / kept.sum(1, keepdim=True).clamp_min(1)
        norm = raw / denom.clamp_min(1e-30)
        gap = (step - self.last_seen).clamp_min(1)
        decay = torch.where(self.last_seen < 0, 0.0, self.cfg.ema ** gap.double()).float()
        decay = self._on_device("decay", torch.where(measured, decay, 1.0))
        self.ema = decay * self.ema + (1 - decay) * norm
        self.last_seen = torch.where(measured, step, self.last_seen)
        self.acc.zero_()

    def _decide(self, step: int, imp: torch.Tensor) -> None:
        """Choose the heads to keep from `imp`, the importance EMA on the CPU."""
        target = self.target(step)
        threshold = self.cfg.threshold
        # without regrow only kept heads are candidates; with it every head is re-ranked
        keep = self.valid.clone() if self.cfg.regrow else self.keep.clone()
        # a head never measured (masked before pruning began) keeps its state
        keep &= (self.last_seen >= 0) | self.keep
        candidates = keep & (self.last_seen >= 0)
        n_removed = int((self.valid & ~keep).sum())
        per_layer = keep.sum(1)
        for value, i, heads in self._units(candidates, imp):
            if target is not None and n_removed >= target:
                break
            if threshold is not None and value >= threshold:
                break
            if per_layer[i] - len(heads) < self.cfg.min_heads_per_layer:
                continue
            if target is not None and n_removed + len(heads) > target:
                continue  # a group larger than what is left of the target
            keep[i, heads] = False
            per_layer[i] -= len(heads)
            n_removed += len(heads)
        self.keep = keep

    def _units(self, candidates: torch.Tensor, imp: torch.Tensor) -> list[tuple]:
        """What a decision may remove, least important first: (importance, layer, heads) for
        each candidate head, or with granularity "group" for the candidate heads of each GQA
        group, at their mean importance."""
        pairs = candidates.nonzero().tolist()
        if self.cfg.granularity == "head":
            return sorted((float(imp[i, h]), i, [h]) for i, h in pairs)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, h in pairs:
            attn = self.layers[i]
            groups.setdefault((i, attn.geometry.group_of(attn.heads[h])), []).append(h)
        return sorted(
            (sum(float(imp[i, h]) for h in heads) / len(heads), i, heads)
            for (i, _), heads in groups.items()
        )

    def _push(self) -> None:
        """Hand each layer its mask and mask values (only where they changed)."""
        scale = self.level.float() / self.ramp
        for i, attn in enumerate(self.layers):
            n = self.sizes[i]
            mask = (self.level[i, :n] > 0) | self.probe[i, :n]
            s = scale[i, :n]
            prev = self._pushed[i]
            if prev is None or not (torch.equal(prev[0], mask) and torch.equal(prev[1], s)):
                attn.set_heads(mask, s)
                self._pushed[i] = (mask, s)

    def _on_device(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """A device copy of the CPU tensor `t`, uploaded only when it changed."""
        cached = self._cache.get(name)
        if cached is None or not torch.equal(cached[0], t):
            dev = to_device(t.float(), self.device)
            self._cache[name] = cached = (t.clone(), dev)
        return cached[1]

    def state_dict(self) -> dict:
        return {
            "ema": self.ema.cpu(),
            "last_seen": self.last_seen.clone(),
            "keep": self.keep.clone(),
            "level": self.level.clone(),
            "sizes": list(self.sizes),
        }

    def load_state_dict(self, state: dict) -> None:
        if list(state["sizes"]) != self.sizes:
            raise ValueError(
                f"pruning state is for heads per layer {state['sizes']}, the model has {self.sizes}"
            )
        self.ema = state["ema"].to(self.device)
        self.last_seen = state["last_seen"].clone()
        self.keep = state["keep"].clone()
        self.level = state["level"].clone()
        self.probe.zero_()
        self._pushed = [None] * len(self.layers)
        self._push()


def compact(model: LanguageModel) -> LanguageModel:
    """A copy of `model` holding only its active heads' weights, with the same outputs.

    Per layer the active query heads keep their q rows, gate outputs and proj columns (a head
    still ramping has its mask value folded into its proj columns); KV heads with no active
    query head lose their K and V rows. The new ModelConfig lists the kept heads' original ids
    (`kept_heads`), so `build_model` rebuilds the compacted shapes from a checkpoint. Groups
    may end up uneven: the layer lays its heads out in G query slots per kept KV head, the
    slots of removed heads empty and masked, so the MLA op still sees equal groups.
    """
    kept = []
    for block in model.blocks:
        heads = block.attn.head_ids()
        if not heads:
            raise ValueError("a layer has no active head; compaction needs at least one")
        kept.append(heads)
    cfg = dataclasses.replace(model.cfg, kept_heads=kept)
    new = LanguageModel(cfg).to(model.embed.weight.device)
    state = model.state_dict()
    out = dict(state)
    for i, block in enumerate(model.blocks):
        attn = block.attn
        lay = attn._build_layout(torch.device("cpu"))
        p = f"blocks.{i}.attn."
        if lay.rows is not None:
            out[p + "qkv.weight"] = state[p + "qkv.weight"][lay.rows.to(attn.qkv.weight.device)]
        proj = state[p + "proj.weight"]
        if lay.cols is not None:
            proj = proj[:, lay.cols.to(proj.device)]
        if lay.scale is not None:
            scale = lay.scale.to(proj.device).repeat_interleave(attn.head_dim)
            proj = proj * scale.to(proj.dtype)
        out[p + "proj.weight"] = proj
        hidden_gate = attn.gate is not None and attn.cfg.mla.gate.input == "hidden"
        if hidden_gate and lay.gate_rows is not None:
            last = len(attn.gate.net) - 1
            for name in ("weight", "bias"):
                key = f"{p}gate.net.{last}.{name}"
                out[key] = state[key][lay.gate_rows.to(state[key].device)]
        n = lay.n_active
        out[p + "head_mask"] = torch.ones(n, dtype=torch.bool, device=attn.head_mask.device)
        out[p + "head_scale"] = torch.ones(n, device=attn.head_scale.device)
    new.load_state_dict(out)
    return new.train(model.training)
