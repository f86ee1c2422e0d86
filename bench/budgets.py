"""The MLA budgets the bench scripts run, fixed by what each branch reads rather than by ratios
(each runs as `python bench/X.py`, which puts bench/ on the import path)."""

from __future__ import annotations

try:
    from automla.kernels import AttentionConfig
except ImportError:  # run from a checkout without an install
    from kernels import AttentionConfig

BLOCK = 64
# window, selected blocks, global stride
BUDGETS = {"nsa": (512, 16, 64), "small": (256, 4, 128)}


def budget_config(
    T: int, budget: str = "nsa", select_tile: int = 1, config_class: type = AttentionConfig
) -> AttentionConfig:
    """The AttentionConfig whose plan at length T has the budget's window, selected blocks of
    64 and global stride. The pooled tokens grow with T (T / stride of them), so the budget
    does too: window + blocks * 64 + T / stride. config_class: another tree's AttentionConfig
    (`tree_ab.py`)."""
    window, blocks, stride = BUDGETS[budget]
    for g in (T // stride, T // stride + 1):  # + 1 when rounding pushes the stride up
        total = window + blocks * BLOCK + g
        cfg = config_class(
            budget=total,
            ratios=(window / total, g / total, blocks * BLOCK / total),
            block_size=BLOCK,
            select_tile=select_tile,
        )
        plan = cfg.plan(T)
        if (plan.window, plan.n_select, plan.stride) == (window, blocks, stride):
            return cfg
    raise AssertionError(f"no budget gives {BUDGETS[budget]} at T={T}: {plan}")
