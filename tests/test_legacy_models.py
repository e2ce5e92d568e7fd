"""Model folders exported before text encoders were data still load, with the same output, and sample.

The fixtures (tests/fixtures/legacy_model_v1*/, written by tests/fixtures/make_legacy_model.py with the code
of that time) hold configs with `text_encoders`/`clip_dim`/`t5_dim` and weights `clip_embedder.*`,
`t5_embedder.*`, `pooled_embedder.*`, and the output they gave on fixed inputs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines.model.conditioning import TextCondition
from pipelines.model.gentron import GenTronTransformer, required_text_arrays
from pipelines.model.legacy import upgrade_config
from pipelines.model.tiny import build_tiny_clip, build_tiny_t5
from pipelines.model_folder import PipelineRecord, load_model_folder, read_model_config
from pipelines.sample.pipeline import Generation
from pipelines.sample.sampling import SampleConfig, load_pipeline

FIXTURES = Path(__file__).parent / "fixtures"
# fixture -> (text_inputs after the upgrade, the arrays that model reads)
EXPECTED = {
    "legacy_model_v1": (
        {"clip": {"dim": 32, "pooled_dim": 32, "pooled": True}, "t5": {"dim": 32, "pooled": False}},
        ("clip", "clip_pooled", "t5"),
    ),
    "legacy_model_v1_adaln_t5": ({"t5": {"dim": 32, "pooled": True}}, ("t5",)),
    # adaLN with clip+t5 read CLIP's pooled vector only: it becomes the CLIP-only model it was
    "legacy_model_v1_adaln_clip_t5": ({"clip": {"dim": 32, "pooled_dim": 32, "pooled": True}}, ("clip_pooled",)),
}


def reference(folder: Path) -> tuple[dict[str, torch.Tensor], TextCondition]:
    ref = load_file(str(folder / "reference.safetensors"))
    text = TextCondition(
        tokens={"clip": ref["clip_tokens"], "t5": ref["t5_tokens"]},
        masks={"clip": ref["clip_mask"], "t5": ref["t5_mask"]},
        pooled={"clip": ref["clip_pooled"]},
    )
    return ref, text


def run(model: GenTronTransformer, ref: dict, text: TextCondition) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(
            ref["x"], ref["timestep"], text, motion_free=ref["motion_free"] if ref["x"].ndim == 5 else None
        )


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_legacy_folder_loads_and_gives_the_recorded_output(name, monkeypatch):
    folder = FIXTURES / name
    assert "text_encoders" in read_model_config(folder) and "text_inputs" not in read_model_config(folder)
    # loading executes no code: the weights are safetensors and nothing may unpickle
    monkeypatch.setattr("pickle.loads", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load"))
    ref, text = reference(folder)
    text_inputs, arrays = EXPECTED[name]
    for model in (load_model_folder(folder), GenTronTransformer.from_pretrained(folder)):
        assert model.config.text_inputs == text_inputs
        assert required_text_arrays(model.config) == arrays
        torch.testing.assert_close(run(model, ref, text), ref["output"], rtol=1e-5, atol=1e-6)


def test_legacy_adaln_clip_t5_never_read_t5():
    """Why that fixture upgrades to CLIP only: its recorded output does not move when T5's tokens change."""
    folder = FIXTURES / "legacy_model_v1_adaln_clip_t5"
    ref, text = reference(folder)
    model = load_model_folder(folder)
    other = TextCondition({**text.tokens, "t5": text.tokens["t5"] * -5}, text.masks, text.pooled)
    torch.testing.assert_close(run(model, ref, other), ref["output"], rtol=1e-5, atol=1e-6)


def test_resaved_legacy_model_writes_the_new_config(tmp_path):
    model = load_model_folder(FIXTURES / "legacy_model_v1")
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "text_inputs" in config and not {"text_encoders", "clip_dim", "t5_dim"} & set(config)
    assert any(
        k.startswith("token_embedders.t5.")
        for k in load_file(str(tmp_path / "m" / "diffusion_pytorch_model.safetensors"))
    )
    ref, text = reference(FIXTURES / "legacy_model_v1")
    torch.testing.assert_close(run(load_model_folder(tmp_path / "m"), ref, text), ref["output"], rtol=1e-5, atol=1e-6)


def test_upgrade_config_maps_every_old_combination():
    widths = {"clip_dim": 16, "clip_pooled_dim": 24, "t5_dim": 40}
    cases = {
        ("cross_attention", "clip+t5"): {
            "clip": {"dim": 16, "pooled_dim": 24, "pooled": True},
            "t5": {"dim": 40, "pooled": False},
        },
        ("cross_attention", "clip"): {"clip": {"dim": 16, "pooled_dim": 24, "pooled": True}},
        ("cross_attention", "t5"): {"t5": {"dim": 40, "pooled": True}},
        ("adaln", "clip+t5"): {"clip": {"dim": 16, "pooled_dim": 24, "pooled": True}},
        ("adaln", "t5"): {"t5": {"dim": 40, "pooled": True}},
    }
    for (conditioning, encoders), text_inputs in cases.items():
        upgraded = upgrade_config({"text_conditioning": conditioning, "text_encoders": encoders, **widths})
        assert upgraded == {"text_conditioning": conditioning, "text_inputs": text_inputs}, (conditioning, encoders)


def test_legacy_folder_samples_with_its_recorded_pipeline(tmp_path):
    """pipeline.json of that time ("used": "clip+t5") names the encoders; the empty caption gives the unconditional
    text."""
    run_folder = tmp_path / "model"
    shutil.copytree(FIXTURES / "legacy_model_v1", run_folder)
    record = PipelineRecord.read(run_folder)
    assert record.encoder_names == ["clip", "t5"] and record.text_encoder("t5")["max_length"] == 120
    clip, t5 = build_tiny_clip(tmp_path / "clip", seed=0), build_tiny_t5(tmp_path / "t5", seed=1)
    pipeline = json.loads((run_folder / "pipeline.json").read_text())
    pipeline["text_encoders"]["clip"]["name"], pipeline["text_encoders"]["t5"]["name"] = str(clip), str(t5)
    (run_folder / "pipeline.json").write_text(json.dumps(pipeline))
    pipe = load_pipeline(SampleConfig(model=run_folder, out=tmp_path / "out", device="cpu"))
    assert pipe.text_encoders.encoders == ["clip", "t5"] and pipe.text_encoders.get("t5").max_length == 120
    assert set(pipe.uncond_arrays) == {"clip", "clip_pooled", "t5"}
    generation = Generation(steps=2, scheduler="ddim", cfg_scale=3.0, mfg_scale=1.0, frames=2, height=8, width=8)
    generated = pipe.generate(["a red fox"], [0], generation)
    assert generated.frames.shape == (1, 2, 8, 8, 3)
