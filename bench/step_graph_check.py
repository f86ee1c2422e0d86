"""Whether a training step of the model gpu.yaml searches is captured in a CUDA graph, for each
precision and with fused ops off and on (`model.cuda_graphs: step`).

    cd bench && python step_graph_check.py        # CUDA; liger-kernel and torchao for fused/fp8

Four steps each on random tokens (batch 8 × 2048, MLA at select_tile 64): the first runs eagerly
(the capture's warm-up), the second is captured, the rest replay. Prints the capture failure
(None: captured), the replays and the last loss.
"""

from __future__ import annotations

import torch
import train_throughput as tt

from automla.trainers import TrainConfig
from automla.trainers.trainer import build_state, train_step


def main() -> None:
    dev = torch.device("cuda")
    for precision in ("bf16", "fp8"):
        for fused in (False, True):
            v = tt.Variant("mla", 64, graphs="step", fused=fused, precision=precision)
            model = tt.model_config(v, 2048, False, (8, 2, 64), model="search")
            cfg = TrainConfig(model=model, steps=8, batch_size=8, seq_len=2048, dtype="bfloat16")
            state = build_state(cfg, dev)
            x = torch.randint(0, model.vocab_size, (8, 2048), device=dev)
            for _ in range(4):
                loss = train_step(state, x, x, 1e-4)
            torch.cuda.synchronize()
            print(
                f"{precision} {'fused' if fused else 'plain'}: failure {state.graphs.failure}, "
                f"replays {state.graphs.replays}, loss {float(loss):.4f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
