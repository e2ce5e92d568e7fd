"""A decoder-only language model as a text encoder: stored states equal a direct transformers call at the
chosen layer, padding is masked, and a T2I model trains and samples with it alone, end to end through the CLI.

The LLM is a tiny random Llama with a fast BPE tokenizer (`build_tiny_llm`), loaded by path through the same
code (AutoModel / AutoTokenizer) as a hub model such as google/gemma-2-2b.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny import TINY_SPEC
from train_data import sample_fields
from transformers import AutoModel, AutoTokenizer
from typer.testing import CliRunner

from gentron_cli.main import app
from pipelines.data import schema
from pipelines.data.shards import ShardWriter, iter_shard, shard_name
from pipelines.errors import GentronError
from pipelines.model.conditioning import TextCondition
from pipelines.model.text_encoders import TextEncoders
from pipelines.model.tiny import TINY_LLM_DIM, build_tiny_llm, build_tiny_t5

CAPTIONS = ["a cat", "a dog running on the beach at sunset, filmed from a drone", "ünïcödé 🙂"]
TEXT_FIELDS = (schema.CLIP_TOKENS, schema.CLIP_POOLED, schema.T5_TOKENS)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return build_tiny_llm(tmp_path_factory.mktemp("llm") / "llm", seed=3)


def direct_states(folder, caption: str, layer: int) -> np.ndarray:
    """hidden_states[layer] of the caption alone (no padding at all), computed here independently of the encoder."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    ids = tokenizer(caption, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[layer][0].numpy()


@pytest.mark.parametrize("layer", [-1, -2, 0, 1])
def test_stored_states_equal_the_chosen_layer_at_the_valid_tokens(llm, layer):
    encoders = TextEncoders(llm=str(llm), settings={"llm": {"layer": layer}}, device="cpu")
    out = encoders.encode(CAPTIONS)  # one batch: the short captions are padded to the longest
    for caption, arrays in zip(CAPTIONS, out):
        assert set(arrays) == {"llm"}  # no pooled vector of its own: a model pools it by its token mean
        expected = direct_states(llm, caption, layer)
        assert arrays["llm"].dtype == np.float16 and arrays["llm"].shape == expected.shape  # valid tokens only
        np.testing.assert_allclose(arrays["llm"].astype(np.float32), expected, atol=2e-3, rtol=2e-3)
    # the layers differ (so the setting is honoured), and the record says which one, counted from 0
    meta = encoders.metadata()["llm"]
    assert meta == {"name": str(llm), "max_length": 64, "dim": TINY_LLM_DIM, "layer": layer % 3}
    if layer == -2:
        last = TextEncoders(llm=str(llm), device="cpu").encode(CAPTIONS[:1])[0]["llm"]
        assert not np.allclose(last, out[0]["llm"])


def test_padding_is_right_and_masked_and_long_captions_are_cut(llm):
    encoders = TextEncoders(llm=str(llm), settings={"llm": {"max_length": 6}}, device="cpu")
    tokenizer = encoders.get("llm").tokenizer
    assert (
        tokenizer.padding_side == "right" and tokenizer.pad_token == tokenizer.eos_token
    )  # Llama's tokenizer has no pad token
    encoded = encoders.encode_captions(CAPTIONS)
    short, cut = encoded[0], encoded[1]
    assert short.truncated == () and cut.truncated == ("llm",) and len(cut.arrays["llm"]) == 6
    np.testing.assert_allclose(
        cut.arrays["llm"].astype(np.float32), direct_states(llm, CAPTIONS[1], -1)[:6], atol=2e-3, rtol=2e-3
    )
    # collated, the padding is masked: the mask counts exactly the stored tokens
    cond = TextCondition.collate([e.arrays for e in encoded], lengths={"llm": 8})
    assert cond.masks["llm"].sum(1).tolist() == [len(e.arrays["llm"]) for e in encoded]
    assert (cond.tokens["llm"][~cond.masks["llm"]] == 0).all()


