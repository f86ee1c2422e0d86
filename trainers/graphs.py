"""CUDA-graph replay of one layer's MLA op.

At the 125M model's size a layer's MLA op runs ~25 kernels for about 2.6 ms of GPU time at 8k
tokens, and Python needs ~3.9 ms to launch them (bench/host_overhead.py): the step waits on the
host. `GraphedOp` captures the op's forward and backward once per input signature with
`torch.cuda.make_graphed_callables` and then replays them: one launch each way.

Replays reuse static buffers: an output is valid until the same layer's op runs again with the
same signature, which a training step (forward, then backward) respects.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from automla.kernels import AttentionConfig, mla_attention

from .step_graph import no_gc

_KEEP = 4  # signatures kept per layer: training, evaluation, and a benchmark context or two


class GraphedOp:
    """The MLA op of one layer, replayed from CUDA graphs keyed by shapes, dtypes and mask."""

    def __init__(self) -> None:
        self._graphs: OrderedDict[tuple, Callable] = OrderedDict()

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        gate: torch.Tensor,
        config: AttentionConfig,
        t_max: int,
        head_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        inputs = (q, k, v, gate)
        mask_key = None if head_mask is None else tuple(head_mask.tolist())
        key = (
            tuple((x.shape, x.dtype, x.requires_grad) for x in inputs),
            mask_key,
            config.plan(t_max),
            q.device,
        )
        graphed = self._graphs.get(key)
        if graphed is None:

            def op(q, k, v, gate):
                return mla_attention(
                    q, k, v, gate, config, t_max=t_max, head_mask=head_mask, backend="triton"
                )

            # static inputs of their own: the samples become the graph's input buffers
            samples = tuple(x.detach().clone().requires_grad_(x.requires_grad) for x in inputs)
            # the op's inputs arrive in their final dtypes: nothing inside needs autocast, and
            # make_graphed_callables refuses autocast's cache
            with torch.autocast(q.device.type, enabled=False), no_gc():
                graphed = torch.cuda.make_graphed_callables(op, samples)
            while len(self._graphs) >= _KEEP:
                self._graphs.popitem(last=False)
            self._graphs[key] = graphed
        self._graphs.move_to_end(key)
        return graphed(*inputs)
