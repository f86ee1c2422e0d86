"""Triton MLA with tile-shared selection (`select_tile` > 1) against the naive reference.

Under TRITON_INTERPRET=1 on CPU (float32, tiny sizes; the interpreter's tiles make every loop
run more than once); the gpu-marked tests run in bfloat16 at real sizes.
"""

from __future__ import annotations

import pytest
import torch
from test_triton import check, make_inputs, rel_err, run_reference, run_triton

from automla.kernels import AttentionConfig, select_blocks
from automla.kernels.selection import select_tiles

# (B, T, HQ, HKV, D, budget, ratios, block_size, select_tile)
CASES = [
    pytest.param(1, 37, 4, 2, 16, 24, (0.5, 0.25, 0.25), 4, 2, id="T37-G2-Bq2-mixed"),
    pytest.param(1, 63, 3, 1, 16, 32, (0.25, 0.25, 0.5), 4, 16, id="T63-G3-Bq16-mixed"),
    pytest.param(2, 45, 4, 4, 16, 32, (0.0, 0.0, 1.0), 8, 16, id="B2-T45-G1-Bq16-sparse"),
    pytest.param(1, 70, 4, 1, 16, 32, (0.0, 0.5, 0.5), 4, 64, id="T70-G4-Bq64-global-sparse"),
    pytest.param(1, 77, 4, 1, 16, 32, (0.5, 0.0, 0.5), 8, 128, id="T77-G4-Bq128-local-sparse"),
    pytest.param(1, 41, 16, 1, 16, 24, (0.3, 0.2, 0.5), 4, 16, id="T41-G16-Bq16"),
    pytest.param(1, 33, 2, 1, 64, 16, (0.25, 0.25, 0.5), 4, 2, id="T33-G2-D64-Bq2"),
    pytest.param(1, 19, 2, 2, 128, 16, (0.25, 0.25, 0.5), 4, 16, id="T19-G1-D128-Bq16"),
    # G not a power of two, rows packed without padding (`tile_rows`), T past the last tile
    pytest.param(1, 150, 6, 2, 16, 32, (0.25, 0.25, 0.5), 4, 64, id="T150-G3-Bq64-packed"),
    pytest.param(2, 53, 6, 1, 32, 24, (0.3, 0.2, 0.5), 4, 16, id="B2-T53-G6-Bq16-packed"),
]


@pytest.mark.parametrize("B,T,HQ,HKV,D,budget,ratios,bs,bq", CASES)
def test_tile_mode_matches_reference(B, T, HQ, HKV, D, budget, ratios, bs, bq):
    cfg = AttentionConfig(budget=budget, ratios=ratios, block_size=bs, select_tile=bq)
    check(B, T, HQ, HKV, D, cfg, torch.float32, tol=1e-5, seed=T + bq)


def test_tile_dkv_chunks_of_several_tiles(monkeypatch):
    # short sequences get one tile per dk/dv chunk (`DKV_PROGRAMS`, as in the tests above);
    # here the tiles' CH decides: chunks of 4 tiles of Bq 2
    import automla.kernels.parallel.sparse_tile as sparse_tile

    monkeypatch.setattr(sparse_tile, "DKV_PROGRAMS", 1)
    cfg = AttentionConfig(budget=24, ratios=(0.25, 0.25, 0.5), block_size=4, select_tile=2)
    check(1, 37, 4, 2, 16, cfg, torch.float32, tol=1e-5, seed=39)


@pytest.mark.parametrize("ratios", [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0)], ids=["local", "global"])
def test_tile_setting_leaves_sparse_free_corners_alone(ratios):
    cfg = AttentionConfig(budget=16, ratios=ratios, block_size=4, select_tile=16)
    check(1, 37, 4, 2, 16, cfg, torch.float32, tol=1e-5)


@pytest.mark.parametrize(
    "mask",
    [
        pytest.param([True, False, True, True, False, False], id="part-of-groups"),
        pytest.param([False, False, False, True, True, True], id="whole-group"),
    ],
)
@pytest.mark.parametrize("bq", [16, 64], ids=["padded", "packed"])
def test_tile_mode_head_mask(mask, bq):
    cfg = AttentionConfig(budget=24, ratios=(0.25, 0.25, 0.5), block_size=4, select_tile=bq)
    check(1, 45 + bq, 6, 2, 16, cfg, torch.float32, tol=1e-5, head_mask=torch.tensor(mask))


def test_tile_mode_head_mask_of_a_64_head_group():
    # the dk/dv kernel reads a group's active heads as the bits of an int64: head 63 is its sign
    cfg = AttentionConfig(budget=24, ratios=(0.25, 0.25, 0.5), block_size=4, select_tile=16)
    mask = torch.ones(64, dtype=torch.bool)
    mask[[0, 5, 63]] = False
    check(1, 37, 64, 1, 16, cfg, torch.float32, tol=1e-5, head_mask=mask)