def test_a_tokenizer_without_bos_still_encodes_the_empty_caption(tmp_path):
    """Qwen2's tokenizer adds no BOS: "" tokenizes to nothing. The empty caption (the unconditional text of guidance)
    and any caption that tokenizes to nothing are read as their EOS token alone; other captions are unchanged."""
    folder = build_tiny_llm(tmp_path / "qwen-like", seed=4, add_bos=False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer("")["input_ids"] == [] and tokenizer.bos_token_id not in tokenizer("a red fox")["input_ids"]
    encoders = TextEncoders(llm=str(folder), device="cpu")
    empty, caption = encoders.encode(["", CAPTIONS[0]])
    model = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        eos = model(input_ids=torch.tensor([[tokenizer.eos_token_id]]), output_hidden_states=True).hidden_states[-1]
    assert empty["llm"].shape == (1, TINY_LLM_DIM)
    np.testing.assert_allclose(empty["llm"].astype(np.float32), eos[0].numpy(), atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(
        caption["llm"].astype(np.float32), direct_states(folder, CAPTIONS[0], -1), atol=2e-3, rtol=2e-3
    )


def test_refuses_what_is_not_a_decoder_only_model(tmp_path, llm):
    with pytest.raises(GentronError, match="not a decoder-only language model"):
        TextEncoders(llm=str(build_tiny_t5(tmp_path / "t5")), device="cpu")
    with pytest.raises(GentronError, match="out of range"):
        TextEncoders(llm=str(llm), settings={"llm": {"layer": 7}}, device="cpu")


def run_cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "1000"})
    result.text = " ".join(result.output.split())
    return result


def test_t2i_trains_and_samples_with_the_llm_alone(tmp_path, llm):
    """encode-text --llm, then train and sample with no further flags: the model reads the LLM's states only."""
    latents = tmp_path / "latents"
    latents.mkdir()
    with ShardWriter(latents / f"{shard_name(0)}.tar") as writer:
        for i in range(4):
            writer.write(schema.make_key("image", i), sample_fields(i, "image", drop=TEXT_FIELDS))
    data = tmp_path / "data"
    assert (
        run_cli("encode-text", latents, "--out", data, "--encoders", "clip", "--llm", llm).exit_code == 2
    )  # --llm left out: refused
    result = run_cli(
        "encode-text", latents, "-o", data, "--encoders", "llm", "--llm", llm, "--llm-layer", -2, "--device", "cpu"
    )
    assert result.exit_code == 0, result.output
    for _, fields in iter_shard(data / f"{shard_name(0)}.tar"):
        assert schema.text_field("llm") in fields and not set(TEXT_FIELDS) & set(fields)
        assert schema.decode_json(fields[schema.META])["text"]["llm"]["layer"] == 1
    with np.load(data / schema.EMPTY_CAPTION_FILE) as empty:
        assert empty.files == ["llm"] and empty["llm"].shape == (1, TINY_LLM_DIM)  # the empty caption is BOS alone

    run = tmp_path / "run"
    result = run_cli(
        "train",
        "--stage",
        "t2i",
        "--image-data",
        data,
        "--out",
        run,
        "--model",
        TINY_SPEC,
        "--steps",
        2,
        "--global-batch",
        2,
        "--lr",
        3e-3,
        "--num-workers",
        0,
        "--checkpoint-every",
        2,
        "--preview-every",
        0,
    )
    assert result.exit_code == 0, result.output
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["text_inputs"] == {
        "llm": {"dim": TINY_LLM_DIM, "pooled": True}
    }  # its width from the data; pooled by its token mean
    pipeline = json.loads((run / "model" / "pipeline.json").read_text())
    assert pipeline["text_encoders"]["used"] == ["llm"] and pipeline["text_encoders"]["llm"]["layer"] == 1

    from pipelines.sample.pipeline import Generation
    from pipelines.sample.sampling import SampleConfig, load_pipeline

    # the raw weights (the EMA ones are still the initial ones after two steps, whose zero final layer ignores the text)
    pipe = load_pipeline(SampleConfig(model=run / "model_raw", out=tmp_path / "unused", device="cpu"))
    assert pipe.text_encoders.encoders == ["llm"] and pipe.text_encoders.get("llm").layer == 1  # rebuilt as recorded
    np.testing.assert_array_equal(pipe.uncond_arrays["llm"], np.load(data / schema.EMPTY_CAPTION_FILE)["llm"])
    a, b = (
        pipe.generate([p], [0], Generation(2, "ddim", 4.0, 1.0, 1, 8, 8)).latents
        for p in ("image number 1", "a very different prompt")
    )
    assert (a - b).abs().max() > 1e-6  # the prompt reaches the model through the LLM
    out = tmp_path / "samples"
    result = run_cli(
        "sample", "--model", run, "--prompt", "image number 1", "--out", out, "--steps", 2, "--device", "cpu"
    )
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("0000_*.png"))) == 1
