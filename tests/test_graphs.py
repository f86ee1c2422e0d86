"""`ModelConfig.cuda_graphs`: the MLA op ("op") or the whole training step ("step") replayed
from CUDA graphs gives the eager results."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from automla.kernels import AttentionConfig
from automla.trainers import DataConfig, ModelConfig, PruningConfig, TrainConfig, build_model
from automla.trainers.trainer import build_state, train_step


def config(cuda_graphs: bool | str, T: int = 64, backend: str = "auto") -> ModelConfig:
    return ModelConfig(
        vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
        max_seq_len=T, cuda_graphs=cuda_graphs, attn_backend=backend,
        mla=AttentionConfig(budget=32, ratios=(0.5, 0.25, 0.25), block_size=16),
    )  # fmt: skip


def test_cpu_model_ignores_the_switch():
    # no CUDA: the op runs eagerly on the torch path, with or without the switch
    x = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(0))
    out = []
    for graphs in (False, True):
        torch.manual_seed(0)
        model = build_model(config(graphs)).eval()
        with torch.no_grad():
            out.append(model(x)[0])
    assert torch.equal(out[0], out[1])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.gpu
def test_graphed_training_steps_match_eager():
    dev = torch.device("cuda")
    T, steps = 512, 3
    base = dataclasses.replace(config(False, T), d_model=256, n_heads=8, n_kv_heads=2, head_dim=64)
    mla = AttentionConfig(budget=192, ratios=(0.5, 0.25, 0.25), block_size=32)
    base = dataclasses.replace(base, mla=mla)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 64, (2, T + 1), generator=g).to(dev) for _ in range(steps)]
    runs = {}
    for graphs in (False, "op"):
        torch.manual_seed(0)
        model = build_model(dataclasses.replace(base, cuda_graphs=graphs)).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for i, b in enumerate(batches):
            if i == 1:  # a new mask: a new capture for that layer
                model.blocks[1].attn.set_head_mask(torch.tensor([1, 0, 1, 1, 0, 0, 1, 1]).bool())
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = model(b[:, :-1], b[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(batches[0][:, :-1])[0]
        if graphs:  # the op did run from graphs: training, the new mask, evaluation
            assert len(model.blocks[1].attn._graphed._graphs) == 3
        runs[graphs] = (losses, logits, [p.detach().clone() for p in model.parameters()])
    (l0, y0, p0), (l1, y1, p1) = runs[False], runs["op"]
    assert all(abs(a - b) <= 1e-2 * abs(a) for a, b in zip(l0, l1)), (l0, l1)
    assert rel(y1, y0) <= 2e-2 and not torch.isnan(y1).any()
    assert max(rel(b, a) for a, b in zip(p0, p1)) <= 2e-2


@pytest.mark.gpu
def test_graphs_dropped_during_a_capture_do_not_break_it():
    # Discarded graphs are freed by the cycle collector; with a collection after nearly every
    # allocation, one would run inside the next capture unless captures hold the collector off.
    import gc

    dev = torch.device("cuda")
    T = 256
    x = torch.randint(0, 64, (1, T), device=dev)
    old = gc.get_threshold()
    try:
        for i in range(3):
            torch.manual_seed(0)
            model = build_model(config("op", T)).to(dev)
            model.blocks[0].attn.set_head_mask(torch.tensor([True, i != 1, True, i != 2]))
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = model(x, x)
            loss.backward()
            assert torch.isfinite(loss)
            del model, loss
            gc.set_threshold(1, 1, 1)
        torch.cuda.synchronize()
    finally:
        gc.set_threshold(*old)


def test_true_means_the_whole_step_and_cpu_training_stays_eager():
    assert config(True).graph_mode == "step" and config("op").graph_mode == "op"
    assert config(False).graph_mode == "off"
    cfg = TrainConfig(model=config(True), data=DataConfig(), steps=2, batch_size=2, seq_len=64)
    assert build_state(cfg, torch.device("cpu")).graphs is None


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["mla", "dense"])
def test_step_graph_training_matches_eager(attention):
    # pruning ramps change the head layout every few steps: eager steps, releases, recaptures
    dev = torch.device("cuda")
    T, steps = 256, 24
    model = dataclasses.replace(
        config(False, T), d_model=256, n_heads=8, n_kv_heads=2, head_dim=32, attention=attention
    )
    pruning = PruningConfig(
        enabled=True, fraction=0.25, warmup_steps=4, interval=4, ramp_steps=2, end_step=16
    )
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 64, (2, T + 1), generator=g) for _ in range(steps)]
    runs = {}
    for graphs in (False, "step"):
        cfg = TrainConfig(
            model=dataclasses.replace(model, cuda_graphs=graphs), data=DataConfig(),
            steps=steps, batch_size=2, seq_len=T, dtype="bfloat16", pruning=pruning,
        )  # fmt: skip
        state = build_state(cfg, dev)
        losses, removed, importance = [], [], []
        for step, b in enumerate(batches, 1):
            b = b.to(dev)
            state.pruner.begin_step(step)
            losses.append(train_step(state, b[:, :-1], b[:, 1:], 1e-3))
            record = state.pruner.end_step(step)
            removed.append(record.get("removed"))
            importance.append(record.get("importance"))
        if graphs:
            assert state.graphs.failure is None
            assert state.graphs.captures >= 2 and state.graphs.replays >= steps // 3
            # the eager steps ran the op eagerly: no per-op graphs beside the step graph
            assert all(b.attn._graphed is None for b in state.raw_model.blocks)
        params = [p.detach().float().clone() for p in state.raw_model.parameters()]
        runs[graphs] = (torch.stack(losses).float().cpu(), removed, importance, params)
    (l0, r0, i0, p0), (l1, r1, i1, p1) = runs[False], runs["step"]
    assert not torch.isnan(l1).any()
    # the same heads pruned at the same steps, unless the two runs' rounding broke a near-tie
    # differently (at step 16 here, importances 0.8021 and 0.8011 on the CPU); the layouts
    # part there
    split = next((i for i, (a, b) in enumerate(zip(r0, r1)) if a != b), len(r0) - 1)
    assert ((l1 - l0).abs() <= 1e-2 * l0.abs())[: split + 1].all(), (l0, l1)
    for a, b in zip(i0[: split + 1], i1[: split + 1]):  # the importances the decisions read
        assert (a is None) == (b is None)
        if a is not None:
            assert max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)) <= 2e-2
    if r0[split] != r1[split]:
        # slots are the original head ids here: no layer is compacted during training
        for imp, ha, hb in zip(i0[split], r0[split], r1[split]):
            tied = [imp[h] for h in set(ha) ^ set(hb)]
            assert not tied or max(tied) - min(tied) <= 0.01 * max(tied), (r0, r1, i0[split])
    else:
        assert max(rel(b, a) for a, b in zip(p0, p1)) <= 2e-2


@pytest.mark.gpu
def test_a_step_with_fused_ops_is_captured():
    # fused ops include the chunked linear + cross-entropy, which a whole-step graph holds
    pytest.importorskip("liger_kernel")
    dev = torch.device("cuda")
    T = 256
    model = dataclasses.replace(config(False, T), d_model=256, n_heads=8, head_dim=32)
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 64, (2, T + 1), generator=g).to(dev) for _ in range(6)]
    runs = {}
    for graphs in (False, "step"):
        cfg = TrainConfig(
            model=dataclasses.replace(model, cuda_graphs=graphs, fused_ops=True),
            data=DataConfig(), steps=6, batch_size=2, seq_len=T, dtype="bfloat16",
        )  # fmt: skip
        state = build_state(cfg, dev)
        runs[graphs] = torch.stack([train_step(state, b[:, :-1], b[:, 1:], 1e-3) for b in batches])
        if graphs:
            assert state.graphs.failure is None and state.graphs.replays == 5
    l0, l1 = runs[False].float().cpu(), runs["step"].float().cpu()
    assert ((l1 - l0).abs() <= 1e-2 * l0.abs()).all(), (l0, l1)


def test_a_run_freezes_the_heap_it_found_and_frees_it_after():
    """`frozen_heap`: garbage from before is collected, not frozen; what lives on is left out
    of the collector's scans during the block (cheap collections at each capture); garbage
    made inside is still collected; nothing stays frozen after."""
    import gc
    import weakref

    from automla.trainers.step_graph import frozen_heap

    class Node:
        pass

    def cycle() -> weakref.ref:
        a, b = Node(), Node()
        a.other, b.other = b, a
        return weakref.ref(a)

    gc.disable()  # no automatic collection: only frozen_heap's own can free `before`
    try:
        before = cycle()
        with frozen_heap():
            assert before() is None  # an earlier run's garbage was freed, not frozen
            assert gc.get_freeze_count() > 0
            inside = cycle()
            gc.collect()
            assert inside() is None
    finally:
        gc.enable()
    assert gc.get_freeze_count() == 0


@pytest.mark.gpu
def test_a_step_that_cannot_be_captured_falls_back_to_op_graphs():
    # a host sync inside the forward breaks the capture: the steps stay eager, and the MLA op
    # is replayed from per-op graphs again, as with cuda_graphs: op
    dev = torch.device("cuda")
    T = 256
    cfg = TrainConfig(
        model=dataclasses.replace(config(True, T), d_model=256, n_heads=8, head_dim=32),
        data=DataConfig(), steps=4, batch_size=2, seq_len=T, dtype="bfloat16",
    )  # fmt: skip
    state = build_state(cfg, dev)
    blocks = state.raw_model.blocks
    assert all(b.attn._graphed is None for b in blocks)
    forward = state.raw_model.forward

    def syncing_forward(x, y=None):
        out = forward(x, y)
        out[1].item()  # not allowed while capturing
        return out

    state.raw_model.forward = syncing_forward
    g = torch.Generator().manual_seed(3)
    b = [torch.randint(0, 64, (2, T + 1), generator=g).to(dev) for _ in range(3)]
    losses = [train_step(state, x[:, :-1], x[:, 1:], 1e-3) for x in b]
    assert state.graphs.failure is not None and state.graphs.replays == 0
    assert all(torch.isfinite(loss) for loss in losses)
    assert all(b.attn._graphed is not None and b.attn._graphed._graphs for b in blocks)
