"""Test-wide settings and shared fixtures (shared builders and random inputs: tiny.py)."""

from pathlib import Path

import pytest
import torch

from pipelines.model.tiny import build_tiny_encoders

# The tests use tiny models, for which one thread is fastest; more threads only contend with the
# subprocesses some tests start (measured: a tiny training run took 44 s on 2 threads under load, 1.7 s on 1).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_encoders(tmp_path_factory) -> dict[str, Path]:
    """Tiny CLIP (seed 0), T5 (seed 1) and 8x VAE (seed 2) saved in the Hugging Face layout, built once for the
    session: tests load them by path and never write into them."""
    return build_tiny_encoders(tmp_path_factory.mktemp("tiny-encoders"), seed=0)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """(image data folder, a finished 2-step tiny T2I run folder), made once for the session; tests copy what they
    change."""
    from train_data import train_config, write_dataset

    from pipelines.train.trainer import train

    root = tmp_path_factory.mktemp("tiny-run")
    images = write_dataset(root / "img", "image", samples=8, shards=2)
    result = train(train_config(root, images, steps=2, checkpoint_every=2, lr=1e-3, text_dropout=0.0))
    return images, result.run_dir
