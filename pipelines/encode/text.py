"""`gentron encode-text`: captions -> the token states (and pooled vectors) of the chosen text encoders.

Each input shard gives an output shard of the same name with the same samples in order, every field
byte-identical, plus the arrays of each encoder, named after it (`clip.npy`, `clip_pooled.npy`,
`t5.npy`, ...: float16, valid tokens only) and a "text" section in the json. The empty caption's embeddings (for
classifier-free guidance dropout) are
written once per output folder to `empty_caption.npz`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines.data import schema
from pipelines.data.runner import ResumeOptions, ShardJob, StageResult, run_shard_jobs, start_shard_stage
from pipelines.data.shards import ShardStats, ShardWriter, iter_shard
from pipelines.errors import BadSample, GentronError
from pipelines.files import atomic_write_bytes
from pipelines.model.text_encoders import (
    DEFAULT_CLIP,
    DEFAULT_ENCODERS,
    DEFAULT_T5,
    DEFAULT_T5_MAX_LENGTH,
    ENCODERS,
    TextEncoders,
    absolute_model_spec,
    parse_encoders,
)
from pipelines.progress import NullReporter, Reporter


@dataclass
class EncodeTextConfig:
    input_dir: Path
    output_dir: Path
    clip: str = DEFAULT_CLIP  # transformers CLIP (hub name / folder) or "open_clip:ARCH:PRETRAINED"
    t5: str = DEFAULT_T5
    encoders: str | None = (
        None  # which to run, e.g. "clip,t5" or "t5"; default: clip and t5, plus every encoder given in `models`
    )
    t5_max_length: int = DEFAULT_T5_MAX_LENGTH
    models: dict[str, str] = field(
        default_factory=dict
    )  # encoder name -> model, e.g. {"t5": "google/t5-v1_1-xxl"}; wins over clip/t5
    settings: dict[str, dict] = field(
        default_factory=dict
    )  # encoder name -> settings, e.g. {"t5": {"max_length": 300}}; wins over t5_max_length
    batch_size: int = 64  # captions per encoder call
    device: str | None = None  # auto: cuda:LOCAL_RANK when available, else cpu
    dtype: str | None = None  # auto: bf16 on GPU, fp32 on CPU
    rank: int | None = None  # default: torchrun's / SLURM's environment
    world_size: int | None = None
    verify: bool = False  # also check the sha256 of finished output shards (redo damaged ones)


def selected_encoders(cfg: EncodeTextConfig) -> dict[str, str]:
    """The encoders to run, name -> model: --encoders, else clip and t5 plus every other encoder given a model."""
    models = {"clip": cfg.clip, "t5": cfg.t5} | {k: v for k, v in cfg.models.items() if v}
    chosen = {k for k, v in cfg.models.items() if v}
    names = (
        parse_encoders(cfg.encoders) if cfg.encoders else [n for n in ENCODERS if n in DEFAULT_ENCODERS or n in chosen]
    )
    left_out = sorted(chosen - set(names))
    if left_out:
        raise GentronError(
            f"a model is given for {', '.join(left_out)} but --encoders {cfg.encoders} leaves it out",
            f"add it: --encoders {','.join([*names, *left_out])}, or drop --{left_out[0]}",
        )
    for name in names:
        if not models.get(name) and ENCODERS[name].default is None:
            raise GentronError(
                f"the {name} encoder has no default model", f"pass --{name} NAME_OR_PATH (hub name or local folder)"
            )
    # a local folder as an absolute path: sampling reads the encoders from the shards' record
    return {name: absolute_model_spec(models.get(name) or ENCODERS[name].default) for name in names}


def load_text_encoders(cfg: EncodeTextConfig) -> TextEncoders:
    models = selected_encoders(cfg)
    idle = sorted(set(cfg.settings) - set(models))
    if idle:
        raise GentronError(
            f"settings are given for the {', '.join(idle)} encoder, which does not run ({', '.join(models)} do)",
            f"add it to --encoders, or drop its options ({', '.join(f'--{n}-...' for n in idle)})",
        )
    settings = {"t5": {"max_length": cfg.t5_max_length}}
    settings |= {name: settings.get(name, {}) | dict(values) for name, values in cfg.settings.items()}
    return TextEncoders(
        models, settings={n: v for n, v in settings.items() if n in models}, device=cfg.device, dtype=cfg.dtype
    )


def _check_finite(arrays: dict[str, np.ndarray]) -> None:
    if not all(np.isfinite(a).all() for a in arrays.values()):
        raise BadSample(
            "non_finite_embedding", "the encoder gave inf/nan (in float16); run the encoders in --dtype bf16 or fp32"
        )


def write_empty_caption(encoders: TextEncoders, output_dir: Path) -> Path:
    """The empty caption's arrays, once per folder (atomic). An existing file must match these encoders."""
    path = Path(output_dir) / schema.EMPTY_CAPTION_FILE
    arrays = encoders.encode([""])[0]
    if path.exists():
        with np.load(path, allow_pickle=False) as existing:
            found = {name: existing[name].shape for name in existing.files}
        if found != {name: a.shape for name, a in arrays.items()}:
            raise GentronError(
                f"{path} was written by other text encoders ({found})",
                "use the encoders of the first run for this folder, or write to a new output folder",
            )
        return path
    _check_finite(arrays)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _count_skipped(stats: ShardStats, key: str, bad: BadSample, tick) -> None:
    stats.samples_in += 1
    stats.fail(key, bad)
    tick(1)


