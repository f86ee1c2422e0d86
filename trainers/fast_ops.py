"""The model's CUDA fast path: liger-kernel's fused Triton ops and torchao's float8 linears.

Both libraries are optional (the `gpu` extra) and imported only here, only on the way to a CUDA
device: the CPU path never loads them (the plain PyTorch ops of `model` stay the oracle).

`prepare_model` turns a freshly built model, already on its device, into the configured one:
- fused ops (`model.fused_ops`): SwiGLU on the fused gate/up projection and rotary positions
  (liger's), RMSNorm (`rms_norm`, with the residual add before it or not, or liger's: `NORM`)
  and, in training, linear + cross-entropy in chunks so that the (tokens x vocab) logits are
  never materialised (`cross_entropy`, or liger's: `LOSS`);
- float8 (`model.precision: fp8`): the q/k/v/o projections and the MLP's linears become
  torchao `Float8Linear`s (compiled, as torchao needs to fuse its scaling casts); the gate MLP,
  embeddings, norms and loss stay in the autocast dtype / float32.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import sys
from collections.abc import Iterator

import torch
import torch.nn as nn

from .config import ConfigError, ModelConfig

FP8_LAYERS = ("attn.qkv", "attn.proj", "mlp.gate_up", "mlp.down")
"""Names (suffixes) of the linears that `precision: fp8` converts."""

LIGER_UNUSED = ("peft", "transformers")
"""What liger-kernel's modules import where installed, only to detect PEFT and Ascend NPUs:
Hugging Face peft and transformers (which bring sklearn and torchao along), ~4-6 s of every
trial's start-up on the GPU image (bench/RESULTS.md). Kept out while liger imports."""


class _Unimportable(importlib.abc.MetaPathFinder):
    def __init__(self, packages: set[str]):
        self.packages = packages

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in self.packages:
            raise ModuleNotFoundError(f"{fullname} is kept out of this import", name=fullname)
        return None


@contextlib.contextmanager
def without_packages(*names: str) -> Iterator[None]:
    """Imports inside the block find the named top-level packages missing (as if not
    installed), unless already imported; nothing is cached, so later imports find them."""
    finder = _Unimportable({n for n in names if n not in sys.modules})
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


@functools.cache
def liger_importable() -> bool:
    """Whether the liger-kernel modules used here import (called on the CUDA path only)."""
    try:
        with without_packages(*LIGER_UNUSED):
            import liger_kernel.ops  # noqa: F401
            import liger_kernel.ops.fused_linear_cross_entropy  # noqa: F401
            import liger_kernel.ops.swiglu  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_fused_ops(cfg: ModelConfig, device: torch.device) -> bool:
    """`model.fused_ops` for `device`: None means on exactly when the device is CUDA and
    liger-kernel imports; True elsewhere is a config error."""
    if cfg.fused_ops is False:
        return False
    if device.type != "cuda":
        if cfg.fused_ops:
            raise ConfigError(
                "model.fused_ops", f"the fused Triton ops need CUDA, the model runs on {device}"
            )
        return False
    usable = liger_importable()
    if cfg.fused_ops and not usable:
        raise ConfigError(
            "model.fused_ops",
            "liger-kernel does not import: pip install 'automla[gpu]' (or set it null)",
        )
    return usable


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Switch the fused ops and float8 linears of `model` (a LanguageModel on `device`) on as
    its config asks; returns the model (converted in place)."""
    cfg: ModelConfig = model.cfg
    model.use_fused_ops(resolve_fused_ops(cfg, device))
    if cfg.precision == "fp8":
        if device.type != "cuda":
            raise ConfigError(
                "model.precision", f"fp8 needs a CUDA GPU with float8 (H100+), not {device}"
            )
        convert_fp8(model)
    return model


def convert_fp8(model: nn.Module) -> None:
    """torchao float8 training for the FP8_LAYERS linears, each compiled."""
    from torchao.float8 import convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    def wanted(module: nn.Module, name: str) -> bool:
        return isinstance(module, nn.Linear) and name.endswith(FP8_LAYERS)

    convert_to_float8_training(model, module_filter_fn=wanted)
    # one static graph per linear shape, shared by the layers: a model has four shapes, but a
    # process may build several models (the exclusive benchmark's copies at other contexts);
    # past dynamo's default limit of 8 it would silently run float8 eagerly, several x slower
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, 64)
    for module in model.modules():
        if isinstance(module, Float8Linear):
            module.compile(dynamic=False)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype that x's matmuls run in: autocast's where it is on for x's device, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def is_float8(module: nn.Module) -> bool:
    return type(module).__name__ == "Float8Linear"


def float8_linear(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T through `module`'s float8 recipe, for a weight gathered from its rows or
    columns (pruned heads): eager, not compiled (one shape per head layout)."""
    from torchao.float8.float8_linear import matmul_with_hp_or_float8_args

    x = x.to(compute_dtype(x))
    return matmul_with_hp_or_float8_args.apply(
        x, weight.t(), module.linear_mm_config, module.config
    )


