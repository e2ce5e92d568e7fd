"""The text conditioning a GenTron model takes: encoder token states, masks and a pooled vector.

Encoders store only the valid tokens of each caption (see docs/data-format.md); `TextCondition.collate`
pads them to a fixed length and builds the masks, so padding never changes the model's output.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence

import numpy as np
import torch


@dataclass
class TextCondition:
    """Per-batch text embeddings. Fields for an encoder the model does not use may be None.

    clip_tokens: (B, Lc, Dc) CLIP token states     clip_mask: (B, Lc) bool, True = real token
    clip_pooled: (B, Dc) CLIP pooled vector
    t5_tokens:   (B, Lt, Dt) T5 token states       t5_mask:   (B, Lt) bool, True = real token
    """

    clip_tokens: torch.Tensor | None = None
    clip_mask: torch.Tensor | None = None
    clip_pooled: torch.Tensor | None = None
    t5_tokens: torch.Tensor | None = None
    t5_mask: torch.Tensor | None = None

    def _map(self, fn) -> "TextCondition":
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None})

    @property
    def batch_size(self) -> int:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                return v.shape[0]
        raise ValueError("empty TextCondition")

    def to(self, device=None, dtype=None) -> "TextCondition":
        """Move to device; cast floating tensors (not masks) to dtype."""
        return self._map(lambda v: v.to(device=device, dtype=dtype if v.is_floating_point() else None))

    def index(self, idx) -> "TextCondition":
        return self._map(lambda v: v[idx])

    def repeat_interleave(self, n: int) -> "TextCondition":
        """Each sample n times in a row (b -> b*n), e.g. one caption per frame."""
        return self._map(lambda v: v.repeat_interleave(n, dim=0))

    @staticmethod
    def cat(conds: Sequence["TextCondition"]) -> "TextCondition":
        """Concatenate along the batch (all parts must have the same fields and token lengths)."""
        out = {}
        for f in fields(TextCondition):
            parts = [getattr(c, f.name) for c in conds]
            if all(p is None for p in parts):
                continue
            if any(p is None for p in parts):
                raise ValueError(f"cannot concatenate: field {f.name} missing in some parts")
            out[f.name] = torch.cat(parts, dim=0)
        return TextCondition(**out)

    @staticmethod
    def collate(
        samples: Sequence[dict],
        clip_length: int | None = None,
        t5_length: int | None = None,
    ) -> "TextCondition":
        """Batch per-sample arrays as stored in shards.

        Each sample is a dict with any of: "clip" (n, Dc), "clip_pooled" (Dc,), "t5" (n, Dt)
        holding the valid tokens only. Token arrays are zero-padded (or truncated) to `clip_length` /
        `t5_length` (default: longest in the batch) and masks mark the real tokens.
        """
        out: dict[str, torch.Tensor] = {}
        for name, length in (("clip", clip_length), ("t5", t5_length)):
            arrays = [s.get(name) for s in samples]
            if all(a is None for a in arrays):
                continue
            if any(a is None for a in arrays):
                raise ValueError(f"some samples lack text field {name!r}")
            target = length or max(a.shape[0] for a in arrays)
            dim = arrays[0].shape[1]
            tokens = torch.zeros(len(arrays), target, dim, dtype=torch.float32)
            mask = torch.zeros(len(arrays), target, dtype=torch.bool)
            for i, a in enumerate(arrays):
                n = min(a.shape[0], target)
                tokens[i, :n] = torch.from_numpy(np.asarray(a[:n], dtype=np.float32))
                mask[i, :n] = True
            out[f"{name}_tokens"] = tokens
            out[f"{name}_mask"] = mask
        pooled = [s.get("clip_pooled") for s in samples]
        if any(p is not None for p in pooled):
            if any(p is None for p in pooled):
                raise ValueError("some samples lack text field 'clip_pooled'")
            out["clip_pooled"] = torch.from_numpy(np.stack([np.asarray(p, dtype=np.float32) for p in pooled]))
        return TextCondition(**out)
