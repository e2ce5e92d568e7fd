"""Text encoders: stored valid tokens equal direct transformers calls; truncation; selection; loading errors."""

import io

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from train_data import sample_fields
from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel
from typer.testing import CliRunner

from gentron_cli.main import app
from pipelines.data import schema
from pipelines.data.shards import ShardWriter, iter_shard, shard_name
from pipelines.errors import GentronError
from pipelines.model.conditioning import TextCondition
from pipelines.model.text_encoders import TextEncoders, parse_encoders, recorded_settings
from pipelines.model.tiny import build_tiny_clip, build_tiny_t5

CAPTIONS = [
    "a cat",
    "A dog running on the beach at sunset, filmed from a drone",
    "ünïcödé 🙂 words the tokenizer never saw",
]


@pytest.fixture(scope="module")
def encoders(tiny_encoders):
    return TextEncoders(
        clip=str(tiny_encoders["clip"]), t5=str(tiny_encoders["t5"]), settings={"t5": {"max_length": 40}}, device="cpu"
    )


def test_tiny_encoders_are_deterministic_per_seed(tmp_path, tiny_encoders):
    for name, build, seed in (("clip", build_tiny_clip, 0), ("t5", build_tiny_t5, 1)):
        same, other = build(tmp_path / f"{name}_same", seed=seed), build(tmp_path / f"{name}_other", seed=seed + 10)
        for file in ("model.safetensors", "config.json"):
            assert (same / file).read_bytes() == (tiny_encoders[name] / file).read_bytes()
        assert (other / "model.safetensors").read_bytes() != (tiny_encoders[name] / "model.safetensors").read_bytes()
    assert (tmp_path / "clip_same" / "tokenizer.json").read_bytes() == (
        tiny_encoders["clip"] / "tokenizer.json"
    ).read_bytes()


def test_clip_tokens_equal_direct_calls_and_padding_is_dropped(tiny_encoders, encoders):
    out = encoders.encode(CAPTIONS)
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoders["clip"])
    model = CLIPTextModel.from_pretrained(tiny_encoders["clip"]).eval()
    with torch.no_grad():
        padded = tokenizer(CAPTIONS, padding="max_length", max_length=77, return_tensors="pt")
        padded_states = model(input_ids=padded.input_ids).last_hidden_state.numpy()
        for i, caption in enumerate(CAPTIONS):
            ids = tokenizer(caption)["input_ids"]
            n = len(ids)
            assert ids[-1] == tokenizer.eos_token_id and n < 77
            clip = out[i]["clip"]
            assert clip.dtype == np.float16 and clip.shape == (n, 32)
            # the valid tokens of the padded batch, exactly
            np.testing.assert_array_equal(clip, padded_states[i, :n].astype(np.float16))
            # and the same as the caption alone, unpadded: padding never leaks into valid tokens
            alone = model(input_ids=torch.tensor([ids])).last_hidden_state[0].numpy()
            np.testing.assert_allclose(clip.astype(np.float32), alone, atol=2e-3, rtol=2e-3)
            # pooler_output is the state at EOS, the last valid token
            np.testing.assert_array_equal(out[i]["clip_pooled"], clip[-1])
    assert padded.attention_mask[0].sum() < 77  # the batch really was padded


def test_t5_tokens_equal_a_run_padded_to_max_length(tiny_encoders, encoders):
    out = encoders.encode(CAPTIONS)
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoders["t5"])
    model = T5EncoderModel.from_pretrained(tiny_encoders["t5"]).eval()
    batch = tokenizer(CAPTIONS, padding="max_length", max_length=40, truncation=True, return_tensors="pt")
    with torch.no_grad():
        states = model(**batch).last_hidden_state.numpy()
    for i, caption in enumerate(CAPTIONS):
        n = int(batch.attention_mask[i].sum())
        assert n == min(40, len(caption.encode("utf-8")) + 1)  # ByT5: one token per byte, plus EOS
        assert out[i]["t5"].shape == (n, 32) and out[i]["t5"].dtype == np.float16
        np.testing.assert_allclose(out[i]["t5"].astype(np.float32), states[i, :n], atol=2e-3, rtol=2e-3)
        assert "clip_pooled" in out[i] and "t5_pooled" not in out[i]


