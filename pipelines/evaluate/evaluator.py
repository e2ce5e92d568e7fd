"""`gentron eval`: CLIP score, temporal consistency, FID and the toy probe of generated samples.

Read top to bottom: the samples folder `gentron sample` writes (`list_samples`), then one section per metric,
then `evaluate`, the command's library function. Each metric takes pixels and prompts, not a folder, so
training can score the samples it holds in memory: a sample is a uint8 RGB array, (H, W, 3) for an image
or (T, H, W, 3) for a video.

- CLIP score (`ClipScorer`, `clip_scores`): 100 x max(cos(image embedding, prompt embedding), 0), the
  torchmetrics definition, through a transformers CLIPModel + CLIPProcessor; a video scores the mean over
  its frames, and its temporal consistency is the mean cosine similarity of consecutive frames' image
  embeddings (in the spirit of VBench's subject consistency, with CLIP features).
- FID (`inception_features`, `FeatureMoments`, `frechet_distance`): the Fréchet distance between Gaussians
  fitted to the FID Inception-v3 pool features (`pipelines.model.fid_inception`) of the samples' frames
  and of reference images (an image folder, prep-images / prep-videos shards, or cached `.npz` statistics).
- The toy probe (`pipelines.evaluate.probe`), for samples of toy captions.
- Given frames (`--given`, videos sampled with `gentron sample --image / --video / --last-image`): PSNR and SSIM
  of each video's first given frame, and their means over all its given frames, against the prepared frames its
  sidecar names (`pipelines.evaluate.fidelity`); with a CLIP model also the CLIP image similarity of the first
  given frame to each generated frame (the mean cosine of their image embeddings), in the spirit of VBench's I2V
  subject consistency.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.data import schema
from pipelines.data.inputs import IMAGE_EXTENSIONS
from pipelines.data.media import decode_clip, decode_image
from pipelines.data.shards import iter_shard, list_shards
from pipelines.errors import BadSample, GentronError, require, require_dir
from pipelines.evaluate.fidelity import given_fidelity
from pipelines.evaluate.metrics import MetricOptions
from pipelines.evaluate.probe import ProbeTally, parse_caption, probe_sample
from pipelines.files import atomic_write_bytes, atomic_write_json, file_sha256
from pipelines.model.fid_inception import FIDInceptionV3, load_fid_inception
from pipelines.model.text_encoders import load_pretrained, resolve_device
from pipelines.progress import NullReporter, Reporter
from pipelines.sample import outputs

METRICS_FILE = "metrics.json"
METRICS_VERSION = 1
GRID_STEM = "grid"  # `gentron sample --grid`'s contact sheet: no sidecar, not a sample
STRIP_SUFFIX = ".frames.png"
SAMPLES_HINT = "pass a folder written by `gentron sample` (an output and a .json sidecar per prompt)"
REFERENCE_HINT = "pass an image folder, a folder of prep-images shards, or an .npz from --save-reference"


# --------------------------------------------------------------------------- the samples folder


@dataclass
class SampleFile:
    """One output of `gentron sample`: its name (the file stem), prompt, sidecar, and the file holding its exact
    pixels."""

    name: str
    prompt: str
    sidecar: Path
    pixels_path: Path  # the .png of an image, the lossless .frames.png film strip of a video
    frames: int  # 1 for an image
    given: dict | None = None  # the sidecar's record of the frames a video was given (gentron sample --image ...)
    given_path: Path | None = None  # the lossless strip of those frames

    def read_pixels(self) -> np.ndarray:
        """(H, W, 3) for an image, (T, H, W, 3) for a video; uint8 RGB."""
        try:
            if self.frames == 1:
                with Image.open(self.pixels_path) as im:
                    return np.asarray(im.convert("RGB"))
            return outputs.read_frame_strip(self.pixels_path, self.frames)
        except (OSError, ValueError) as exc:  # einops raises a ValueError subclass for a strip of the wrong width
            raise GentronError(
                f"cannot read sample {self.pixels_path} ({self.frames} frames, as {self.sidecar.name} says): {exc}",
                "regenerate the sample with `gentron sample`, or remove it and its sidecar",
            ) from None

    def read_given(self) -> np.ndarray:
        """(G, H, W, 3): the prepared frames the video was given, in the order of `given["frames"]`."""
        try:
            return outputs.read_frame_strip(self.given_path, len(self.given["frames"]))
        except (OSError, ValueError) as exc:
            raise GentronError(
                f"cannot read the given frames {self.given_path} (named in {self.sidecar.name}): {exc}",
                "regenerate the sample with `gentron sample`",
            ) from None


def _media_stem(name: str) -> str:
    return name[: -len(STRIP_SUFFIX)] if name.endswith(STRIP_SUFFIX) else name.rsplit(".", 1)[0]


def _read_sidecar(path: Path, has_media: bool) -> dict | None:
    """The sidecar record, or None for a JSON file that is not a sidecar and has no sample beside it (metrics.json)."""
    try:
        return outputs.read_sidecar(path)
    except GentronError as err:
        if not has_media:
            return None
        raise GentronError(err.message, "regenerate the sample with `gentron sample`") from None


def _sample_from_sidecar(folder: Path, path: Path, record: dict) -> SampleFile:
    """The sample a sidecar describes: a video's pixels are its .frames.png strip, an image's its .png."""
    files = [str(f) for f in record["files"]]
    strip = next((f for f in files if f.endswith(STRIP_SUFFIX)), None)
    hint = "regenerate the sample with `gentron sample`, or remove it and its sidecar"
    if strip is not None:
        try:
            frames = int(record["settings"]["frames"])
        except (KeyError, TypeError, ValueError):
            raise GentronError(f"{path} lists a video but not its number of frames (settings.frames)", hint) from None
        pixels = strip
    else:
        frames = 1
        pixels = next((f for f in files if f.endswith(".png")), None)
        if pixels is None:
            raise GentronError(
                f"{path} lists neither a .png image nor a {STRIP_SUFFIX} film strip (files: {files})", hint
            )
    if not (folder / pixels).is_file():
        raise GentronError(f"sample file {folder / pixels} (listed in {path.name}) not found", hint)
    given = record.get("given")
    if given is not None:
        if not isinstance(given, dict) or not isinstance(given.get("file"), str) or not given.get("frames"):
            raise GentronError(f"{path} has a malformed record of its given frames ({given!r})", hint)
        if not (folder / given["file"]).is_file():
            raise GentronError(f"given frames {folder / given['file']} (named in {path.name}) not found", hint)
    given_path = folder / given["file"] if given is not None else None
    return SampleFile(path.stem, record["prompt"], path, folder / pixels, frames, given, given_path)


def list_samples(folder: str | Path, skip: Iterable[Path] = ()) -> list[SampleFile]:
    """The samples of a `gentron sample` folder, in file-name (prompt index) order, each read from its sidecar.

    Refuses an empty folder and an output with no sidecar listing it (the contact sheet `grid.*` aside);
    JSON files that are not sidecars and have no output beside them (metrics.json) are ignored, as is `skip`."""
    folder = require_dir(folder, "samples folder", SAMPLES_HINT)
    skip = {Path(p).resolve() for p in skip}
    media = [p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in outputs.MEDIA_SUFFIXES]
    stems = {_media_stem(p.name) for p in media}
    samples, listed = [], set()
    for path in sorted(folder.glob("*.json")):
        if path.resolve() in skip:
            continue
        record = _read_sidecar(path, has_media=path.stem in stems)
        if record is None:
            continue
        samples.append(_sample_from_sidecar(folder, path, record))
        listed.update(str(f) for f in record["files"])
        if samples[-1].given is not None:  # the strip of the frames a video was given
            listed.add(samples[-1].given["file"])
    orphans = [p for p in media if p.name not in listed and _media_stem(p.name) != GRID_STEM]
    if orphans:
        raise GentronError(
            f"sample without a sidecar: {orphans[0]}" + (f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else ""),
            "evaluate a folder written by `gentron sample` (it writes NAME.json beside each output), "
            "or move files without one out of the folder",
        )
    if not samples:
        raise GentronError(f"no samples in {folder}: it holds no sidecar (.json) of `gentron sample`", SAMPLES_HINT)
    return samples


def frames_of(sample: np.ndarray) -> np.ndarray:
    """(T, H, W, 3): a video's frames, or an image as one frame."""
    return sample if sample.ndim == 4 else sample[None]