def test_tile_rows_pack_groups_that_are_not_a_power_of_two():
    from automla.kernels.parallel.sparse_tile import tile_rows

    # (GR, RU, RP): G = 3 packs 64 rows of a 64 x 3 tile; too small a tile keeps the padding
    assert tile_rows(3, 64, 64) == (3, 64, 64)
    assert tile_rows(3, 64, 128) == (3, 64, 64)
    assert tile_rows(3, 16, 64) == (4, 64, 64)
    assert tile_rows(3, 2, 32) == (4, 8, 16)
    assert tile_rows(6, 16, 32) == (6, 32, 32)
    assert tile_rows(16, 64, 128) == (16, 128, 128)


def test_tile_mode_float16():
    cfg = AttentionConfig(budget=40, ratios=(0.4, 0.2, 0.4), block_size=16, select_tile=16)
    check(1, 79, 4, 2, 32, cfg, torch.float16, tol=5e-3)


def test_tile_selection_matches_select_tiles():
    from automla.kernels.parallel.layout import _Layout
    from automla.kernels.parallel.sparse_tile import select

    q, k, *_ = make_inputs(1, 90, 6, 2, 16, torch.float32, seed=9)
    mask = torch.tensor([True, False, True, True, True, False])
    plan = AttentionConfig(budget=24, ratios=(0.25, 0.25, 0.5), block_size=4, select_tile=8).plan(
        90
    )
    got = select(q, k, _Layout(q, k, plan, mask), None).long()
    assert torch.equal(got, select_tiles(q, k, plan, mask))


@pytest.mark.parametrize(
    "bq,mask",
    [(64, None), (16, [True, False, True, True, False, False])],
    ids=["packed", "padded-head-mask"],
)
def test_tile_selection_takes_the_global_branchs_lse(monkeypatch, bq, mask):
    # global stride == block size: the selection's softmax is the global branch's, so the op
    # normalises the scores by that branch's lse (one pass over the blocks, after the window
    # forward) and still selects exactly what select_tiles does
    from automla.kernels.parallel import autograd, sparse_tile
    from automla.kernels.parallel.layout import _Layout

    monkeypatch.setattr(autograd, "SELECT_AFTER_NC", 0)  # from the first compressed key
    cfg = AttentionConfig(budget=96, ratios=(0.25, 0.5, 0.25), block_size=4, select_tile=bq)
    plan = cfg.plan(150)
    assert plan.stride == plan.block_size
    head_mask = None if mask is None else torch.tensor(mask)
    check(1, 150, 6, 2, 16, cfg, torch.float32, tol=1e-5, seed=bq, head_mask=head_mask)
    given = []
    select = sparse_tile.select

    def spy(*args, lse_g=None):
        given.append(lse_g)
        return select(*args, lse_g=lse_g)

    monkeypatch.setattr(sparse_tile, "select", spy)
    q, k, v, gate, _ = make_inputs(1, 150, 6, 2, 16, torch.float32, seed=bq + 1)
    _, saved = autograd.mla_fwd(q, k, v, gate, _Layout(q, k, plan, head_mask), store=True)
    assert len(given) == 1 and given[0] is saved["lse_g"]
    assert torch.equal(saved["idx"].long(), select_tiles(q, k, plan, head_mask))


