"""Parameter and FLOP counting on the meta device, and the `gentron info` command."""

from __future__ import annotations

import pytest
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
    per_block = (
        2
        * n
        * (
            3 * d * d
            + d * d  # self-attention qkv + out
            + 2 * n * d  # scores + weighted values
            + d * d
            + d * d  # cross q + out
            + 2 * text * d  # cross scores + values
            + 2 * d * m  # MLP
        )
        + 2 * text * 2 * d * d
    )  # cross k, v from the text tokens
    widths = config["text_inputs"]
    text_projections = 2 * CLIP_LENGTH * (widths["clip"]["dim"] * d + d * d) + 2 * T5_LENGTH * (
        widths["t5"]["dim"] * d + d * d
    )
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
    assert f"{total / 1e6:.1f}M" in result.output  # one decimal, as the docs write it
    assert "3083.8M" in result.output  # the paper's figure beside ours


def test_info_video_shows_temporal_share_and_all_sizes_by_default():
    result = CliRunner().invoke(_app(), ["info", "--frames", "8", "--resolution", "512"])
    assert result.exit_code == 0, result.output
    for name in ("T/2", "S/2", "B/2", "XL/2", "G/2"):
        assert name in result.output
    _, temporal = count_parameters(meta_model(model_config("XL/2", temporal=True)))
    assert f"{temporal / 1e6:.1f}M (" in result.output
    assert "3x forward" in result.output


def test_info_bad_input_is_one_clear_message():
    result = CliRunner().invoke(_app(), ["info", "--config", "XXL/3"])
    assert result.exit_code == 2
    assert "unknown model config 'XXL/3'" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(_app(), ["info", "--resolution", "100"])
    assert result.exit_code == 2 and "not a multiple of 16" in result.output


# --------------------------------------------------------------------------- the numbers README and docs print

import re  # noqa: E402
from pathlib import Path  # noqa: E402

from pipelines.model.configs import MODEL_SIZES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _same(shown: str, value: float) -> bool:
    """`value` written with as many decimals as `shown` has is `shown`."""
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    return f"{value:.{decimals}f}" == shown


@pytest.mark.parametrize("doc", ["README.md", "docs/model.md"])
def test_the_parameter_tables_of_the_docs_are_what_gentron_info_counts(doc):
    rows = 0
    for line in (ROOT / doc).read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\| ((?:T|S|B|L|XL|G)/2)\b", line)
        if not m:
            continue
        size, rows = m.group(1), rows + 1
        t2i, t2v, temporal = re.findall(r"([\d.]+) M\b", line)[:3]
        image = model_cost(model_config(size))
        video = model_cost(model_config(size), frames=2)
        assert (
            _same(t2i, image.params / 1e6)
            and _same(t2v, video.params / 1e6)
            and _same(temporal, video.temporal_params / 1e6)
        ), (
            f"{doc}: {line!r}; gentron info counts {image.params / 1e6:.2f} M, {video.params / 1e6:.2f} M "
            f"({video.temporal_params / 1e6:.2f} M)"
        )
        named = MODEL_SIZES[size]
        cells = [int(n) for n in re.findall(r"\b(\d+)\b", line.split("|", 2)[2])[:3]]
        assert cells == [named.depth, named.hidden_size, named.mlp_dim], line
    assert rows >= 5


def test_the_flop_and_memory_figures_of_the_docs_are_what_gentron_info_computes():
    readme, model_doc = (
        (ROOT / "README.md").read_text(encoding="utf-8"),
        (ROOT / "docs/model.md").read_text(encoding="utf-8"),
    )
    xl, g = model_config("XL/2"), model_config("G/2")
    train_tflop = lambda cfg, **kw: model_cost(cfg, **kw).train_step_flops / 1e12  # noqa: E731
    figures = [
        (readme, r"XL/2 at 256 px ([\d.]+) TFLOP", train_tflop(xl, resolution=256)),
        (readme, r"G/2 at 256 px ([\d.]+) TFLOP", train_tflop(g, resolution=256)),
        (readme, r"8 frames XL/2 ([\d.]+) TFLOP", train_tflop(xl, resolution=512, frames=8)),
        (readme, r"8 frames XL/2 [\d.]+ TFLOP and G/2 ([\d.]+) TFLOP", train_tflop(g, resolution=512, frames=8)),
        (readme, r"XL/2 T2I needs about ([\d.]+) GB", 16 * model_cost(xl).params / 1e9),
        (readme, r"G/2 T2V about ([\d.]+) GB", 16 * model_cost(g, frames=2).params / 1e9),
        (readme, r"\(([\d.]+) GB each on 8\)", 16 * model_cost(g, frames=2).params / 1e9 / 8),
        (model_doc, r"XL/2 at 256 px: ([\d.]+) GFLOPs forward", model_cost(xl, resolution=256).forward_flops / 1e9),
        (
            model_doc,
            r"GFLOPs forward, ([\d.]+) GFLOPs\s+per training step",
            model_cost(xl, resolution=256).train_step_flops / 1e9,
        ),
    ]
    for text, pattern, value in figures:
        m = re.search(pattern, text)
        assert m, pattern
        assert _same(m.group(1), value), f"{pattern}: the docs say {m.group(1)}, gentron info computes {value:.3f}"


def test_gentron_info_prints_the_counts_the_docs_print():
    result = CliRunner().invoke(_app(), ["info", "--config", "B/2", "--frames", "8"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert (
        f"{model_cost(model_config('B/2'), frames=8).params / 1e6:.1f}M" in result.output
    )  # 192.4M, as README's table