# --------------------------------------------------------------------------- CLIP score and temporal consistency


class ClipScorer:
    """Unit-length CLIP image and text embeddings from a transformers CLIPModel + CLIPProcessor (hub name or folder)."""

    def __init__(self, spec: str, device: str | torch.device | None = None, batch_size: int = 32):
        from transformers import AutoConfig, CLIPModel, CLIPProcessor

        config = load_pretrained(AutoConfig.from_pretrained, spec, "CLIP model")
        if config.model_type != "clip":  # a text-only or other model would load with random towers
            raise GentronError(
                f"{spec} holds a {config.model_type!r} model, not a CLIP model with text and image towers",
                "pass a transformers CLIPModel such as openai/clip-vit-large-patch14",
            )
        self.spec = spec
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.batch_size = batch_size
        self.model = load_pretrained(CLIPModel.from_pretrained, spec, "CLIP model", dtype=torch.float32)
        self.model.to(self.device).eval().requires_grad_(False)
        processor = load_pretrained(CLIPProcessor.from_pretrained, spec, "CLIP processor")
        self.image_processor, self.tokenizer = processor.image_processor, processor.tokenizer
        self.max_length = (
            self.model.config.text_config.max_position_embeddings
        )  # longer prompts are cut, as torchmetrics does

    @torch.no_grad()
    def image_embeddings(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        """(N, D) float32 on the CPU, unit length, for N (H, W, 3) uint8 frames."""
        out = []
        for start in range(0, len(frames), self.batch_size):
            images = [Image.fromarray(np.ascontiguousarray(f)) for f in frames[start : start + self.batch_size]]
            pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            out.append(self.model.visual_projection(pooled).float().cpu())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """(N, D) float32 on the CPU, unit length."""
        out = []
        for start in range(0, len(prompts), self.batch_size):
            batch = self.tokenizer(
                list(prompts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            pooled = self.model.text_model(
                input_ids=batch["input_ids"].to(self.device), attention_mask=batch["attention_mask"].to(self.device)
            ).pooler_output
            out.append(self.model.text_projection(pooled).float().cpu())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)


def clip_score_of(image_embeddings: torch.Tensor, text_embedding: torch.Tensor) -> torch.Tensor:
    """100 x max(cos, 0) of each unit-length image embedding (N, D) with one unit-length text embedding (D,)."""
    return 100 * (image_embeddings @ text_embedding).clamp(min=0)


def consecutive_similarity(frame_embeddings: torch.Tensor) -> float | None:
    """Mean cosine similarity of consecutive frames' unit-length embeddings (T, D); None for a single frame."""
    if len(frame_embeddings) < 2:
        return None
    return float((frame_embeddings[1:] * frame_embeddings[:-1]).sum(dim=-1).mean())


@dataclass
class SampleClipScore:
    clip_score: float  # an image's score, or the mean of a video's frames' scores
    temporal_consistency: float | None  # videos only


def clip_scores(scorer: ClipScorer, samples: Sequence[np.ndarray], prompts: Sequence[str]) -> list[SampleClipScore]:
    """The CLIP score of each sample with its prompt (and, for videos, temporal consistency)."""
    if len(samples) != len(prompts):
        raise ValueError(f"{len(samples)} samples but {len(prompts)} prompts")
    frames = [frames_of(s) for s in samples]
    images = scorer.image_embeddings([f for video in frames for f in video])
    unique = list(dict.fromkeys(prompts))
    texts = dict(zip(unique, scorer.text_embeddings(unique)))
    scores, start = [], 0
    for video, prompt in zip(frames, prompts):
        embeddings = images[start : start + len(video)]
        start += len(video)
        scores.append(
            SampleClipScore(float(clip_score_of(embeddings, texts[prompt]).mean()), consecutive_similarity(embeddings))
        )
    return scores


def summarize_clip_scores(scores: Sequence[SampleClipScore]) -> dict:
    """Means over samples: {"score", "samples", "temporal_consistency" (None without videos), "videos"}."""
    consistency = [s.temporal_consistency for s in scores if s.temporal_consistency is not None]
    return {
        "score": float(np.mean([s.clip_score for s in scores])) if scores else None,
        "samples": len(scores),
        "temporal_consistency": float(np.mean(consistency)) if consistency else None,
        "videos": len(consistency),
    }


# --------------------------------------------------------------------------- FID


@dataclass
class GaussianStats:
    """A Gaussian fitted to features: mean (D,), covariance (D, D), float64; what an FID `.npz` stores."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int | None = None  # how many feature vectors (unknown for some published .npz files)
    inception_sha256: str | None = None  # the network that made the features, when known


class FeatureMoments:
    """Running sums of features and of their outer products in float64, so any number of images streams through."""

    def __init__(self, dim: int):
        self.count = 0
        self.total = np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64)

    def add(self, features: np.ndarray) -> None:
        features = np.asarray(features, np.float64)
        self.count += len(features)
        self.total += features.sum(axis=0)
        self.outer += features.T @ features

    def stats(self, inception_sha256: str | None = None) -> GaussianStats:
        """Mean and unbiased covariance (as numpy.cov, pytorch-fid and torch-fidelity compute it)."""
        if self.count < 2:
            raise GentronError(
                f"FID needs at least 2 images, got {self.count}",
                "evaluate more samples (FID is usually computed on 10 000 to 50 000)",
            )
        mu = self.total / self.count
        sigma = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return GaussianStats(mu, (sigma + sigma.T) / 2, self.count, inception_sha256)


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr(sqrtm(sigma1 @ sigma2)) for covariance matrices, by two symmetric eigendecompositions.

    sigma1 @ sigma2 is similar to M = sqrt(sigma1) @ sigma2 @ sqrt(sigma1), which is symmetric positive
    semi-definite, so the eigenvalues of sqrtm(sigma1 @ sigma2) are the square roots of M's, real and
    non-negative; this holds for the singular covariances of fewer images than features, where
    scipy.linalg.sqrtm needs pytorch-fid's offset."""
    w, v = np.linalg.eigh(np.asarray(sigma1, np.float64))
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ np.asarray(sigma2, np.float64) @ root1
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)), in float64; rounding below 0 gives 0."""
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2)
    return max(float(value), 0.0)


def fid_between(a: GaussianStats, b: GaussianStats) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


@torch.no_grad()
def inception_features(network: FIDInceptionV3, frames: Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
    """(N, D) float64 pool features of N (H, W, 3) uint8 frames (any sizes: each is resized to 299 x 299)."""
    device = next(network.parameters()).device
    out, start = [], 0
    while start < len(frames):
        # a batch of consecutive frames of one size
        end = start + 1
        while end < len(frames) and end - start < batch_size and frames[end].shape == frames[start].shape:
            end += 1
        batch = torch.from_numpy(np.ascontiguousarray(np.stack(frames[start:end]))).permute(0, 3, 1, 2).to(device)
        out.append(network(batch).double().cpu().numpy())
        start = end
    return np.concatenate(out) if out else np.zeros((0, network.feature_dim))


def sample_statistics(network: FIDInceptionV3, samples: Sequence[np.ndarray], batch_size: int = 32) -> GaussianStats:
    """The Gaussian of the Inception features of every frame of the samples (videos: FID over frames)."""
    moments = FeatureMoments(network.feature_dim)
    moments.add(inception_features(network, [f for s in samples for f in frames_of(s)], batch_size))
    return moments.stats()


def fid(
    network: FIDInceptionV3, samples: Sequence[np.ndarray], reference: GaussianStats, batch_size: int = 32
) -> float:
    """FID of samples (images and/or videos, over frames) against reference statistics."""
    check_reference_matches(reference, network, "the reference statistics")
    return fid_between(sample_statistics(network, samples, batch_size), reference)


def save_statistics(path: str | Path, stats: GaussianStats) -> Path:
    """An `.npz` with `mu` and `sigma` (the keys pytorch-fid and ADM's reference batches use), `count` and the network's
    sha256."""
    path = Path(path)
    if path.suffix != ".npz":
        raise GentronError(
            f"reference statistics are saved as .npz, got {path}",
            f"use e.g. --save-reference {path.with_suffix('.npz')}",
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {"inception_sha256": np.array(stats.inception_sha256)} if stats.inception_sha256 else {}
    buf = io.BytesIO()
    np.savez(
        buf, mu=stats.mu, sigma=stats.sigma, count=np.array(stats.count if stats.count is not None else -1), **extra
    )
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_statistics(path: str | Path) -> GaussianStats:
    """Statistics from an `.npz` with `mu` and `sigma` (written by --save-reference, pytorch-fid or ADM's evaluator)."""
    path = Path(path)
    hint = "pass an .npz written by `gentron eval --save-reference`, or an image folder / shards to compute it from"
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "mu" not in npz.files or "sigma" not in npz.files:
                raise GentronError(f"{path} holds no FID statistics (arrays mu and sigma); it has {npz.files}", hint)
            mu, sigma = npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64)
            count = int(npz["count"]) if "count" in npz.files and int(npz["count"]) >= 0 else None
            sha = str(npz["inception_sha256"]) if "inception_sha256" in npz.files else None
    except (OSError, ValueError) as exc:
        raise GentronError(f"cannot read FID statistics {path}: {exc}", hint) from None
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise GentronError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not a mean and its covariance", hint)
    return GaussianStats(mu, sigma, count, sha)


def check_reference_matches(
    reference: GaussianStats, network: FIDInceptionV3, where: str, network_sha256: str | None = None
) -> None:
    """Refuse statistics of other features: another width, or (when both are known) another weights file."""
    if len(reference.mu) != network.feature_dim:
        raise GentronError(
            f"{where} hold {len(reference.mu)}-d features but the Inception network gives {network.feature_dim}-d ones",
            "compute the reference statistics with the same --inception weights",
        )
    if network_sha256 and reference.inception_sha256 and reference.inception_sha256 != network_sha256:
        raise GentronError(
            f"{where} were computed with another Inception weights file (sha256 {reference.inception_sha256[:12]}..., "
            f"this one {network_sha256[:12]}...)",
            "FID is only comparable with one network: recompute the reference with this --inception file",
        )


def iter_reference_images(path: str | Path) -> Iterator[np.ndarray]:
    """(H, W, 3) uint8 frames of a reference: the images (and clips' frames) of a folder of shards, else every image
    file under the folder, in sorted order."""
    path = Path(path)
    shards = list_shards(path)
    if shards:
        for shard in shards:
            try:
                for _key, fields in iter_shard(shard):
                    image = next((fields[f] for f in schema.IMAGE_FIELDS if f in fields), None)
                    if image is not None:
                        yield decode_image(image)
                    elif schema.VIDEO in fields:
                        yield from decode_clip(fields[schema.VIDEO])
            except BadSample as exc:
                raise GentronError(
                    f"cannot read reference shard {shard}: {exc}", "rerun the prep stage that wrote it"
                ) from None
        return
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS):
        try:
            with Image.open(file) as im:
                yield np.asarray(im.convert("RGB"))
        except (OSError, Image.DecompressionBombError) as exc:
            raise GentronError(f"cannot read reference image {file}: {exc}", "remove or replace the file") from None


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def reference_statistics(
    path: str | Path,
    network: FIDInceptionV3,
    batch_size: int = 32,
    network_sha256: str | None = None,
    reporter: Reporter = NullReporter(),
) -> GaussianStats:
    """Statistics of a reference: loaded from an `.npz`, or computed from an image folder or shards."""
    path = Path(path)
    hint = REFERENCE_HINT
    if not path.exists():
        raise GentronError(f"FID reference not found: {path}", hint)
    if path.is_file():
        if path.suffix != ".npz":
            raise GentronError(f"FID reference {path} is a file but not an .npz of statistics", hint)
        stats = load_statistics(path)
        check_reference_matches(stats, network, f"the reference statistics {path}", network_sha256)
        return stats
    moments = FeatureMoments(network.feature_dim)
    with reporter.task("reference images", total=None, unit="img") as task:
        for chunk in _chunks(iter_reference_images(path), batch_size):
            moments.add(inception_features(network, chunk, batch_size))
            task.advance(len(chunk))
    if moments.count == 0:
        raise GentronError(f"no reference images in {path} (no shards, no {', '.join(IMAGE_EXTENSIONS)} files)", hint)
    return moments.stats(network_sha256)


