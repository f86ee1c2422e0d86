"""`ModelConfig.cuda_graphs`: the MLA op replayed from CUDA graphs gives the eager results."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from automla.kernels import AttentionConfig
from automla.trainers import ModelConfig, build_model


def config(cuda_graphs: bool, T: int = 64, backend: str = "auto") -> ModelConfig:
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
    for graphs in (False, True):
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
    (l0, y0, p0), (l1, y1, p1) = runs[False], runs[True]
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
            model = build_model(config(True, T)).to(dev)
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