def _real_size_config(bq: int) -> AttentionConfig:
    # NSA-sized: window 512, 16 blocks of 64, compressed stride 64 at 8k
    return AttentionConfig(
        budget=1664,
        ratios=(512 / 1664, 128 / 1664, 1024 / 1664),
        block_size=64,
        select_tile=bq,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("edge", [False, True], ids=["masks", "edge-masks"])
@pytest.mark.parametrize("bq", [16, 64])
@pytest.mark.parametrize("HQ,HKV,D", [(12, 4, 64), (64, 4, 128), (16, 16, 64)])
def test_gpu_tile_mode_bf16(monkeypatch, bq, HQ, HKV, D, edge):
    # edge: the window kernels and the local dk/dv mask only their bands' edge tiles
    from automla.kernels.parallel import autograd

    monkeypatch.setattr(autograd, "EDGE_MASKS", edge)
    monkeypatch.setattr(autograd, "LOCAL_DKV_EDGE", edge)
    T = 4096 + 37
    cfg = _real_size_config(bq)
    q, k, v, gate, do = make_inputs(1, T, HQ, HKV, D, torch.bfloat16, device="cuda", seed=bq)
    o, grads = run_triton(q, k, v, gate, do, cfg, t_max=8192)
    o_ref, grads_ref = run_reference(q, k, v, gate, do, cfg, t_max=8192)
    errs = {"o": rel_err(o, o_ref)}
    for name, x, ref in zip(("dq", "dk", "dv", "dgate"), grads, grads_ref):
        errs[name] = rel_err(x, ref)
    assert all(e <= 1e-2 for e in errs.values()), errs


@pytest.mark.gpu
def test_gpu_tile_mode_forward_is_deterministic():
    from automla.kernels.parallel import mla_triton

    cfg = _real_size_config(64)
    q, k, v, gate, _ = make_inputs(1, 8192, 32, 2, 128, torch.bfloat16, device="cuda", seed=2)
    first = mla_triton(q, k, v, gate, cfg)
    for _ in range(3):
        assert torch.equal(mla_triton(q, k, v, gate, cfg), first)


@pytest.mark.gpu
def test_gpu_tile_selection_matches_select_blocks(monkeypatch):
    from automla.kernels.parallel import autograd
    from automla.kernels.parallel.layout import _Layout
    from automla.kernels.parallel.sparse_tile import select

    cfg = _real_size_config(64)
    q, k, *_ = make_inputs(1, 8192, 32, 2, 128, torch.bfloat16, device="cuda", seed=4)
    plan = cfg.plan(8192)
    got = select(q, k, _Layout(q, k, plan, None), None).long().sort(-1).values
    want = select_tiles(q, k, plan).sort(-1).values
    assert (got != want).float().mean().item() < 1e-3
    assert select_blocks(q, k, plan).shape[1] == 8192
    # the op's own selection, its scores normalised by the global branch's lse (bf16 means)
    monkeypatch.setattr(autograd, "SELECT_AFTER_NC", 0)
    v, gate = torch.randn_like(k), torch.rand(*q.shape[:3], 3, device="cuda", dtype=q.dtype)
    _, saved = autograd.mla_fwd(q, k, v, gate, _Layout(q, k, plan, None), store=True)
    got = saved["idx"].long().sort(-1).values
    assert (got != want).float().mean().item() < 1e-3


def test_tile_mode_takes_longer_sequences_on_the_kernels():
    """The per-query block scores need T x HKV x NB < 2^31 entries; a tile's need NT x HKV x NB
    (256k tokens, 4 KV heads, blocks of 64: too many per query, few enough per tile of 64)."""
    from automla.kernels.parallel import unsupported

    T = 262144
    q = torch.empty(1, T, 8, 64, dtype=torch.bfloat16, device="meta")
    k = torch.empty(1, T, 4, 64, dtype=torch.bfloat16, device="meta")
    plan = _real_size_config(1).plan(T)
    assert "32-bit" in unsupported(q, k, k, plan)
    assert unsupported(q, k, k, _real_size_config(64).plan(T)) is None


TMA_CASES = [
    pytest.param(2, 53, 6, 2, 16, 24, (0.3, 0.2, 0.5), 4, 16, None, id="B2-T53-G3-Bq16"),
    pytest.param(1, 150, 6, 2, 16, 32, (0.25, 0.25, 0.5), 4, 64, None, id="T150-G3-Bq64"),
    pytest.param(2, 45, 4, 1, 16, 24, (0.4, 0.2, 0.4), 4, 1, None, id="B2-T45-G4-Bq1"),
    pytest.param(
        1, 61, 6, 2, 16, 24, (0.25, 0.25, 0.5), 4, 16, [True, False, True, False, False, False],
        id="T61-mask",
    ),
]  # fmt: skip


@pytest.mark.parametrize("B,T,HQ,HKV,D,budget,ratios,bs,bq,mask", TMA_CASES)
def test_tma_descriptor_loads_match_reference(
    monkeypatch, B, T, HQ, HKV, D, budget, ratios, bs, bq, mask
):
    # The kernels that load through TMA descriptors from head dim 128 on the GPU
    # (`layout.TMA_MIN_D`), here at every head dim: keys past a sequence's end (the next
    # sequence's, or past the tensor) reach them, and the masks must keep them out.
    import automla.kernels.parallel.launch as launch
    import automla.kernels.parallel.layout as layout

    if not launch.descriptors_available():
        pytest.skip("this Triton has no host-side TMA descriptors")
    monkeypatch.setattr(layout, "TMA_MIN_D", 0)
    made = []
    tiles_of = launch.tiles_of

    def counted(rows, tma, **tensors):
        made.append(tma)
        return tiles_of(rows, tma, **tensors)

    for module in ("autograd", "sparse_tile"):
        monkeypatch.setattr(f"automla.kernels.parallel.{module}.tiles_of", counted)
    cfg = AttentionConfig(budget=budget, ratios=ratios, block_size=bs, select_tile=bq)
    head_mask = None if mask is None else torch.tensor(mask)
    check(B, T, HQ, HKV, D, cfg, torch.float32, tol=1e-5, head_mask=head_mask, seed=T)
    assert made and all(made)  # every launch that can take descriptors took them
