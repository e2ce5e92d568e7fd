"""The metrics asked of an evaluation, as `gentron eval` and `gentron train --eval-*` name them, and their one check.

Light to import (no torch): training's config checks its evaluation options with it before anything loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.errors import require

PROBES = ("toy",)  # the analytic probes (pipelines/evaluate/probe.py)


@dataclass(frozen=True)
class MetricOptions:
    clip: str | None = None  # CLIP model for the CLIP score (hub name or folder)
    reference: str | Path | None = None  # FID reference: image folder, shards, or .npz statistics
    inception: str | Path | None = None  # FID Inception-v3 weights file
    probe: str | None = None  # "toy"
    given: bool = False  # gentron eval --given: how videos keep the frames they were given

    def check(self, prefix: str = "--") -> None:
        """At least one metric, FID's two inputs together, a known probe; `prefix` spells the options in messages
        ("--" for `gentron eval`, "--eval-" for `gentron train`)."""
        require(
            self.given or any(v is not None for v in (self.clip, self.reference, self.inception, self.probe)),
            "no metric asked for" if prefix == "--" else f"{prefix}every needs a metric",
            f"pass {prefix}clip NAME_OR_PATH, {prefix}reference REF {prefix}inception WEIGHTS, "
            f"{prefix}probe toy" + (" and/or --given" if prefix == "--" else ""),
        )
        require(
            (self.reference is None) == (self.inception is None),
            f"FID needs both {prefix}reference and {prefix}inception",
            f"pass {prefix}reference FOLDER_OR_SHARDS_OR_NPZ {prefix}inception pt_inception-2015-12-05-6726825d.pth",
        )
        require(
            self.probe is None or self.probe in PROBES,
            f"unknown {prefix}probe {self.probe!r}",
            f"use {prefix}probe {' or '.join(PROBES)}",
        )
