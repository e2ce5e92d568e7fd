"""The VAE wrapper: uint8 frames <-> normalised latents, for every VAE family we load, and two pixel latents.

One interface (`VAE`) for image VAEs (SD's AutoencoderKL: each frame alone) and causal video VAEs (Wan,
CogVideoX, HunyuanVideo, LTX-Video: time compressed too, the first frame encoded alone):

    encode_clips([(T, H, W, 3) uint8, ...]) -> [(mean, std) each (t, C, H/d, W/d)]   t = frame_rule.latent_frames(T)
    decode_clips((B, t, C, h, w))            -> (B, frame_rule.decoded_frames(t), h*d, w*d, 3) uint8
    encode(images (N, H, W, 3))              -> (mean, std) each (N, C, h, w): every image one latent frame
    decode(latents (N, C, h, w))             -> (N, H, W, 3)

The posterior comes out already normalised the family's way (`Normalisation`: a per-channel affine map,
e.g. SD's `(z - shift) * scaling_factor`, Wan's `(z - mean) / std`); training samples z = mean + std * noise,
as PixArt does. What each family knows (compression, channels, frame rule, normalisation, decode options)
lives in its adapter in pipelines/model/vae_families.py; `record()` is what shards and model folders keep of
a VAE, and `FrameRule.from_record` reads the frame arithmetic back without loading the VAE.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange

from pipelines.defaults import DEFAULT_VAE
from pipelines.defaults import PIXEL_VAE as PIXEL
from pipelines.defaults import PIXEL_VIDEO_VAE as PIXEL_VIDEO
from pipelines.errors import GentronError
from pipelines.model.text_encoders import load_pretrained, resolve_device, resolve_dtype

__all__ = ["DEFAULT_VAE", "PIXEL", "PIXEL_VIDEO", "VAE", "FrameRule", "Normalisation", "load_vae"]


# --------------------------------------------------------------------------- frames and pixels


def frames_to_pixels(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1]."""
    frames = (
        frames if isinstance(frames, torch.Tensor) else torch.tensor(np.asarray(frames))
    )  # a copy: decoded frames may be read-only
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) uint8 frames, got {tuple(frames.shape)} {frames.dtype}")
    return rearrange(frames, "n h w c -> n c h w").float() / 127.5 - 1.0


