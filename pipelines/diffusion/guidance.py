"""Classifier-free (text) and motion-free guidance, as in GenTron (Chen et al., CVPR 2024, arXiv 2312.04557).

    eps = eps(x, 0, 0) + lT * (eps(x, cT, cM) - eps(x, 0, cM)) + lM * (eps(x, 0, cM) - eps(x, 0, 0))

"0" text is the empty-caption embedding, cM is temporal attention on, "0" motion is `motion_free=True`.
All evaluations of one step go through the model as one batch. Exact reductions of the formula pick
the smaller batch: lM = 1 is CFG on the motion branch (2B), lT = lM = 1 is the conditional prediction (B).
"""

from __future__ import annotations

import torch
from einops import repeat

from pipelines.diffusion.gaussian import Model, channel_dim, split_prediction
from pipelines.errors import GentronError
from pipelines.model.conditioning import TextCondition


def guided_prediction(
    model: Model,
    x: torch.Tensor,
    timestep: torch.Tensor | int,
    text: TextCondition,
    uncond_text: TextCondition | None = None,
    cfg_scale: float = 1.0,
    mfg_scale: float = 1.0,
) -> torch.Tensor:
    """Guided model output for latents `x` at `timestep` (scalar or (B,)).

    Guidance mixes the epsilon channels; with learned sigma the conditional variance channels are kept.
    """
    batch = x.shape[0]
    t = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(batch)
    use_mfg = mfg_scale != 1.0
    if use_mfg and x.ndim != 5:
        raise GentronError(
            f"motion-free guidance (scale {mfg_scale}) needs video latents (B, T, C, H, W), got {tuple(x.shape)}",
            "set the motion guidance scale to 1.0 for images",
        )
    if cfg_scale == 1.0 and not use_mfg:
        return model(x, t, text)
    if uncond_text is None:
        raise ValueError("guidance needs uncond_text (the empty-caption embeddings)")

    branches = 3 if use_mfg else 2
    texts = [text, uncond_text, uncond_text][:branches]
    # motion flags: (cT, cM), (0, cM), (0, 0)
    motion_free = None
    if use_mfg:
        motion_free = torch.tensor([False, False, True], device=x.device).repeat_interleave(batch)
    output = model(
        repeat(x, "b ... -> (n b) ...", n=branches),
        repeat(t, "b -> (n b)", n=branches),
        TextCondition.cat(texts),
        motion_free=motion_free,
    )
    outputs = output.chunk(branches, dim=0)
    eps = [split_prediction(o, x)[0] for o in outputs]
    if use_mfg:
        eps_cond, eps_motion, eps_none = eps
        guided = eps_none + cfg_scale * (eps_cond - eps_motion) + mfg_scale * (eps_motion - eps_none)
    else:
        eps_cond, eps_uncond = eps
        guided = eps_uncond + cfg_scale * (eps_cond - eps_uncond)

    _, var_values = split_prediction(outputs[0], x)
    if var_values is None:
        return guided
    return torch.cat([guided, var_values], dim=channel_dim(x))