@dataclass
class _Caption:
    key: str
    fields: dict[str, bytes]
    meta: dict
    text: str


class TextShardEncoder:
    """The per-shard function of the stage (a ShardFn), holding the encoders loaded once for the process."""

    def __init__(self, encoders: TextEncoders, batch_size: int):
        self.encoders, self.batch_size = encoders, batch_size
        self.text_meta = encoders.metadata()

    def __call__(self, job: ShardJob, writer: ShardWriter, stats: ShardStats, tick) -> None:
        batch: list[_Caption] = []
        try:
            for key, fields in iter_shard(job.payload, on_skip=lambda k, bad: _count_skipped(stats, k, bad, tick)):
                stats.samples_in += 1
                try:
                    batch.append(self._read(key, fields))
                except BadSample as bad:
                    stats.fail(key, bad)
                    tick(1)
                    continue
                if len(batch) == self.batch_size:
                    self._encode_batch(batch, writer, stats, tick)
                    batch = []
        except BadSample as bad:  # the tar itself is damaged: what was read before is kept
            stats.fail(Path(job.payload).name, bad)
        if batch:
            self._encode_batch(batch, writer, stats, tick)

    @staticmethod
    def _read(key: str, fields: dict[str, bytes]) -> _Caption:
        if schema.CAPTION not in fields:
            raise BadSample("no_caption", f"no {schema.CAPTION} field")
        text = schema.decode_caption(fields[schema.CAPTION])
        if not text:
            raise BadSample("empty_caption", "the caption is empty or only whitespace")
        meta = schema.decode_json(fields[schema.META]) if schema.META in fields else {}
        return _Caption(key, fields, meta, text)

    def _encode_batch(self, batch: list[_Caption], writer: ShardWriter, stats: ShardStats, tick) -> None:
        for item, encoded in zip(batch, self.encoders.encode_captions([item.text for item in batch])):
            try:
                _check_finite(encoded.arrays)
            except BadSample as bad:
                stats.fail(item.key, bad)
                tick(1)
                continue
            for name in encoded.truncated:
                stats.count(f"truncated_{name}")
            tokens = {name: len(encoded.arrays[name]) for name in self.encoders.encoders}
            text_meta = self.text_meta | {"tokens": tokens, "truncated": list(encoded.truncated)}
            out = dict(item.fields) | {
                schema.text_field(name): schema.encode_npy(a) for name, a in encoded.arrays.items()
            }
            out[schema.META] = schema.encode_json(item.meta | {"text": text_meta})
            writer.write(item.key, out)
            tick(1)


RESUME = ResumeOptions(
    "_encode_text.json",
    must_match=("input_dir", "clip", "t5", "encoders", "t5_max_length", "models", "settings", "dtype"),
    may_differ=("output_dir", "batch_size", "device", "rank", "world_size", "verify"),
    paths=("input_dir",),
)


def encode_text(
    cfg: EncodeTextConfig, reporter: Reporter = NullReporter(), encoders: TextEncoders | None = None
) -> StageResult:
    """Encode every pending input shard's captions; finished shards are skipped (resume). `encoders`: already loaded
    ones."""
    jobs = start_shard_stage(cfg, RESUME, batch_hint=64)
    if encoders is None:
        encoders = load_text_encoders(cfg)
        names = ", ".join(f"{n} {encoders.names[n]}" for n in encoders.encoders)
        reporter.log(f"text encoders: {names} on {encoders.device} ({encoders.dtype})")
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    write_empty_caption(encoders, Path(cfg.output_dir))
    return run_shard_jobs(
        jobs,
        cfg.output_dir,
        TextShardEncoder(encoders, cfg.batch_size),
        rank=cfg.rank,
        world_size=cfg.world_size,
        description="encode-text",
        unit="samples",
        reporter=reporter,
        verify=cfg.verify,
    )