def pixels_to_frames(pixels: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8, rounded to nearest."""
    values = ((pixels.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return rearrange(values, "n c h w -> n h w c").cpu().numpy()


# --------------------------------------------------------------------------- what a family knows, as data


@dataclass(frozen=True)
class FrameRule:
    """A VAE's frame arithmetic. Causal video VAEs encode the first frame alone and then every `temporal` frames
    into one latent frame; they take clips of 1 + step * k frames (step = temporal, or 2 * temporal for
    CogVideoX, whose decoder doubles an even latent frame count). Image VAEs: temporal 1, any frame count."""

    temporal: int = 1
    step: int = 1

    def ok(self, frames: int) -> bool:
        return frames >= 1 and (frames - 1) % self.step == 0

    def latent_frames(self, frames: int) -> int:
        return 1 + (frames - 1) // self.temporal

    def decoded_frames(self, latent_frames: int) -> int:
        return 1 + (latent_frames - 1) * self.temporal

    def describe(self) -> str:
        """ "4k+1", or "any" for an image VAE."""
        return "any" if self.step == 1 else f"{self.step}k+1"

    def suggestions(self, frames: int) -> tuple[int, ...]:
        """Two valid clip lengths for a clip of `frames`: the next one up, then the one below (or the second one up
        when the one below would be a single frame). 8 frames: (9, 5) for 4k+1, (9, 17) for 8k+1."""
        below = frames - (frames - 1) % self.step
        above = below + self.step if below < frames or frames < 1 else below
        return (above, below) if 1 < below < frames else (above, above + self.step)

    def check(self, frames: int, what: str, vae: str, option: str = "gentron prep-videos --frames") -> None:
        """GentronError naming the rule and the `option` (`prep-videos --frames`) to use when `frames` breaks it."""
        if self.ok(frames):
            return
        latent = self.latent_frames(frames)
        first, second = self.suggestions(frames)
        raise GentronError(
            f"{what} has {frames} frames, but the VAE {vae} takes clips of {self.describe()} frames "
            f"(1, {', '.join(str(1 + self.step * k) for k in (1, 2, 3))}, ...): {frames} frames would encode to "
            f"{latent} latent frames that decode to {self.decoded_frames(latent)}",
            f"use `{option} {first}` (or {second}); nothing is truncated silently",
        )

    def record(self) -> dict:
        return {"temporal_downsample": self.temporal, "frame_step": self.step, "frame_rule": self.describe()}

    @classmethod
    def from_record(cls, record: dict | None) -> FrameRule:
        """The rule a shard's or model folder's VAE record describes; records written before video VAEs: per frame."""
        record = record or {}
        temporal = int(record.get("temporal_downsample") or 1)
        return cls(temporal, int(record.get("frame_step") or temporal))


@dataclass(frozen=True)
class Normalisation:
    """A family's latent normalisation as a per-channel affine map: normalised = (z - shift) * scale.

    SD: shift = shift_factor (0), scale = scaling_factor; Wan: shift = mean, scale = 1 / std; CogVideoX,
    HunyuanVideo: scale = scaling_factor; LTX: shift = mean, scale = scaling_factor / std. One value, or one per
    latent channel. `formula` says it the family's way, for people."""

    formula: str
    shift: tuple[float, ...] = (0.0,)
    scale: tuple[float, ...] = (1.0,)

    def _per_channel(self, values: tuple[float, ...], like: torch.Tensor, channel_dim: int) -> torch.Tensor:
        shape = [1] * like.ndim
        shape[channel_dim] = len(values)
        return torch.tensor(values, dtype=torch.float64).reshape(shape).to(like.device, torch.float32)

    def normalise(self, z: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
        z = z.float()
        return (z - self._per_channel(self.shift, z, channel_dim)) * self._per_channel(self.scale, z, channel_dim)

    def normalise_std(self, std: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
        std = std.float()
        return std * self._per_channel(self.scale, std, channel_dim).abs()

    def denormalise(self, latents: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
        latents = latents.float()
        scale, shift = (self._per_channel(v, latents, channel_dim) for v in (self.scale, self.shift))
        return latents / scale + shift

    def record(self) -> dict:
        return {"formula": self.formula, "shift": list(self.shift), "scale": list(self.scale)}

    @classmethod
    def from_record(cls, record: dict) -> Normalisation:
        return cls(str(record["formula"]), tuple(map(float, record["shift"])), tuple(map(float, record["scale"])))

    def close_to(self, other: Normalisation, rtol: float = 1e-5) -> bool:
        return (
            len(self.shift) == len(other.shift)
            and len(self.scale) == len(other.scale)
            and bool(
                np.allclose(self.shift, other.shift, rtol=rtol, atol=1e-7)
                and np.allclose(self.scale, other.scale, rtol=rtol, atol=1e-7)
            )
        )


IDENTITY = Normalisation("z")


# --------------------------------------------------------------------------- the interface


class VAE:
    """Shared behaviour of every VAE; subclasses set the attributes and `_encode_call` / `_decode_call`."""

    name: str  # what the user passed: a hub name, a folder, "pixel" or "pixel-video"
    family: str  # "sd", "wan", "cogvideox", "hunyuanvideo", "ltx", "pixel", "pixel-video"
    latent_channels: int
    downsample: int  # pixels per latent along each side
    frame_rule: FrameRule
    normalisation: Normalisation
    decode_options: dict  # what decoding passes besides the latents (LTX's decode timestep), recorded
    memory: dict  # {"slicing": bool, "tiling": bool}: the VAE's own memory savers, recorded
    causal: bool = True  # a clip's first latent frame equals its first frame's latent as an image

    @property
    def video(self) -> bool:
        """Whether the VAE compresses time (encodes whole clips) rather than frame by frame."""
        return self.frame_rule.temporal > 1

    @property
    def scaling_factor(self) -> float:
        """The single scale of an SD-style VAE (the first channel's otherwise); kept for older records."""
        return float(self.normalisation.scale[0])

    @property
    def shift_factor(self) -> float:
        return float(self.normalisation.shift[0])

    def record(self) -> dict:
        """What shards and exported model folders keep of the VAE: family, ratios, normalisation, options."""
        return {
            "vae": self.name,
            "family": self.family,
            "channels": self.latent_channels,
            "downsample": self.downsample,
            **self.frame_rule.record(),
            "causal": self.causal,
            "normalisation": self.normalisation.record(),
            "decode_options": dict(self.decode_options),
            **self.memory,
            # SD-style single values, as records written before video VAEs held them
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
        }

    def describe(self) -> str:
        time = (
            f" x {self.frame_rule.temporal} in time, clips of {self.frame_rule.describe()} frames" if self.video else ""
        )
        return (
            f"VAE {self.name} ({self.family}): {self.latent_channels} channels, {self.downsample}x in space{time}; "
            f"latents {self.normalisation.formula}"
        )

    # -- clips

    def encode_clips(
        self, clips: Sequence[np.ndarray], frames_per_call: int | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each (T, H, W, 3) uint8 clip (T = 1: an image) -> its normalised posterior (mean, std), each (t, C, h, w)
        float32 on CPU. Clips of equal size share VAE calls of at most `frames_per_call` frames (None: all at once);
        a video VAE never splits a clip, an image VAE splits by frames. A clip breaking the frame rule: ValueError
        (the encode stage checks the rule first, with the message that names the fix)."""
        for clip in clips:
            if not self.frame_rule.ok(len(clip)):
                raise ValueError(f"a clip of {len(clip)} frames breaks the frame rule {self.frame_rule.describe()}")
        out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(clips)
        for run in _runs_of_one_shape(clips, frame_size_only=not self.video):
            if self.video:  # whole clips, as many per call as the frame budget allows (at least one)
                per_call = max(1, frames_per_call // len(clips[run[0]])) if frames_per_call else len(run)
                for begin in range(0, len(run), per_call):
                    group = run[begin : begin + per_call]
                    means, stds = self._encode_call(np.stack([clips[i] for i in group]))
                    for k, i in enumerate(group):
                        out[i] = (means[k], stds[k])
                continue
            # an image VAE sees frames only: the run's frames in calls of at most frames_per_call, split back
            frames = np.concatenate([clips[i] for i in run])
            per_call = frames_per_call or len(frames)
            parts = [self._encode_call(frames[b : b + per_call, None]) for b in range(0, len(frames), per_call)]
            means, stds = (torch.cat([part[k][:, 0] for part in parts]) for k in (0, 1))
            start = 0
            for i in run:
                rows = slice(start, start + len(clips[i]))
                out[i] = (means[rows], stds[rows])
                start += len(clips[i])
        return out

    def decode_clips(self, latents: torch.Tensor) -> np.ndarray:
        """Normalised latents (B, t, C, h, w) -> (B, frame_rule.decoded_frames(t), H, W, 3) uint8."""
        latents = torch.as_tensor(latents)
        if latents.ndim != 5:
            raise ValueError(f"expected (B, t, C, h, w) latents, got {tuple(latents.shape)}")
        if self.video:
            return self._decode_call(latents)
        b = latents.shape[0]
        frames = self._decode_call(rearrange(latents, "b t c h w -> (b t) 1 c h w"))
        return rearrange(frames, "(b t) 1 h w c -> b t h w c", b=b)

    # -- images: one latent frame each

    def encode(self, frames: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, H, W, 3) uint8 images -> normalised posterior (mean, std), each (N, C, h, w) float32 on CPU."""
        frames = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        mean, std = self._encode_call(frames[:, None])
        return mean[:, 0], std[:, 0]

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Normalised latents (N, C, h, w), one latent frame each -> (N, H, W, 3) uint8."""
        return self.decode_clips(torch.as_tensor(latents)[:, None])[:, 0]

    # -- what a subclass provides

    def _encode_call(self, clips: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, H, W, 3) uint8 (T = 1 for an image VAE) -> normalised (mean, std), each (B, t, C, h, w)."""
        raise NotImplementedError

    def _decode_call(self, latents: torch.Tensor) -> np.ndarray:
        """(B, t, C, h, w) normalised (t = 1 for an image VAE) -> (B, T, H, W, 3) uint8."""
        raise NotImplementedError


def _runs_of_one_shape(clips: Sequence[np.ndarray], frame_size_only: bool) -> list[list[int]]:
    """Indices of consecutive clips of one shape (one frame size, when frames are encoded alone)."""
    runs: list[list[int]] = []
    key = (lambda c: c.shape[1:]) if frame_size_only else (lambda c: c.shape)
    for i, clip in enumerate(clips):
        if runs and key(clips[runs[-1][0]]) == key(clip):
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


# --------------------------------------------------------------------------- the pixel latents


class PixelVAE(VAE):
    """Identity "VAE" for tiny runs: the latent is the frame in [-1, 1] (3 channels, 1x, std 0), frame by frame."""

    family = PIXEL
    latent_channels = 3
    downsample = 1
    frame_rule = FrameRule()
    normalisation = IDENTITY

    def __init__(self):
        self.name = PIXEL
        self.decode_options, self.memory = {}, {"slicing": False, "tiling": False}

    def _encode_call(self, clips: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        b = len(clips)
        pixels = frames_to_pixels(rearrange(torch.from_numpy(np.ascontiguousarray(clips)), "b t h w c -> (b t) h w c"))
        mean = rearrange(pixels, "(b t) c h w -> b t c h w", b=b)
        return mean, torch.zeros_like(mean)

    def _decode_call(self, latents: torch.Tensor) -> np.ndarray:
        frames = pixels_to_frames(rearrange(latents.float(), "b t c h w -> (b t) c h w"))
        return rearrange(frames, "(b t) h w c -> b t h w c", b=latents.shape[0])


class PixelVideoVAE(PixelVAE):
    """A deterministic, invertible video latent laid out in time as the causal video VAEs lay it out: the first
    frame alone, then every 4 frames packed into the channels (12 = 4 frames x RGB, frame-major). The first latent
    frame holds its one frame in channels 0-2 and zeros in the other 9, so every latent frame has the same channels
    (copies of the frame there would give a still 4 times the signal of each noise draw, as if at a lower noise
    level than the per-frame latents). Clips of 4k+1 frames; an image is one latent frame, equal to the first
    latent frame of a clip that starts with it. For tiny runs and the learning benchmark, which must read decoded
    pixels (a random VAE would decode to noise)."""

    family = PIXEL_VIDEO
    frame_rule = FrameRule(temporal=4, step=4)
    latent_channels = 3 * 4

    def __init__(self):
        super().__init__()
        self.name = PIXEL_VIDEO

    def _encode_call(self, clips: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, _ = super()._encode_call(clips)  # (B, T, 3, H, W)
        f = self.frame_rule.temporal
        first = torch.cat([pixels[:, :1], pixels.new_zeros(pixels[:, :1].shape).repeat(1, 1, f - 1, 1, 1)], dim=2)
        rest = rearrange(pixels[:, 1:], "b (t f) c h w -> b t (f c) h w", f=f)
        mean = torch.cat([first, rest], dim=1)
        return mean, torch.zeros_like(mean)

    def _decode_call(self, latents: torch.Tensor) -> np.ndarray:
        f = self.frame_rule.temporal
        latents = latents.float()
        first = latents[:, :1, :3]  # the first frame; the zero channels beside it carry nothing
        rest = rearrange(latents[:, 1:], "b t (f c) h w -> b (t f) c h w", f=f)
        return super()._decode_call(torch.cat([first, rest], dim=1))


# --------------------------------------------------------------------------- diffusers VAEs


class DiffusersVAE(VAE):
    """A diffusers VAE of a known family, run in the dtype it was loaded in; its adapter
    (pipelines/model/vae_families.py) says what the family needs."""

    def __init__(self, model, name: str, device: torch.device, slicing: bool = False, tiling: bool = False):
        from pipelines.model.vae_families import adapter_for

        self.model = model.to(device).eval().requires_grad_(False)
        self.adapter = adapter_for(self.model)
        self.name, self.family = name, self.adapter.name
        self.device, self.dtype = device, model.dtype
        self.latent_channels = self.adapter.latent_channels
        self.downsample = self.adapter.downsample
        self.frame_rule = self.adapter.frame_rule
        self.normalisation = self.adapter.normalisation
        self.decode_options = self.adapter.decode_options
        self.causal = self.adapter.causal
        # diffusers' own memory savers: slicing runs a call's batch one sample at a time (same values);
        # tiling runs large frames in overlapping tiles (values change slightly at the seams: recorded)
        if slicing:
            self.model.enable_slicing()
        if tiling:
            self.model.enable_tiling()
        self.memory = {"slicing": slicing, "tiling": tiling}

    @torch.no_grad()
    def _encode_call(self, clips: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        b = len(clips)
        pixels = frames_to_pixels(rearrange(torch.from_numpy(np.ascontiguousarray(clips)), "b t h w c -> (b t) h w c"))
        pixels = pixels.to(self.device, self.dtype)
        if self.video:
            posterior = self.adapter.encode(rearrange(pixels, "(b t) c h w -> b c t h w", b=b))
            mean, std = (rearrange(v.float(), "b c t h w -> b t c h w") for v in (posterior.mean, posterior.std))
        else:
            posterior = self.adapter.encode(pixels)
            mean, std = (rearrange(v.float(), "(b t) c h w -> b t c h w", b=b) for v in (posterior.mean, posterior.std))
        return self.normalisation.normalise(mean, 2).cpu(), self.normalisation.normalise_std(std, 2).cpu()

    @torch.no_grad()
    def _decode_call(self, latents: torch.Tensor) -> np.ndarray:
        b = latents.shape[0]
        z = self.normalisation.denormalise(latents.to(self.device), 2).to(self.dtype)
        if self.video:
            pixels = rearrange(self.adapter.decode(rearrange(z, "b t c h w -> b c t h w")), "b c t h w -> (b t) c h w")
        else:
            pixels = self.adapter.decode(rearrange(z, "b t c h w -> (b t) c h w"))
        return rearrange(pixels_to_frames(pixels), "(b t) h w c -> b t h w c", b=b)


def _read_config(path: str, subfolder: str | None = None, local_files_only: bool = False, **_) -> dict:
    """A model folder's config.json (local or on the hub), as `load_pretrained` calls a loader."""
    from diffusers import AutoModel

    kwargs = {"subfolder": subfolder} if subfolder else {}
    config = AutoModel.load_config(path, local_files_only=local_files_only, **kwargs)
    return config if isinstance(config, dict) else config[0]


def load_vae(
    spec: str = DEFAULT_VAE,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    slicing: bool = False,
    tiling: bool = False,
) -> VAE:
    """ "pixel", "pixel-video", or a diffusers VAE by hub name or folder ("NAME_OR_PATH[:SUBFOLDER]"; a model
    folder's vae/ is found), its class (so its family) picked from the folder's config.json."""
    if spec in (PIXEL, PIXEL_VIDEO):
        if slicing or tiling:
            raise GentronError(
                f"VAE slicing and tiling do not apply to the {spec} latent (no VAE network runs)",
                "drop --vae-slicing / --vae-tiling",
            )
        return PixelVAE() if spec == PIXEL else PixelVideoVAE()
    from pipelines.model.vae_families import FAMILIES, family_names

    config = load_pretrained(_read_config, spec, "VAE", default_subfolder="vae")
    class_name = config.get("_class_name")
    family = FAMILIES.get(class_name)
    if family is None:
        raise GentronError(
            f"{spec} holds a {class_name or 'model without a _class_name'}, not a VAE of a family gentron loads",
            f"pass a VAE of one of the families {family_names()} (diffusers classes "
            f"{', '.join(FAMILIES)}), or 'pixel' / 'pixel-video'",
        )
    import diffusers

    device = device if isinstance(device, torch.device) else resolve_device(device)
    dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, device)
    model = load_pretrained(
        getattr(diffusers, class_name).from_pretrained, spec, "VAE", default_subfolder="vae", torch_dtype=dtype
    )
    return DiffusersVAE(model, spec, device, slicing=slicing, tiling=tiling)