def test_truncation_is_reported_exactly_at_the_limit(encoders):
    at_limit = "x" * 39  # 39 bytes + EOS = 40 T5 tokens: fits
    over = "x" * 40
    very_long = " ".join(["photo"] * 200)
    encoded = encoders.encode_captions([at_limit, over, very_long])
    assert [e.truncated for e in encoded] == [(), ("t5",), ("clip", "t5")]
    assert encoded[1].arrays["t5"].shape[0] == 40
    cut = encoded[2].arrays
    assert cut["clip"].shape[0] == 77 and cut["t5"].shape[0] == 40
    np.testing.assert_array_equal(cut["clip_pooled"], cut["clip"][-1])  # EOS kept at the end of a cut caption


def test_dims_metadata_selection_and_collate(tiny_encoders, encoders):
    assert encoders.text_inputs == {"clip": {"dim": 32, "pooled_dim": 32}, "t5": {"dim": 32}}
    meta = encoders.metadata()
    assert meta["encoders"] == ["clip", "t5"] and meta["clip"]["name"] == str(tiny_encoders["clip"])
    assert (meta["clip"]["max_length"], meta["t5"]["max_length"], meta["t5"]["dim"]) == (77, 40, 32)
    t5_only = TextEncoders(clip=None, t5=str(tiny_encoders["t5"]), settings={"t5": {"max_length": 40}}, device="cpu")
    assert t5_only.text_inputs == {"t5": {"dim": 32}} and set(t5_only.encode(["a"])[0]) == {"t5"}
    np.testing.assert_array_equal(t5_only.encode(CAPTIONS)[1]["t5"], encoders.encode(CAPTIONS)[1]["t5"])
    cond = TextCondition.collate(encoders.encode(CAPTIONS))
    lengths = [len(a["clip"]) for a in encoders.encode(CAPTIONS)]
    assert (
        cond.masks["clip"].sum(1).tolist() == lengths
        and cond.pooled["clip"].shape == (3, 32)
        and not cond.pooled.keys() - {"clip"}
    )
    assert parse_encoders("t5, clip") == ["clip", "t5"] and parse_encoders("clip+t5") == ["clip", "t5"]
    with pytest.raises(GentronError):
        parse_encoders("clip,bert")
    with pytest.raises(GentronError):
        TextEncoders(clip=None, t5=None)


def test_loading_errors_name_the_model(tmp_path, tiny_encoders, monkeypatch):
    with pytest.raises(GentronError) as err:
        TextEncoders(clip=str(tmp_path / "missing_clip"), t5=None)
    assert "missing_clip" in err.value.message and "not found" in err.value.message
    with pytest.raises(GentronError) as err:
        TextEncoders(
            clip=str(tiny_encoders["t5"]), t5=None
        )  # a T5 folder given as CLIP would otherwise load with random weights
    assert "'t5'" in err.value.message and str(tiny_encoders["t5"]) in err.value.message
    with pytest.raises(GentronError) as err:
        TextEncoders(clip="open_clip:ViT-L-14:openai", t5=None)  # open_clip is not installed here (no CPU torchvision)
    assert "open_clip" in err.value.message and "openclip" in err.value.hint
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(GentronError) as err:
        TextEncoders(clip=None, t5="no-such-owner/no-such-t5")
    assert "'no-such-owner/no-such-t5' not found locally and could not be downloaded" in err.value.message


def test_loading_draws_no_weight_bar_and_restores_the_hook(tiny_encoders, capfd):
    """transformers' "Loading weights" tqdm bar would tear the Rich progress display of encode-text."""
    from transformers.utils import logging as hf_logging

    capfd.readouterr()
    TextEncoders(clip=str(tiny_encoders["clip"]), t5=str(tiny_encoders["t5"]), device="cpu")
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err + captured.out
    # the hook is ours only while loading: a direct transformers call still draws its bar
    previous = hf_logging.set_tqdm_hook(None)
    assert previous is None
    T5EncoderModel.from_pretrained(str(tiny_encoders["t5"]))
    assert "Loading weights" in capfd.readouterr().err


def test_weights_stored_as_a_pickle_are_refused_by_name(tmp_path, tiny_encoders):
    """A folder whose weights are a pickle (pytorch_model.bin) can run code when loaded: one message, no load."""
    import shutil

    folder = tmp_path / "pickled-clip"
    shutil.copytree(tiny_encoders["clip"], folder)
    weights = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.bin")
    with pytest.raises(GentronError) as err:
        TextEncoders(clip=str(folder), t5=None, device="cpu")
    assert "pytorch_model.bin" in err.value.message and "pickle" in err.value.message
    assert str(folder) in err.value.message


