"""What a GenTron model is conditioned on besides the timestep: text (`TextCondition`) and given frames
(`FrameCondition`).

Text: everything is keyed by the encoder's name ("clip", "t5", ...), the name its arrays carry in a
shard (`clip.npy`, `clip_pooled.npy`) and in the model config's `text_inputs`.
Encoders store only the valid tokens of each caption (see docs/data-format.md); `TextCondition.collate`
pads them to a fixed length and builds the masks, so padding never changes the model's output.

Frames: the latent frames a video must keep (image-to-video, continuation, first and last frame), as a mask
over latent frames and the latents of the given ones; the model reads them as extra input channels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

POOLED_SUFFIX = "_pooled"  # a per-caption array "<name>_pooled" (D,) is encoder <name>'s pooled vector


def pooled_array(name: str) -> str:
    """The array name of encoder `name`'s pooled vector ("clip" -> "clip_pooled")."""
    return name + POOLED_SUFFIX


@dataclass
class TextCondition:
    """Per-batch text embeddings, keyed by encoder name. Encoders the model does not use may be absent.

    tokens[name]: (B, L, D) token states     masks[name]: (B, L) bool, True = real token (absent: all real)
    pooled[name]: (B, D) the encoder's pooled vector (CLIP's; encoders without one have none)
    """

    tokens: dict[str, torch.Tensor] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    pooled: dict[str, torch.Tensor] = field(default_factory=dict)

    _PARTS = ("tokens", "masks", "pooled")

    def _map(self, fn) -> TextCondition:
        return TextCondition(**{part: {k: fn(v) for k, v in getattr(self, part).items()} for part in self._PARTS})

    def _tensors(self):
        for part in self._PARTS:
            yield from getattr(self, part).values()

    @property
    def batch_size(self) -> int:
        for v in self._tensors():
            return v.shape[0]
        raise ValueError("empty TextCondition")

    def mask(self, name: str) -> torch.Tensor:
        """(B, L) bool mask of encoder `name`'s tokens (all True when none was given)."""
        tokens = self.tokens[name]
        mask = self.masks.get(name)
        if mask is None:
            return torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return mask.bool()

    def mean_tokens(self, name: str) -> torch.Tensor:
        """(B, D) masked mean of encoder `name`'s tokens: its pooled vector when it has none of its own."""
        tokens = self.tokens[name]
        mask = self.mask(name).unsqueeze(-1).to(tokens.dtype)
        return (tokens * mask).sum(1) / mask.sum(1).clamp(min=1)

    def to(self, device=None, dtype=None) -> TextCondition:
        """Move to device; cast floating tensors (not masks) to dtype."""
        return self._map(lambda v: v.to(device=device, dtype=dtype if v.is_floating_point() else None))

    def index(self, idx) -> TextCondition:
        return self._map(lambda v: v[idx])

    def repeat_interleave(self, n: int) -> TextCondition:
        """Each sample n times in a row (b -> b*n), e.g. one caption per frame."""
        return self._map(lambda v: v.repeat_interleave(n, dim=0))

    def equal(self, other: TextCondition) -> bool:
        """The same encoders with identical tensors."""
        return all(
            getattr(self, p).keys() == getattr(other, p).keys()
            and all(torch.equal(v, getattr(other, p)[k]) for k, v in getattr(self, p).items())
            for p in self._PARTS
        )

    @staticmethod
    def cat(conds: Sequence[TextCondition]) -> TextCondition:
        """Concatenate along the batch. All parts need the same encoders; token lengths may differ: the
        shorter parts are zero-padded and masked, which changes no output (padding is never attended)."""
        out = TextCondition()
        for part in TextCondition._PARTS:
            names = [set(getattr(c, part)) for c in conds]
            if any(n != names[0] for n in names):
                raise ValueError(
                    f"cannot concatenate: {part} of encoders {sorted(names[0] ^ set.union(*names))} missing in some "
                    "parts"
                )
        for name in conds[0].tokens:
            length = max(c.tokens[name].shape[1] for c in conds)
            out.tokens[name] = torch.cat([_pad(c.tokens[name], length) for c in conds])
            out.masks[name] = torch.cat([_pad(c.mask(name), length) for c in conds])
        for name in conds[0].pooled:
            out.pooled[name] = torch.cat([c.pooled[name] for c in conds])
        return out

    @staticmethod
    def collate(
        samples: Sequence[Mapping[str, np.ndarray]],
        lengths: Mapping[str, int | None] | None = None,
        **name_lengths: int | None,
    ) -> TextCondition:
        """Batch per-sample arrays as stored in shards.

        Each sample maps array names to arrays: "<name>" (n, D) holds encoder <name>'s valid tokens only,
        "<name>_pooled" (D,) its pooled vector. Token arrays are zero-padded (or truncated) to
        `lengths[name]` (also given as `<name>_length=`; default: the longest in the batch) and masks mark
        the real tokens. All samples must hold the same arrays.
        """
        lengths = dict(lengths or {}) | {k.removesuffix("_length"): v for k, v in name_lengths.items()}
        out = TextCondition()
        if not samples:
            return out
        names = set(samples[0])
        for s in samples:
            if set(s) != names:
                raise ValueError(f"some samples lack text arrays {sorted(names ^ set(s))}")
        for name in sorted(names):
            arrays = [s[name] for s in samples]
            if name.endswith(POOLED_SUFFIX):
                out.pooled[name.removesuffix(POOLED_SUFFIX)] = torch.from_numpy(
                    np.stack([np.asarray(a, dtype=np.float32) for a in arrays])
                )
                continue
            target = lengths.get(name) or max(a.shape[0] for a in arrays)
            tokens = torch.zeros(len(arrays), target, arrays[0].shape[1], dtype=torch.float32)
            mask = torch.zeros(len(arrays), target, dtype=torch.bool)
            for i, a in enumerate(arrays):
                n = min(a.shape[0], target)
                tokens[i, :n] = torch.from_numpy(np.asarray(a[:n], dtype=np.float32))
                mask[i, :n] = True
            out.tokens[name], out.masks[name] = tokens, mask
        return out

    # A flat {key: tensor} form, for a DataLoader batch dict ("text.tokens.clip", "text.masks.clip",
    # "text.pooled.clip").

    def flat(self, prefix: str = "text.") -> dict[str, torch.Tensor]:
        return {f"{prefix}{part}.{name}": v for part in self._PARTS for name, v in getattr(self, part).items()}

    @staticmethod
    def from_flat(batch: Mapping[str, torch.Tensor], prefix: str = "text.") -> TextCondition:
        out = TextCondition()
        for key, value in batch.items():
            if key.startswith(prefix):
                part, name = key[len(prefix) :].split(".", 1)
                getattr(out, part)[name] = value
        return out


