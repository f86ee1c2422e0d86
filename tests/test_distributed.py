"""Multi-worker training: gloo workers match one worker, resource specs, Ray Train inside Tune."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import pytest
import torch
import torch.distributed as tdist
from helpers import cpu_train_config, local_ray, spawn_workers

from automla.distributed import ResourceError, validate_resources
from automla.kernels import AttentionConfig
from automla.trainers import DataConfig, ModelConfig, PruningConfig, TrainConfig, train
from automla.trainers import distributed as dist
from automla.trainers.config import ConfigError


def tiny(**overrides) -> TrainConfig:
    model = ModelConfig(
        d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
        mla=AttentionConfig(budget=16, ratios=(0.5, 0.25, 0.25), block_size=4),
    )  # fmt: skip
    fields = dict(
        model=model, steps=10, batch_size=8, seq_len=32, warmup_steps=3, eval_every=2,
        throughput_warmup=2,
    )  # fmt: skip
    fields.update(overrides)
    return cpu_train_config(max_bytes=200_000, **fields)


CONFIGS = {
    "stdlib": tiny(),
    "mqar": tiny(
        model=dataclasses.replace(tiny().model, vocab_size=64),
        data=DataConfig(source="mqar", mqar_pairs=4, mqar_vocab=64, mqar_examples=256),
    ),
    "pruning": tiny(
        steps=12,
        pruning=PruningConfig(
            enabled=True, fraction=0.25, warmup_steps=3, interval=2, ramp_steps=2
        ),
    ),
}


def _curve(reports: list[dict]) -> dict[str, list]:
    keys = ("step", "train_loss", "val_loss", "mqar_acc", "active_heads_per_layer")
    return {k: [m[k] for m in reports] for k in keys if k in reports[0]}


def _worker(rank: int, world: int, folder: str) -> None:
    # one process per rank, as torchrun or Ray Train would start them
    torch.set_num_threads(1)
    tdist.init_process_group(
        "gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world
    )
    try:
        out = {}
        for name, config in CONFIGS.items():
            reports: list[dict] = []
            final = train(
                config,
                out_dir=os.path.join(folder, name),
                report=lambda m, _c, got=reports: got.append(m),
            )
            out[name] = {"reports": reports, "final": final}
        with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        tdist.destroy_process_group()


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory) -> tuple[dict, str]:
    _, folder = spawn_workers(_worker, 2, lambda: (2, str(tmp_path_factory.mktemp("ddp"))))
    ranks = []
    for r in range(2):
        with open(os.path.join(folder, f"rank{r}.json")) as f:
            ranks.append(json.load(f))
    return ranks, folder


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_gloo_workers_match_one_worker(two_workers, name):
    ranks, folder = two_workers
    single: list[dict] = []
    train(CONFIGS[name], report=lambda m, _c: single.append(m))
    multi = ranks[0][name]["reports"]

    one, two = _curve(single), _curve(multi)
    assert one["step"] == two["step"] == [2, 4, 6, 8, 10] + ([12] if name == "pruning" else [])
    for key in ("train_loss", "val_loss"):
        assert torch.allclose(
            torch.tensor(two[key]), torch.tensor(one[key]), rtol=1e-5, atol=1e-6
        ), (key, one[key], two[key])
    assert one["val_loss"][-1] < one["val_loss"][0]  # it learned: the match is not trivial
    if name == "mqar":
        assert two["mqar_acc"] == pytest.approx(one["mqar_acc"], abs=1e-6)
    if name == "pruning":
        # the all-reduced importance leads both runs to the same heads
        assert two["active_heads_per_layer"] == one["active_heads_per_layer"]
        assert sum(one["active_heads_per_layer"][-1]) == 6  # 25% of 8 heads gone

    # rank 0 alone reports and writes the run folder; throughput counts global tokens
    assert ranks[1][name]["reports"] == []
    assert ranks[1][name]["final"]["val_loss"] == pytest.approx(multi[-1]["val_loss"])
    lines = open(os.path.join(folder, name, "metrics.jsonl")).read().splitlines()
    assert [json.loads(line)["step"] for line in lines] == two["step"]
    assert multi[-1]["tokens"] == single[-1]["tokens"] == CONFIGS[name].steps * 8 * 32


def test_batch_sharding_single_process_and_errors():
    x = torch.arange(12).reshape(6, 2)
    assert dist.shard(x)[0] is x  # a world of one keeps the whole batch
    assert dist.world_size() == 1 and dist.is_main() and not dist.is_distributed()
    assert dist.check_batch(8, 2) == 4
    # a ConfigError: `automla train` under torchrun prints it as one line, not a traceback
    with pytest.raises(ConfigError, match="batch_size=7 .* 2 workers"):
        dist.check_batch(7, 2)
    assert dist.all_reduce_mean(torch.tensor([3.0])).item() == 3.0


# -- resources -----------------------------------------------------------------------------

CLUSTER = {"CPU": 16.0, "GPU": 2.0}


@pytest.mark.parametrize(
    "cpus, gpus, workers",
    [(1, 0, 1), (2, 0.25, 1), (4, 1, 1), (2, 1, 2), (1, 0, 4), (0.5, 0.5, 1), (1, 1, 2)],
)
def test_valid_resource_specs(cpus, gpus, workers):
    validate_resources(cpus, gpus, workers, CLUSTER)


@pytest.mark.parametrize(
    "cpus, gpus, workers, match",
    [
        (1, 1, 3, r"3 GPUs per trial \(3 workers x 1\) .* cluster has 2"),
        (1, 2, 1, r"each worker trains on one GPU.*workers: 2 with gpus: 1"),
        (1, 1.5, 1, r"fraction below 1 .* whole number"),
        (1, 0.5, 2, r"fraction.* several workers"),
        (20, 0, 1, r"20 CPUs per trial .* cluster has 16"),
        (
            4,
            0,
            8,
            r"32.01 CPUs per trial \(8 workers x 4, and 0.01 for the trial's own.*cpus: 1.99",
        ),
        (8, 0, 2, r"16.01 CPUs per trial .* cluster has 16; cpus: 7.99 per worker fits"),
        (1, 0.5, 0, r"workers .* >= 1"),
        (0, 0, 1, r"cpus .* > 0"),
        (1, -1, 1, r"gpus .* >= 0"),
        (1, 0, 1.5, r"workers .* integer"),
    ],
)
def test_invalid_resource_specs(cpus, gpus, workers, match):
    with pytest.raises(ResourceError, match=match):
        validate_resources(cpus, gpus, workers, CLUSTER)


def test_distributed_trial_rejects_an_uneven_batch_before_starting():
    from automla.distributed import run_distributed_trial

    with pytest.raises(ValueError, match="batch_size=8 .* 3 workers"):
        run_distributed_trial(tiny(), workers=3, use_gpu=False, report=None)


def test_concurrency_and_trial_reservations():
    from automla.distributed import max_concurrent_trials, trial_resources

    assert max_concurrent_trials(1, 0.25, 1, CLUSTER) == 8  # 4 trials per GPU, 2 GPUs
    assert max_concurrent_trials(2, 1, 2, CLUSTER) == 1  # both GPUs per trial
    assert max_concurrent_trials(4, 0, 2, CLUSTER) == 1  # 8.01 CPUs: the driver's share counts
    assert max_concurrent_trials(1, 0, 1, CLUSTER) == 16
    assert trial_resources(2, 0.5, 1) == {"cpu": 2, "gpu": 0.5}
    assert 0 < trial_resources(2, 1, 2)["cpu"] < 0.1 and "gpu" not in trial_resources(2, 1, 2)


def test_gpus_asked_on_a_cpu_cluster():
    with pytest.raises(ResourceError, match="no GPUs"):
        validate_resources(1, 0.5, 1, {"CPU": 4.0})


# -- Ray Train inside a Tune trial ------------------------------------------------------------


def test_ray_train_workers_inside_a_tune_trial(tmp_path):
    pytest.importorskip("ray")
    from ray import tune

    from automla.distributed import run_distributed_trial, trial_resources

    config = tiny(steps=4, eval_every=2)

    def report(metrics: dict, checkpoint_dir) -> None:
        # Tune copies the folder while report runs; a slow copy must still find this step's
        # checkpoint there at the end (rank 0 waits for report before it trains on)
        def held() -> int:
            return torch.load(checkpoint_dir / "checkpoint.pt", weights_only=True)["step"]

        first = held()
        time.sleep(1.0)  # the next evaluation, if rank 0 went on, is well under a second away
        tune.report({**metrics, "held_from": first, "held_to": held()})

    def trainable(params: dict) -> None:
        run_distributed_trial(
            config,
            workers=2,
            use_gpu=False,
            cpus_per_worker=0.5,
            report=report,
            out_dir=os.path.join(tune.get_context().get_trial_dir(), "train"),
        )

    with local_ray(num_cpus=2):
        tuner = tune.Tuner(
            tune.with_resources(trainable, trial_resources(0.5, 0, 2)),
            run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0),
        )
        results = tuner.fit()
    result = results[0]
    assert result.error is None, result.error
    history = result.metrics_dataframe
    assert list(history["step"]) == [2, 4]
    assert list(history["world_size"]) == [2, 2]
    assert list(history["held_from"]) == list(history["held_to"]) == [2, 4], history
    single: list[dict] = []
    train(config, report=lambda m, _c: single.append(m))
    assert torch.allclose(
        torch.tensor(list(history["val_loss"])),
        torch.tensor([m["val_loss"] for m in single]),
        rtol=1e-5,
        atol=1e-6,
    )
    assert all(math.isfinite(v) for v in history["tokens_per_s"])
    train_dir = os.path.join(result.path, "train")
    assert os.path.isfile(os.path.join(train_dir, "checkpoint", "checkpoint.pt"))
