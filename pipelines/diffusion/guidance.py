"""Classifier-free (text) and motion-free guidance, as in GenTron (Chen et al., CVPR 2024, arXiv 2312.04557).

    eps = eps(x, 0, 0) + lT * (eps(x, cT, cM) - eps(x, 0, cM)) + lM * (eps(x, 0, cM) - eps(x, 0, 0))

"0" text is the empty-caption embedding, cM is temporal attention on, "0" motion is `motion_free=True`.
All evaluations of one step go through the model as one batch. Exact reductions of the formula pick
the smaller batch: lM = 1 is CFG on the motion branch (2B), lT = lM = 1 is the conditional prediction (B).

With given frames cF (image-to-video, continuation) a third guidance, on the condition (scale lC), joins as the
innermost term, so the frames are held in every branch unless condition guidance is asked for:

    eps = eps(x, 0, 0, 0) + lC * (eps(x, cF, 0, 0) - eps(x, 0, 0, 0))
                          + lM * (eps(x, cF, 0, cM) - eps(x, cF, 0, 0))
                          + lT * (eps(x, cF, cT, cM) - eps(x, cF, 0, cM))      (arguments: frames, text, motion)

Its motion-free branch eps(x, cF, 0, 0) is the still of the given frames, so motion guidance pushes away from a
still of them. The reductions again skip branches: lC = 1 is GenTron's formula with the frames in every branch
(3B; lM = 1 too: 2B; all three 1: B); lC != 1 needs all four (4B).
"""

from __future__ import annotations

import torch
from einops import repeat

from pipelines.diffusion.gaussian import Model, channel_dim, split_prediction
from pipelines.errors import GentronError
from pipelines.model.conditioning import FrameCondition, TextCondition


def guided_prediction(
    model: Model,
    x: torch.Tensor,
    timestep: torch.Tensor | int,
    text: TextCondition,
    uncond_text: TextCondition | None = None,
    cfg_scale: float = 1.0,
    mfg_scale: float = 1.0,
    frames: FrameCondition | None = None,
    condition_scale: float = 1.0,
) -> torch.Tensor:
    """Guided model output for latents `x` at `timestep` (scalar or (B,)); with `frames`, also guided on them by
    `condition_scale` (see the module docstring).

    Guidance mixes the epsilon channels; with learned sigma the conditional variance channels are kept.
    """
    batch = x.shape[0]
    t = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(batch)
    if frames is not None:
        return frame_guided_prediction(model, x, t, text, uncond_text, cfg_scale, mfg_scale, frames, condition_scale)
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


def frame_guided_prediction(
    model: Model,
    x: torch.Tensor,
    t: torch.Tensor,
    text: TextCondition,
    uncond_text: TextCondition | None,
    cfg_scale: float,
    mfg_scale: float,
    frames: FrameCondition,
    condition_scale: float,
) -> torch.Tensor:
    """The three guidances of a video given frames, in one model call over the branches the scales need.

    The chain of the module docstring, eps = e0 + lC (e1 - e0) + lM (e2 - e1) + lT (e3 - e2) over the branches
    e0 = (no frames, no text, motion-free), e1 = (frames, no text, motion-free), e2 = (frames, no text, moving),
    e3 = (frames, text, moving), starts at the first branch whose scale is not 1: a scale of 1 at the start of the
    chain cancels the branch before it exactly.
    """
    if x.ndim != 5:
        raise GentronError(f"given frames need video latents (B, T, C, H, W), got {tuple(x.shape)}")
    batch = x.shape[0]
    scales = (condition_scale, mfg_scale, cfg_scale)  # of e1 - e0, e2 - e1, e3 - e2
    first = next((k for k, scale in enumerate(scales) if scale != 1.0), 3)
    if first < 3 and uncond_text is None:
        raise ValueError("guidance needs uncond_text (the empty-caption embeddings)")
    branches = [  # (frames, text, motion-free) of e0 .. e3
        (frames.hidden(), uncond_text, True),
        (frames, uncond_text, True),
        (frames, uncond_text, False),
        (frames, text, False),
    ][first:]
    n = len(branches)
    output = model(
        repeat(x, "b ... -> (n b) ...", n=n),
        repeat(t, "b -> (n b)", n=n),
        TextCondition.cat([b[1] for b in branches]),
        motion_free=torch.tensor([b[2] for b in branches], device=x.device).repeat_interleave(batch),
        frames=FrameCondition.cat([b[0] for b in branches]),
    )
    outputs = output.chunk(n, dim=0)
    eps = [split_prediction(o, x)[0] for o in outputs]
    guided = eps[0]
    for k in range(1, n):
        guided = guided + scales[first + k - 1] * (eps[k] - eps[k - 1])
    _, var_values = split_prediction(outputs[-1], x)
    if var_values is None:
        return guided
    return torch.cat([guided, var_values], dim=channel_dim(x))
