"""The frames a video is given at sampling (`gentron sample --image`, `--video --continue K`, `--last-image`).

Each given picture is read as prep reads its data (pipelines/data/image.py `load_image`: upright 8-bit RGB) and
resized to cover the sample's width x height and center-cropped by prep's own `fit` and `cover_crop` (as a bucket of
`--buckets` is cut; a square when the sample is); a video's frames are read at the
model's training frame rate by prep's reader (pipelines/data/video.py), each resized and cropped the same way.
`encode_given` turns them into the latent frames the model keeps (a `FrameCondition`) through the VAE's frame rule:
the first picture, or the video's last K frames encoded as one clip, become the first latent frames (with a causal
video VAE, the first frame alone and then every `temporal` frames: 1 + (K - 1) / temporal latent frames, so K must be
a clip length the VAE takes); the last picture the last latent frame, with a VAE that encodes each frame alone only
(a video VAE's last latent frame holds several frames, which one picture cannot give).

What was given is recorded per sample (`GivenFrames.record`: the sources with their sha256, the latent and output
frames) beside a lossless film strip of the prepared frames (`stem.given.png`), which `gentron eval` compares
with the generated frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipelines.data.buckets import fit
from pipelines.data.image import cover_crop, load_image
from pipelines.data.video import ClipPlan, plan_clips, probe_video, read_clips, rotate_frames
from pipelines.errors import BadSample, GentronError
from pipelines.files import file_sha256
from pipelines.model.conditioning import FrameCondition
from pipelines.model.vae import VAE, FrameRule

GIVEN_SUFFIX = ".given.png"  # the film strip of a sample's given frames, beside its outputs


@dataclass(frozen=True)
class GivenSources:
    """What one sample is given, as the user named it."""

    image: Path | None = None  # the first frame
    video: Path | None = None  # a video whose last `continue_frames` frames start the sample
    continue_frames: int | None = None
    last_image: Path | None = None  # the last frame

    @property
    def empty(self) -> bool:
        return self.image is None and self.video is None and self.last_image is None


@dataclass
class GivenFrames:
    """The prepared pixels one sample is given: `start` (F, H, W, 3) uint8, its first frames (an image: F = 1), and
    `last` (H, W, 3), its last frame; either may be None. `sources`: what they were read from."""

    start: np.ndarray | None
    last: np.ndarray | None
    sources: dict = field(default_factory=dict)

    def strip_frames(self) -> np.ndarray:
        """(F [+ 1], H, W, 3): the given frames in order (the start frames, then the last one)."""
        parts = ([self.start] if self.start is not None else []) + ([self.last[None]] if self.last is not None else [])
        return np.concatenate(parts)

    def output_frames(self, frames: int) -> list[int]:
        """The indices of the output video's frames (of `frames`) that show the given ones: the start frames open it
        (with any VAE: a video VAE's first latent frames decode to exactly those frames), the last frame ends it."""
        start = list(range(len(self.start))) if self.start is not None else []
        return start + ([frames - 1] if self.last is not None else [])

    def record(self, frames: int, latent_frames: list[int], file: str) -> dict:
        """The sidecar's `given`: sources, which latent and output frames were given, and the strip file."""
        return {
            "sources": self.sources,
            "latent_frames": latent_frames,
            "frames": self.output_frames(frames),
            "start_frames": 0 if self.start is None else len(self.start),
            "last": self.last is not None,
            "file": file,
        }


def _source(path: Path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise GentronError(f"{what} not found: {path}", f"pass an existing file to {what}")
    return {"path": str(path.resolve()), "sha256": file_sha256(path)}


def fit_frame(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A picture (H, W, 3) resized to cover `size` (width, height), aspect kept, then center-cropped: prep's cut."""
    return cover_crop(pixels, fit(pixels.shape[1], pixels.shape[0], size))[0]


def read_image(path: Path, size: tuple[int, int], option: str = "--image") -> np.ndarray:
    """A picture as prep reads it (upright 8-bit RGB), cut to `size` (width, height) as prep cuts it."""
    try:
        pixels = load_image(path).pixels
    except BadSample as err:
        raise GentronError(
            f"{option} {path}: cannot read the image ({err.detail})", "pass a PNG or JPEG picture"
        ) from None
    return fit_frame(pixels, size)


def read_video_frames(path: Path, fps: float) -> np.ndarray:
    """Every frame of a video at `fps`: the frame on screen at each time of a timeline at that rate, as prep picks
    clip frames, turned upright; (T, H, W, 3) uint8 at the video's own size."""
    hint = "pass a video file PyAV reads (mp4, webm, mkv, ...)"
    try:
        info = probe_video(path)
        span = info.end_time - info.times[0]
        timeline = int(np.floor(span * fps - 1e-9)) + 1 if span > 0 else 1
        selections = plan_clips(info, ClipPlan(timeline_fps=fps, frames=timeline, frame_stride=1, max_clips=1))
        (_, frames, _) = next(read_clips(path, info, selections))
    except BadSample as err:
        raise GentronError(f"{path}: cannot read the video ({err.reason}: {err.detail})", hint) from None
    return rotate_frames(frames, info.rotation)


def read_video_end(path: Path, count: int, fps: float, size: tuple[int, int]) -> np.ndarray:
    """The last `count` frames of a video at `fps` (`read_video_frames`), each cut to `size` (width, height) like a
    picture: (count, height, width, 3) uint8."""
    frames = read_video_frames(path, fps)
    if len(frames) < count:
        raise GentronError(
            f"--video {path} has {len(frames)} frame(s) at the model's {fps:g} FPS, but --continue {count} needs "
            f"{count}",
            f"pass a longer video, or --continue {len(frames)}",
        )
    return np.stack([fit_frame(np.ascontiguousarray(f), size) for f in frames[-count:]])


def read_given(sources: GivenSources, size: tuple[int, int], fps: float) -> GivenFrames:
    """The frames `sources` name, prepared for a sample of `size` (width, height) pixels (videos read at `fps`)."""
    start, last, record = None, None, {}
    if sources.image is not None:
        record["image"] = _source(sources.image, "--image")
        start = read_image(sources.image, size)[None]
    if sources.video is not None:
        record["video"] = _source(sources.video, "--video") | {"continue": sources.continue_frames}
        start = read_video_end(sources.video, sources.continue_frames, fps, size)
    if sources.last_image is not None:
        record["last_image"] = _source(sources.last_image, "--last-image")
        last = read_image(sources.last_image, size, "--last-image")
    return GivenFrames(start, last, record)


def check_given_rule(rule: FrameRule, vae: str, start_frames: int | None, last: bool) -> None:
    """Given frames through a VAE's frame rule (`vae`: its name, for the message): `start_frames` given frames (an
    image: 1, `--video --continue K`: K) must be a clip length it takes, and a last picture needs a VAE that encodes
    each frame alone. GentronError naming the option and the fix otherwise."""
    if start_frames is not None:
        rule.check(start_frames, f"--continue {start_frames}", vae, option="--continue")
    if last and rule.temporal > 1:
        raise GentronError(
            f"--last-image gives one frame, but the VAE {vae} packs {rule.temporal} frames into each latent frame "
            "after the first, so a video's last latent frame cannot be made from one picture",
            "drop --last-image (--image and --video --continue K work with this VAE), or use a model trained on the "
            "latents of a VAE that encodes each frame alone",
        )


def given_latent_frames(given: GivenFrames, latent_frames: int, rule: FrameRule, vae: str) -> list[int]:
    """Which of a video's `latent_frames` latent frames `given` fills, through the VAE's frame `rule`: K start frames
    are its first rule.latent_frames(K) latent frames, the last picture its last latent frame."""
    check_given_rule(rule, vae, None if given.start is None else len(given.start), given.last is not None)
    start = list(range(rule.latent_frames(len(given.start)))) if given.start is not None else []
    indices = start + ([latent_frames - 1] if given.last is not None else [])
    if len(set(indices)) != len(indices) or len(indices) >= latent_frames:
        raise GentronError(
            f"{len(indices)} given latent frame(s) leave nothing to generate in a video of {latent_frames} latent "
            "frames",
            "give fewer frames (a smaller --continue), or sample more --frames",
        )
    return indices


@torch.no_grad()
def encode_given(vae: VAE, given: list[GivenFrames], latent_shape: tuple[int, ...]) -> FrameCondition:
    """The latent frames a batch of videos of `latent_shape` (T, C, h, w) keeps: each sample's given frames encoded
    by the VAE (its posterior mean) at their latent frames, zeros elsewhere."""
    latents = torch.zeros(len(given), *latent_shape)
    mask = torch.zeros(len(given), latent_shape[0], dtype=torch.bool)
    for b, frames in enumerate(given):
        indices = given_latent_frames(frames, latent_shape[0], vae.frame_rule, vae.name)
        parts = [] if frames.start is None else [vae.encode_clips([frames.start])[0][0]]  # one clip: K frames
        parts += [] if frames.last is None else [vae.encode(frames.last[None])[0]]  # one picture: one latent frame
        mean = torch.cat(parts)
        if tuple(mean.shape[1:]) != tuple(latent_shape[1:]):
            raise GentronError(
                f"the given frames encode to latents {tuple(mean.shape[1:])}, the video's are "
                f"{tuple(latent_shape[1:])}",
                "give pictures of the sample's size (they are resized to it; is the VAE the model's?)",
            )
        latents[b, indices] = mean.float()
        mask[b, indices] = True
    return FrameCondition(mask, latents)
