"""DDP and FSDP on 2 CPU processes (gloo) follow the single-process loss trajectory for the same global batch, also
with data of several sizes and lengths (buckets: every rank draws the same bucket at each step)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import torch
import torch.multiprocessing as mp
from train_data import free_port, rank_main, write_buckets, write_dataset

from pipelines.data.loader import StreamSpec, TrainStream, index_source
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
    # buckets: square and wide images, clips of 4 and 2 frames at those sizes
    bucketed = replace(
        config,
        image_data=str(write_buckets(tmp_path / "bimg", "image", [(6, 8, 8, 1), (6, 8, 16, 1)])),
        video_data=str(write_buckets(tmp_path / "bvid", "video", [(6, 8, 8, 4), (6, 8, 16, 2)], first=100)),
        output=str(tmp_path / "single_buckets"),
    )
    single_buckets = train(bucketed)
    ddp_buckets = replace(bucketed, output=str(tmp_path / "ddp_buckets"), grad_accum=2)
    mp.spawn(rank_main, args=(2, free_port(), [ddp, fsdp, ddp_buckets]), nprocs=2, join=True)
    stats = json.loads((tmp_path / "ddp_buckets" / "data_stats.json").read_text())["buckets"]
    assert len(stats["buckets"]) == 2  # (4, 8x8) and (2, 8x16) clips
    images, videos = (index_source(bucketed.image_data, "image"), index_source(bucketed.video_data, "video"))
    spec = StreamSpec("t2v", bucketed.seed, bucketed.global_batch, p_motion_free=bucketed.p_motion_free)
    stream = TrainStream(spec, images, videos, {}, collate_text=list)
    assert len({stream.bucket_of(step).shape for step in range(bucketed.steps)}) == 2  # the run went through both
    np.testing.assert_allclose(losses(tmp_path / "ddp_buckets"), single_buckets.losses, rtol=2e-4, atol=1e-5)
    for run in ("ddp", "fsdp"):
        np.testing.assert_allclose(losses(tmp_path / run), single.losses, rtol=2e-4, atol=1e-5, err_msg=run)
        assert ckpt.latest_checkpoint(tmp_path / run).name == "step_0000005"
        a = GenTronTransformer.from_pretrained(str(tmp_path / "single" / "model")).state_dict()
        b = GenTronTransformer.from_pretrained(str(tmp_path / run / "model")).state_dict()
        assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a), run  # gathered full EMA weights
    assert single.losses[-1] < single.losses[0]
