"""Training previews: fixed prompts sampled from fixed seeds at checkpoint steps, as `gentron sample` samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines.data import schema
from pipelines.data.loader import TrainStream
from pipelines.diffusion.objective import Objective
from pipelines.files import atomic_write_text
from pipelines.model.text_encoders import resolve_dtype
from pipelines.model.vae import load_vae
from pipelines.model_folder import PipelineRecord
from pipelines.sample.outputs import write_sheet
from pipelines.sample.pipeline import Generation, SamplingPipeline
from pipelines.sample.sampling import default_mfg_scale, sample_seed
from pipelines.train import checkpoint as ckpt
from pipelines.train.config import TrainConfig


class Previewer:
    """Fixed preview prompts (the first samples' captions and stored embeddings) and seeds, sampled as `gentron sample`
    samples them (pipelines.sample.sampling.SamplingPipeline.generate_encoded: the objective's own sampler, its default
    guidance, the VAE named in the shard metadata, loaded on first use). Each prompt is sampled at the size of its
    sample's bucket, stated in prompts.txt."""

    def __init__(
        self,
        stream: TrainStream,
        empty: dict,
        record: PipelineRecord,
        config: TrainConfig,
        run_dir: Path,
        objective: Objective,
    ):
        primary = (
            stream.videos if config.stage == "t2v" and stream.videos is not None else (stream.images or stream.videos)
        )
        refs = primary.refs[: config.preview_count]
        self.arrays = [
            {
                schema.text_array_name(n): schema.decode_npy(stream.read_field(primary, r, n))
                for n in stream.spec.text_fields
            }
            for r in refs
        ]
        self.captions = [
            stream.read_field(primary, r, schema.CAPTION).decode("utf-8", "replace")
            if schema.CAPTION in r.fields
            else r.key
            for r in refs
        ]
        self.empty = {schema.text_array_name(n): empty[schema.text_array_name(n)] for n in stream.spec.text_fields}
        shapes = {tuple(b.shape) for b in stream.plan.buckets}

        def bucket_of(ref) -> tuple[int, ...]:  # the sample's own bucket, else (merged, dropped) the main one
            shape = tuple(ref.shape[1:]) if config.stage == "t2i" and len(ref.shape) == 4 else tuple(ref.shape)
            if config.stage == "t2v" and len(shape) == 3:  # a still: the clip bucket of its size with most frames
                shape = max((s for s in shapes if s[1:] == shape), default=shape)
            return shape if shape in shapes else tuple(stream.latent_shape)

        self.shapes = [bucket_of(r) for r in refs]
        self.record, self.config, self.folder, self.objective = record, config, run_dir / "previews", objective
        # padded as sampling pads: to the encoders' recorded lengths (or the longest text, where none is recorded)
        self.text_lengths = {
            k: max(
                [int(record.text_encoder(k).get("max_length") or 0)]
                + [a[k].shape[0] for a in self.arrays + [self.empty]]
            )
            for k in record.text_encoders["used"]
            if k in self.empty
        }
        self.pipe = None

    def sampling_pipeline(self, model):
        """The SamplingPipeline around `model` (its VAE loaded once)."""

        model.eval().requires_grad_(False)
        if self.pipe is None:
            device = next(model.parameters()).device
            dtype = resolve_dtype("auto", device)
            vae = load_vae(self.record.vae.name, device=device, dtype=dtype)
            self.pipe = SamplingPipeline(
                model, vae, self.objective.config, self.empty, self.text_lengths, device, dtype
            )
        self.pipe.model = model
        return self.pipe

    def render(self, model, step: int) -> list[Path]:
        """Sample the fixed prompts from their fixed seeds and write them (a contact sheet; videos also as a GIF)."""

        pipe = self.sampling_pipeline(model)
        outputs: list = [None] * len(self.arrays)
        sizes = []
        for shape in sorted(set(self.shapes)):  # one batch per size
            which = [k for k, s in enumerate(self.shapes) if s == shape]
            # pixel frames: what the latent frames decode to
            frames = self.record.vae.frames.decoded_frames(shape[0]) if len(shape) == 4 else 1
            height, width = (side * pipe.vae.downsample for side in shape[-2:])
            generation = Generation(
                steps=self.config.preview_steps,
                scheduler=None,
                cfg_scale=self.config.preview_cfg,
                mfg_scale=default_mfg_scale(frames),
                frames=frames,
                height=height,
                width=width,
            )
            seeds = [sample_seed(self.config.seed, k) for k in which]
            generated = pipe.generate_encoded([self.arrays[k] for k in which], seeds, generation)
            for k, pixels in zip(which, generated.frames):
                outputs[k] = pixels
            sizes += [(k, f"{width}x{height}" + (f", {frames} frames" if frames > 1 else "")) for k in which]
        size_of = dict(sizes)
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            self.folder / "prompts.txt", "".join(f"{k} ({size_of[k]}): {c}\n" for k, c in enumerate(self.captions))
        )
        samples = np.stack(outputs) if len(set(self.shapes)) == 1 else outputs
        return write_sheet(self.folder / ckpt.step_dir_name(step), samples, fps=self.record.fps)