# --------------------------------------------------------------------------- the toy probe


# --------------------------------------------------------------------------- evaluate: the command's library function


@dataclass
class EvalConfig:
    samples: Path  # a folder written by `gentron sample`
    out: Path | None = None  # metrics JSON; default SAMPLES/metrics.json
    clip: str | None = None  # CLIP model for the CLIP score (hub name or folder)
    reference: Path | None = None  # FID reference: image folder, shards, or .npz statistics
    inception: Path | None = None  # FID Inception-v3 weights file
    save_reference: Path | None = None  # write the reference's statistics here (.npz)
    probe: str | None = None  # "toy"
    given: bool = False  # how videos keep the frames they were given (PSNR, SSIM; CLIP image similarity with clip)
    device: str = "auto"
    batch_size: int = 32

    def check(self) -> None:
        """The option errors, before anything is read or loaded."""
        MetricOptions(self.clip, self.reference, self.inception, self.probe, self.given).check()
        require(
            self.save_reference is None or (self.reference is not None and not Path(self.reference).is_file()),
            "--save-reference saves statistics computed from a reference folder",
            "pass --reference IMAGE_FOLDER_OR_SHARDS with it (an .npz reference is already saved)",
        )
        require(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")


@dataclass
class EvalResult:
    metrics: dict  # what the JSON file holds
    out: Path
    seconds: float


def check_toy_prompts(samples: Sequence[SampleFile]) -> None:
    """--probe toy reads toy captions only: refuse any other prompt before the slow work starts."""
    for sample in samples:
        try:
            parse_caption(sample.prompt)
        except ValueError:
            raise GentronError(
                f"--probe toy scores toy captions only; sample {sample.sidecar} has the prompt {sample.prompt!r}",
                'use --probe toy on samples of the quickstart\'s prompts (e.g. "a red square in the top left")',
            ) from None


@dataclass
class _Scores:
    """What the pass over the samples collects."""

    per_sample: list[dict]
    clip: list[SampleClipScore] = field(default_factory=list)
    given: list[dict] = field(default_factory=list)
    moments: FeatureMoments | None = None
    probe: ProbeTally = field(default_factory=ProbeTally)


def _score_samples(
    samples: list[SampleFile],
    scorer: ClipScorer | None,
    network: FIDInceptionV3 | None,
    probe: str | None,
    batch_size: int,
    reporter: Reporter,
    given: bool = False,
) -> _Scores:
    """One pass over the samples, `batch_size` at a time, so memory holds one chunk's pixels whatever the folder's
    size."""
    scores = _Scores([{"sample": s.name, "prompt": s.prompt, "frames": s.frames} for s in samples])
    scores.moments = FeatureMoments(network.feature_dim) if network is not None else None
    with reporter.task("samples", total=len(samples), unit="sample") as task:
        for begin in range(0, len(samples), batch_size):
            chunk = samples[begin : begin + batch_size]
            pixels = [s.read_pixels() for s in chunk]
            records = scores.per_sample[begin : begin + len(chunk)]
            if scorer is not None:
                clip = clip_scores(scorer, pixels, [s.prompt for s in chunk])
                scores.clip += clip
                for record, score in zip(records, clip):
                    record["clip_score"] = score.clip_score
                    if score.temporal_consistency is not None:
                        record["temporal_consistency"] = score.temporal_consistency
            if scores.moments is not None:
                scores.moments.add(inception_features(network, [f for p in pixels for f in frames_of(p)], batch_size))
            if probe == "toy":
                for record, sample, p in zip(records, chunk, pixels):
                    record["probe"] = probe_sample(p, sample.prompt)
                    scores.probe.add(record["probe"])
            if given:
                for record, sample, p in zip(records, chunk, pixels):
                    if sample.given is not None:
                        record["given"] = given_scores(sample, p, scorer)
                        scores.given.append(record["given"])
            task.advance(len(chunk))
    return scores


def given_scores(sample: SampleFile, video: np.ndarray, scorer: ClipScorer | None) -> dict:
    """How a video keeps the frames it was given (`fidelity.given_fidelity`), and with a CLIP model the mean CLIP
    image similarity of its first given frame to each frame it generated."""
    frames = [int(i) for i in sample.given["frames"]]
    given = sample.read_given()
    scores = given_fidelity(video, given, frames)
    if scorer is not None:
        generated = [f for i, f in enumerate(video) if i not in frames]
        embeddings = scorer.image_embeddings([given[0], *generated])
        scores["clip_image_similarity"] = float((embeddings[1:] @ embeddings[0]).mean())
    return scores


def summarize_given(scores: Sequence[dict]) -> dict:
    """Means over the videos that were given frames."""
    keys = ("first_frame_psnr", "first_frame_ssim", "psnr", "ssim", "clip_image_similarity")
    return {"videos": len(scores)} | {
        key: float(np.mean([s[key] for s in scores])) if scores and key in scores[0] else None for key in keys
    }


def evaluate(cfg: EvalConfig, reporter: Reporter = NullReporter()) -> EvalResult:
    """Score every sample of cfg.samples with the asked metrics; write and return the metrics."""
    start = time.perf_counter()
    cfg.check()
    out = Path(cfg.out) if cfg.out is not None else Path(cfg.samples) / METRICS_FILE
    samples = list_samples(cfg.samples, skip=[out])
    if cfg.probe == "toy":
        check_toy_prompts(samples)
    if cfg.given and not any(s.given is not None for s in samples):
        raise GentronError(
            f"--given compares videos with the frames they were given, but no sample in {cfg.samples} was given any",
            "sample with `gentron sample --image / --video --continue K / --last-image`, or drop --given",
        )
    device = resolve_device(cfg.device)

    # the quick failures first (a missing file), then the slow loads
    network = load_fid_inception(cfg.inception, device) if cfg.inception is not None else None
    if cfg.reference is not None and not Path(cfg.reference).exists():
        raise GentronError(f"FID reference not found: {cfg.reference}", REFERENCE_HINT)
    scorer = ClipScorer(cfg.clip, device, cfg.batch_size) if cfg.clip else None
    sha = reference = None
    if network is not None:
        sha = file_sha256(Path(cfg.inception).expanduser())
        reporter.log(f"FID reference {cfg.reference}")
        reference = reference_statistics(cfg.reference, network, cfg.batch_size, sha, reporter)
        if cfg.save_reference is not None:
            reporter.log(f"reference statistics saved to {save_statistics(cfg.save_reference, reference)}")

    scores = _score_samples(samples, scorer, network, cfg.probe, cfg.batch_size, reporter, cfg.given)
    videos = sum(s.frames > 1 for s in samples)
    metrics: dict = {
        "version": METRICS_VERSION,
        "samples": {
            "folder": str(Path(cfg.samples).resolve()),
            "count": len(samples),
            "images": len(samples) - videos,
            "videos": videos,
            "frames": sum(s.frames for s in samples),
        },
        "settings": {
            "clip": cfg.clip,
            "reference": str(cfg.reference) if cfg.reference else None,
            "inception": str(cfg.inception) if cfg.inception else None,
            "probe": cfg.probe,
            "given": cfg.given,
            "device": str(device),
            "batch_size": cfg.batch_size,
            "torch": torch.__version__,
        },
        "notes": [],
    }
    if scorer is not None:
        metrics["clip"] = {"model": cfg.clip, **summarize_clip_scores(scores.clip)}
    if network is not None:
        frames = scores.moments.count
        metrics["fid"] = {
            "value": fid_between(scores.moments.stats(), reference),
            "frames": frames,
            "reference": str(cfg.reference),
            "reference_count": reference.count,
            "feature_dim": network.feature_dim,
            "inception": str(cfg.inception),
            "inception_sha256": sha,
        }
        if frames < network.feature_dim:
            metrics["notes"].append(
                f"FID from {frames} frames (fewer than the {network.feature_dim} feature dimensions) is biased upward; "
                "compare only FIDs computed from the same number of samples (papers use 10 000 to 50 000)"
            )
    if cfg.probe == "toy":
        metrics["probe"] = {"kind": "toy", **scores.probe.record()}
    if cfg.given:
        metrics["given"] = summarize_given(scores.given)
    metrics["per_sample"] = scores.per_sample
    metrics["seconds"] = time.perf_counter() - start
    write_metrics(out, metrics)
    return EvalResult(metrics, out, metrics["seconds"])


def write_metrics(path: Path, metrics: dict) -> Path:
    """Pretty JSON, keys in insertion order (summary first, then per sample)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, metrics, indent=2, sort_keys=False, ensure_ascii=False, newline=True)
    return path