@pytest.mark.parametrize("layer", [0, 1, -2, -1, 2])
def test_clip_layer_stores_that_hidden_state_through_the_final_norm(tiny_encoders, layer):
    """--clip-layer (CLIP skip): each caption's tokens are final_layer_norm(hidden_states[layer]), computed here on
    the caption alone; the pooled vector stays the last layer's; only a layer other than the last is recorded."""
    clip = TextEncoders(clip=str(tiny_encoders["clip"]), settings={"clip": {"layer": layer}}, device="cpu")
    out = clip.encode(CAPTIONS)
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoders["clip"])
    model = CLIPTextModel.from_pretrained(tiny_encoders["clip"]).eval()
    with torch.no_grad():
        for caption, arrays in zip(CAPTIONS, out):
            run = model(input_ids=torch.tensor([tokenizer(caption)["input_ids"]]), output_hidden_states=True)
            norm = getattr(model, "text_model", model).final_layer_norm
            expected = norm(run.hidden_states[layer])[0].numpy()
            assert arrays["clip"].shape == expected.shape
            np.testing.assert_allclose(arrays["clip"].astype(np.float32), expected, atol=2e-3, rtol=2e-3)
            np.testing.assert_allclose(
                arrays["clip_pooled"].astype(np.float32), run.pooler_output[0].numpy(), atol=2e-3, rtol=2e-3
            )
    meta = clip.metadata()["clip"]
    assert meta == {"name": str(tiny_encoders["clip"]), "max_length": 77, "dim": 32, "pooled_dim": 32} | (
        {} if layer % 3 == 2 else {"layer": layer % 3}
    )
    last = TextEncoders(clip=str(tiny_encoders["clip"]), device="cpu").encode(CAPTIONS[:1])[0]["clip"]
    assert np.array_equal(last, out[0]["clip"]) == (layer % 3 == 2)  # the default is the last layer, as before


def test_clip_layer_is_refused_out_of_range_and_for_open_clip(tiny_encoders):
    with pytest.raises(GentronError, match="--clip-layer 3 is out of range"):
        TextEncoders(clip=str(tiny_encoders["clip"]), settings={"clip": {"layer": 3}}, device="cpu")
    with pytest.raises(GentronError, match="not of open_clip"):  # refused before open_clip is needed
        TextEncoders(clip="open_clip:ViT-L-14:openai", settings={"clip": {"layer": -2}}, device="cpu")


def test_encode_text_clip_layer_is_recorded_and_rebuilt_alike_and_refused_where_clip_does_not_run(
    tmp_path, tiny_encoders
):
    latents = tmp_path / "latents"
    latents.mkdir()
    text_fields = (schema.CLIP_TOKENS, schema.CLIP_POOLED, schema.T5_TOKENS)
    with ShardWriter(latents / f"{shard_name(0)}.tar") as writer:
        for i in range(3):
            writer.write(schema.make_key("image", i), sample_fields(i, "image", drop=text_fields))
    clip, data = str(tiny_encoders["clip"]), tmp_path / "data"
    common = ["encode-text", str(latents), "--clip", clip, "--device", "cpu"]
    refused = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "no"), "--encoders", "t5", "--clip-layer", "0"])
    assert refused.exit_code == 2 and "does not run" in refused.output
    result = CliRunner().invoke(app, [*common, "--out", str(data), "--encoders", "clip", "--clip-layer", "-2"])
    assert result.exit_code == 0, result.output
    last = TextEncoders(clip=clip, device="cpu")
    for _, fields in iter_shard(data / f"{shard_name(0)}.tar"):
        recorded = schema.decode_json(fields[schema.META])["text"]["clip"]
        assert recorded["layer"] == 1
        # the settings sampling rebuilds the encoder with from the record give the stored states again
        again = TextEncoders(clip=clip, settings={"clip": recorded_settings("clip", recorded)}, device="cpu")
        caption = fields[schema.CAPTION].decode()
        stored = np.load(io.BytesIO(fields[schema.text_field("clip")]))
        np.testing.assert_array_equal(stored, again.encode([caption])[0]["clip"])
        assert not np.array_equal(stored, last.encode([caption])[0]["clip"])