NORM = "triton-add"
"""RMSNorm with fused ops: "triton-add" (`add_rms_norm`: the residual add before each norm in
its kernels, both ways; the output in autocast's dtype, blocks of rows a step in the backward;
`rms_norm` where there is no add), or "liger" (liger's, after a separate add: float32 out, one
row a step; 5.8 against 3.0 ms of backward in the 125M step at 32k). The add inside took
0.8-0.9 ms off the 125M step at 8k and 3.5-4.0 ms at 32k (bench/RESULTS.md, twenty-fifth
session). For A/B runs of `bench/train_throughput.py --norm`."""


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if NORM != "liger":
        from .rms_norm import rms_norm as triton_rms_norm

        return triton_rms_norm(x, weight, eps)
    from liger_kernel.ops import LigerRMSNormFunction

    # llama casting: the inverse RMS in float32, as F.rms_norm; not in place (dY is kept)
    return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", False)


def adds_in_norm() -> bool:
    """Whether a residual add and the norm after it run as `add_rms_norm` (`NORM`)."""
    return NORM == "triton-add"


def add_rms_norm(
    x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, its RMSNorm) with h = x + r, one Triton kernel each way."""
    from .rms_norm import add_rms_norm as triton_add_rms_norm

    return triton_add_rms_norm(x, r, weight, eps)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(g) * u of gate_up = [g | u] on its last dim, without splitting it."""
    from liger_kernel.ops.swiglu import LigerFusedGateUpSiLUMulFunction

    # 2-D in and out: its backward returns the gradient flattened to rows
    rows = gate_up.reshape(-1, gate_up.shape[-1])
    return LigerFusedGateUpSiLUMulFunction.apply(rows, False).view(*gate_up.shape[:-1], -1)


def rotary_half(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, T, H, D) and k (B, T, K, D) in the half layout (dim i pairs with i + D/2),
    cos/sin (T, D/2): liger's kernel. The model's rotary pairs adjacent dims; `Attention`
    projects q and k with their rows permuted to the half layout, which is the same rotation
    of the same pairs, and dot products do not see the permutation."""
    from liger_kernel.ops import LigerRopeFunction

    # the kernel rotates a contiguous copy in place, or the input itself when it is already
    # contiguous (a slice of qkv can be, at T = 1): it must never write into qkv
    q, k = (x.clone() if x.is_contiguous() else x for x in (q, k))
    q, k = LigerRopeFunction.apply(
        q.transpose(1, 2), k.transpose(1, 2), cos, sin, None, 1, q.shape[-1]
    )
    return q.transpose(1, 2), k.transpose(1, 2)


LOSS = "chunked"
"""The training loss with fused ops: "chunked" (`cross_entropy`, capturable in a whole-step
graph) or "liger" (liger's, which reads the target count on the host: a captured step then
takes the plain loss over the whole float32 logits). Kept for A/B runs of
`bench/train_throughput.py --loss`."""


def capturable_loss() -> bool:
    """Whether `linear_cross_entropy` can run inside a CUDA graph capture."""
    return LOSS == "chunked"


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """Mean cross-entropy of logits h @ weight.T, computed in chunks: the logits are never
    held whole (`LOSS` says whose). Under autocast the matmuls run in its dtype, as the plain
    path's: h and the (tied, float32) weight are cast once rather than in every chunk, and the
    weight's gradient is summed over the chunks in float32."""
    if LOSS == "chunked":
        from .cross_entropy import linear_cross_entropy as chunked

        return chunked(h, weight, targets, ignore_index)
    # liger's autograd Function itself, not its `liger_kernel.transformers` wrapper, which
    # imports Hugging Face transformers (see LIGER_UNUSED)
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    accum = None
    if torch.is_autocast_enabled(h.device.type):
        dtype = torch.get_autocast_dtype(h.device.type)
        h, weight, accum = h.to(dtype), weight.to(dtype), torch.float32
    # positional (autograd's apply): bias, class weights, ignore_index, lse_square_scale,
    # label_smoothing, reduction, softcap, return_z_loss, accum_dtype; the loss comes first
    out = LigerFusedLinearCrossEntropyFunction.apply(
        h, weight, targets, None, None, ignore_index, 0.0, 0.0, "mean", None, False, accum
    )
    return out[0] if isinstance(out, tuple) else out


def half_order(head_dim: int) -> torch.Tensor:
    """Permutation of one head's dims from adjacent pairs to the half layout."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def from_half(x: torch.Tensor) -> torch.Tensor:
    """Undo the half layout on the last dim (a copy)."""
    return x.unflatten(-1, (2, -1)).transpose(-1, -2).flatten(-2)
