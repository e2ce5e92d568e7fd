"""DDP and FSDP on 2 CPU processes (gloo) follow the single-process loss trajectory for the same global batch."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.multiprocessing as mp
from train_data import free_port, rank_main, write_dataset

from pipelines.model.gentron import GenTronTransformer
from pipelines.train import checkpoint as ckpt
from pipelines.train.metrics import read_metrics
from pipelines.train.trainer import TrainConfig, train


def losses(run) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl")]


def test_ddp_and_fsdp_match_one_process_with_the_same_global_batch(tmp_path):
    images = write_dataset(tmp_path / "img", "image", samples=6, shards=2)
    videos = write_dataset(tmp_path / "vid", "video", samples=6, shards=2)
    config = TrainConfig(
        stage="t2v",
        image_data=str(images),
        video_data=str(videos),
        model='{"size": "T/2", "hidden_size": 32, "mlp_dim": 64}',
        steps=5,
        global_batch=4,
        lr=3e-3,
        num_workers=0,
        checkpoint_every=5,
        log_every=1,
        ema_decay=0.9,
        p_motion_free=0.5,
        output=str(tmp_path / "single"),
    )
    single = train(config)
    ddp = replace(config, output=str(tmp_path / "ddp"))
    fsdp = replace(config, output=str(tmp_path / "fsdp"), fsdp=True, grad_accum=2)  # micro-batch 1 per rank
    mp.spawn(rank_main, args=(2, [free_port(), free_port()], [ddp, fsdp]), nprocs=2, join=True)
    for run in ("ddp", "fsdp"):
        np.testing.assert_allclose(losses(tmp_path / run), single.losses, rtol=2e-4, atol=1e-5, err_msg=run)
        assert ckpt.latest_checkpoint(tmp_path / run).name == "step_0000005"
        a = GenTronTransformer.from_pretrained(str(tmp_path / "single" / "model")).state_dict()
        b = GenTronTransformer.from_pretrained(str(tmp_path / run / "model")).state_dict()
        assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a), run  # gathered full EMA weights
    assert single.losses[-1] < single.losses[0]
