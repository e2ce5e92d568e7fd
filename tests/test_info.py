"""Parameter and FLOP counting on the meta device, and the `gentron info` command."""

from __future__ import annotations

import torch
import typer
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from gentron_cli.commands.info import register
from pipelines.model import GenTronTransformer, count_parameters, meta_model, model_config, model_cost
from pipelines.model.flops import CLIP_LENGTH, T5_LENGTH, example_inputs, forward_flops


def _app() -> typer.Typer:
    app = typer.Typer()
    app.callback()(lambda: None)  # keep `info` a subcommand, as in the real app
    register(app)
    return app


def test_meta_forward_flops_equal_a_real_forward():
    """The meta-device count is the count of a real CPU forward (math attention, which the counter sees)."""
    config = model_config("T/2", temporal=True)
    cost = model_cost(config, resolution=64, frames=3, batch_size=2)
    model = GenTronTransformer.from_config(config)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*example_inputs(config, latent_size=8, frames=3, batch_size=2, device="cpu"))
    assert cost.forward_flops == counter.get_total_flops() > 0
    assert cost.tokens_per_sample == 3 * 4 * 4
    assert cost.train_step_flops == 3 * cost.forward_flops
    assert (cost.params, cost.temporal_params) == count_parameters(model)


def test_depth_extrapolation_equals_a_full_count():
    config = model_config("T/2", temporal=True, depth=5)
    cost = model_cost(config, resolution=64, frames=2, batch_size=3)
    assert cost.forward_flops == forward_flops(config, latent_size=8, frames=2, batch_size=3)


def test_forward_flops_match_the_analytic_matmul_count():
    """Dominant terms of a block, counted by hand, against the counter (2 FLOPs per multiply-add)."""
    config = model_config("S/2")
    d, m, depth, n, text = config["hidden_size"], config["mlp_dim"], config["depth"], 256, CLIP_LENGTH + T5_LENGTH
    per_block = 2 * n * (
        3 * d * d + d * d  # self-attention qkv + out
        + 2 * n * d  # scores + weighted values
        + d * d + d * d  # cross q + out
        + 2 * text * d  # cross scores + values
        + 2 * d * m  # MLP
    ) + 2 * text * 2 * d * d  # cross k, v from the text tokens
    widths = config["text_inputs"]
    text_projections = 2 * CLIP_LENGTH * (widths["clip"]["dim"] * d + d * d) + 2 * T5_LENGTH * (widths["t5"]["dim"] * d + d * d)
    forward = model_cost(config, resolution=256).forward_flops
    assert 1.0 < forward / (depth * per_block + text_projections) < 1.03  # the rest: embeddings, adaLN, final layer


def test_train_step_is_about_three_forwards():
    """The 3x rule, checked against a counted forward + backward."""
    config = model_config("T/2", temporal=True)
    model = meta_model(config)
    with FlopCounterMode(display=False) as counter:
        model(*example_inputs(config, latent_size=16, frames=2, batch_size=2)).sum().backward()
    ratio = counter.get_total_flops() / model_cost(config, resolution=128, frames=2, batch_size=2).forward_flops
    assert 2.8 < ratio < 3.05


def test_frames_add_temporal_params_and_scale_flops():
    config = model_config("B/2")
    image = model_cost(config, resolution=256)
    video = model_cost(config, resolution=256, frames=8, batch_size=2)
    assert image.temporal_params == 0 and video.temporal_params > 0
    assert video.params - video.temporal_params == image.params
    assert video.forward_flops > 16 * image.forward_flops  # 2 samples x 8 frames, plus temporal attention


def test_info_prints_g2_parameter_count():
    total, _ = count_parameters(meta_model(model_config("G/2")))
    result = CliRunner().invoke(_app(), ["info", "--config", "G/2"])
    assert result.exit_code == 0, result.output
    assert f"{total / 1e6:.0f}M" in result.output
    assert "3083.8M" in result.output  # the paper's figure beside ours


def test_info_video_shows_temporal_share_and_all_sizes_by_default():
    result = CliRunner().invoke(_app(), ["info", "--frames", "8", "--resolution", "512"])
    assert result.exit_code == 0, result.output
    for name in ("T/2", "S/2", "B/2", "XL/2", "G/2"):
        assert name in result.output
    _, temporal = count_parameters(meta_model(model_config("XL/2", temporal=True)))
    assert f"{temporal / 1e6:.0f}M (" in result.output
    assert "3x forward" in result.output


def test_info_bad_input_is_one_clear_message():
    result = CliRunner().invoke(_app(), ["info", "--config", "XXL/3"])
    assert result.exit_code == 2
    assert "unknown model config 'XXL/3'" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(_app(), ["info", "--resolution", "100"])
    assert result.exit_code == 2 and "not a multiple of 16" in result.output