def _pad(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad axis 1 to `length` (tokens with zeros, masks with False)."""
    if x.shape[1] == length:
        return x
    pad = x.new_zeros((x.shape[0], length - x.shape[1], *x.shape[2:]))
    return torch.cat([x, pad], dim=1)


@dataclass
class FrameCondition:
    """The latent frames each video of a batch is given and must keep (image-to-video, continuation, first-last).

    mask: (B, T) bool, True where latent frame t of sample b is given.
    latents: (B, T, C, H, W): the given frames' latents, zeros at every other frame.

    Frames are counted in latent frames: with a VAE that compresses time, a clip's first frame is a latent frame
    of its own and every later latent frame stands for several frames. The model reads the condition as
    1 + C input channels per latent frame, [mask | latents] (`channels`); a sample with no frame given reads
    zeros there, which is exactly what a model without frame conditioning reads.
    """

    mask: torch.Tensor
    latents: torch.Tensor

    def __post_init__(self):
        if self.mask.ndim != 2 or self.latents.ndim != 5 or tuple(self.latents.shape[:2]) != tuple(self.mask.shape):
            raise ValueError(
                f"a frame condition needs a (B, T) mask and (B, T, C, H, W) latents, got {tuple(self.mask.shape)} and "
                f"{tuple(self.latents.shape)}"
            )

    @staticmethod
    def given(latents: torch.Tensor, mask: torch.Tensor) -> FrameCondition:
        """The frames of `latents` (B, T, C, H, W) where `mask` (B, T) is True; the others are zeroed."""
        mask = mask.bool().to(latents.device)
        return FrameCondition(mask, latents * mask[:, :, None, None, None].to(latents.dtype))

    @staticmethod
    def nothing(like: torch.Tensor) -> FrameCondition:
        """No frame given, for latents shaped like `like` (B, T, C, H, W): a text-to-video sample."""
        return FrameCondition(torch.zeros(like.shape[:2], dtype=torch.bool, device=like.device), torch.zeros_like(like))

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    def channels(self) -> torch.Tensor:
        """(B, T, 1 + C, H, W): the mask as a constant plane, then the latents (the model's extra input channels)."""
        plane = (
            self.mask[:, :, None, None, None]
            .to(self.latents.dtype)
            .expand(*self.latents.shape[:2], 1, *self.latents.shape[3:])
        )
        return torch.cat([plane, self.latents], dim=2)

    def spread(self) -> torch.Tensor:
        """(B, T, C, H, W): every frame holding the latents of the nearest given frame (the earlier one of two as
        near; zeros where nothing is given): what the frames of a motion-free sample read, as they cannot attend
        to the given frames."""
        frames = torch.arange(self.mask.shape[1], device=self.mask.device)
        distance = (frames[:, None] - frames[None, :]).abs()  # (T, T): from frame t to frame j
        far = torch.where(self.mask[:, None, :], distance[None], self.mask.shape[1])  # (B, T, T); not given: too far
        nearest = far.argmin(dim=2)  # the first of the nearest
        index = nearest[:, :, None, None, None].expand_as(self.latents)
        return torch.gather(self.latents, 1, index)

    def hidden(self) -> FrameCondition:
        """The same batch with nothing given (the unconditional branch of condition guidance, condition dropout)."""
        return FrameCondition.nothing(self.latents)

    def keep(self, x: torch.Tensor, given: torch.Tensor | None = None) -> torch.Tensor:
        """`x` (B, T, C, H, W) with its given frames replaced by `given` (default: the condition's latents)."""
        source = self.latents if given is None else given
        return torch.where(self.mask[:, :, None, None, None], source.to(x.dtype), x)

    def to(self, device=None, dtype=None) -> FrameCondition:
        return FrameCondition(self.mask.to(device), self.latents.to(device=device, dtype=dtype))

    def index(self, idx) -> FrameCondition:
        return FrameCondition(self.mask[idx], self.latents[idx])

    def equal(self, other: FrameCondition) -> bool:
        return torch.equal(self.mask, other.mask) and torch.equal(self.latents, other.latents)

    @staticmethod
    def cat(conds: Sequence[FrameCondition]) -> FrameCondition:
        """Concatenate along the batch."""
        return FrameCondition(torch.cat([c.mask for c in conds]), torch.cat([c.latents for c in conds]))
