"""Triton MLA: gated local + global + sparse causal attention, forward and backward (DESIGN §1).

Layout as in the reference: q [B, T, HQ, D], k/v [B, T, HKV, D], gate [B, T, HQ, 3].

Forward: block scores and their top-k for the sparse selection, the local and global branches
fused per query tile of one head, then the sparse branch per token and KV group (the group's
[G, D] queries share each selected key block), which also applies its gate and finishes the
output. Each branch keeps its log-sum-exp and, when gradients are wanted, the local one its
own output (the gate's gradient is <do, o_branch>); the selected block indices are kept too.
The global and sparse branches' outputs are not kept: each one's dgate, sum_j P dP with the
ungated do, is summed in its dq loop; the global dq sums P k apart and subtracts its softmax
delta's share once the loop has it, and the sparse delta is <do, o> less the other two.

Backward: dq per query tile (local + global) and per token (sparse), each kernel also giving
its branches' dgate and softmax deltas (read by the dk/dv kernels after it; the sparse dq reads
the window dq's, which runs before it); dk/dv per key tile for the local branch, per
compressed tile for the global one (its gradient spread back over the pooled keys), and for
the sparse one per chunk of the tokens that chose a key block (the selection inverted on the
device by a count, a scan and an atomic fill), added atomically.
On CUDA the sparse branch's chain (its selection in the forward; its inversion, dq and dk/dv in
the backward) runs on a second stream beside the window branches' kernels (`OVERLAP`), and at
short T the dk/dv launches split their work over more programs. The forward is deterministic;
the dk/dv sums are not bitwise (atomic order).

Files: `common.py` the shared `@triton.jit` helpers; `selection.py` the block scores, top-k and
pooling; `window.py` the local and global branches; `sparse.py` the sparse branch and the
inversion of the selection; `sparse_tile.py` the sparse branch with tile-shared selection
(select_tile > 1); `window_gluon.py` the window forward in Gluon (Hopper, head dim 128, taken
from 64 compressed keys); `local_dkv_gluon.py` the local dk/dv in Gluon (opt-in: slower than
the `tl.dot` kernel so far); `layout.py` the tiles and the sizes of one call; `autograd.py`
the launch sequence, the autograd Function and `mla_triton`; `launch.py` every launch, and
compiling them ahead (`compile_ahead`).
"""

from .autograd import compile_ahead, mla_triton, unsupported
from .launch import async_compile_available
from .selection import select_blocks_triton

__all__ = [
    "async_compile_available",
    "compile_ahead",
    "mla_triton",
    "select_blocks_triton",
    "unsupported",
]
