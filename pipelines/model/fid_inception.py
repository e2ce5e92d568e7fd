"""The Inception-v3 network of FID, as plain torch modules (no torchvision).

FID is only comparable between papers when computed with one particular network: the TensorFlow
Inception-v3 graph of 2015-12-05 that the original FID code used, ported to PyTorch as pytorch-fid's and
torch-fidelity's `pt_inception-2015-12-05-6726825d.pth`. That graph differs from torchvision's
Inception-v3 in four places, reproduced here: the 3x3 average pools of the A, C and first E blocks
leave the zero padding out of the average (`count_include_pad=False`), the last E block pools with a max
instead, and the classifier has 1008 classes. Module names follow torchvision's `Inception3`, so the
state-dict keys are those of the weights file (`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_mean`,
..., `fc.weight`) and the file loads strictly, with `torch.load(weights_only=True)` or from safetensors.

Features are the 2048-d output of the final average pool (torch-fidelity's "2048", pytorch-fid's
block 3), after torch-fidelity's preprocessing: uint8 pixels resized to 299 x 299 by TensorFlow 1's
bilinear resize (`resize_bilinear_tf1`), then scaled to [-1, 1) by (x - 128) / 128.

Every width can be scaled by `width` (a multiple of 1/32, so the stem's 32 channels stay whole): the
tests save a tiny random network of this same code and load it by path exactly like the real file. A
file's width is read off its stem convolution, so a weights file needs no config beside it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.errors import GentronError

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_NAME
INPUT_SIZE = 299
NUM_CLASSES = 1008
STEM_CHANNELS = 32  # Conv2d_1a_3x3's output channels at width 1
STEM_KEY = "Conv2d_1a_3x3.conv.weight"


class ConvBNReLU(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, as TensorFlow's), ReLU: torchvision's BasicConv2d."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's average pool divides by the pixels inside the frame only
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int, ch):
        super().__init__()
        self.branch1x1 = ConvBNReLU(in_channels, ch(64), 1)
        self.branch5x5_1 = ConvBNReLU(in_channels, ch(48), 1)
        self.branch5x5_2 = ConvBNReLU(ch(48), ch(64), 5, padding=2)
        self.branch3x3dbl_1 = ConvBNReLU(in_channels, ch(64), 1)
        self.branch3x3dbl_2 = ConvBNReLU(ch(64), ch(96), 3, padding=1)
        self.branch3x3dbl_3 = ConvBNReLU(ch(96), ch(96), 3, padding=1)
        self.branch_pool = ConvBNReLU(in_channels, ch(pool_features), 1)
        self.out_channels = ch(64) + ch(64) + ch(96) + ch(pool_features)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_3x3(x))], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17."""

    def __init__(self, in_channels: int, ch):
        super().__init__()
        self.branch3x3 = ConvBNReLU(in_channels, ch(384), 3, stride=2)
        self.branch3x3dbl_1 = ConvBNReLU(in_channels, ch(64), 1)
        self.branch3x3dbl_2 = ConvBNReLU(ch(64), ch(96), 3, padding=1)
        self.branch3x3dbl_3 = ConvBNReLU(ch(96), ch(96), 3, stride=2)
        self.out_channels = ch(384) + ch(96) + in_channels

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """Factorised 7x7 convolutions at 17 x 17."""

    def __init__(self, in_channels: int, channels_7x7: int, ch):
        super().__init__()
        c7 = ch(channels_7x7)
        self.branch1x1 = ConvBNReLU(in_channels, ch(192), 1)
        self.branch7x7_1 = ConvBNReLU(in_channels, c7, 1)
        self.branch7x7_2 = ConvBNReLU(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBNReLU(c7, ch(192), (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBNReLU(in_channels, c7, 1)
        self.branch7x7dbl_2 = ConvBNReLU(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBNReLU(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBNReLU(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBNReLU(c7, ch(192), (1, 7), padding=(0, 3))
        self.branch_pool = ConvBNReLU(in_channels, ch(192), 1)
        self.out_channels = 4 * ch(192)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for conv in (
            self.branch7x7dbl_1,
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            d = conv(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_3x3(x))], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8."""

    def __init__(self, in_channels: int, ch):
        super().__init__()
        self.branch3x3_1 = ConvBNReLU(in_channels, ch(192), 1)
        self.branch3x3_2 = ConvBNReLU(ch(192), ch(320), 3, stride=2)
        self.branch7x7x3_1 = ConvBNReLU(in_channels, ch(192), 1)
        self.branch7x7x3_2 = ConvBNReLU(ch(192), ch(192), (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBNReLU(ch(192), ch(192), (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBNReLU(ch(192), ch(192), 3, stride=2)
        self.out_channels = ch(320) + ch(192) + in_channels

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """Expanded filter bank at 8 x 8. `max_pool`: the FID graph's last block pools with a max, not an average."""

    def __init__(self, in_channels: int, ch, max_pool: bool):
        super().__init__()
        self.branch1x1 = ConvBNReLU(in_channels, ch(320), 1)
        self.branch3x3_1 = ConvBNReLU(in_channels, ch(384), 1)
        self.branch3x3_2a = ConvBNReLU(ch(384), ch(384), (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBNReLU(ch(384), ch(384), (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBNReLU(in_channels, ch(448), 1)
        self.branch3x3dbl_2 = ConvBNReLU(ch(448), ch(384), 3, padding=1)
        self.branch3x3dbl_3a = ConvBNReLU(ch(384), ch(384), (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBNReLU(ch(384), ch(384), (3, 1), padding=(1, 0))
        self.branch_pool = ConvBNReLU(in_channels, ch(192), 1)
        self.max_pool = max_pool
        self.out_channels = ch(320) + 4 * ch(384) + ch(192)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool_3x3(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


def check_width(width: float) -> float:
    if width <= 0 or abs(STEM_CHANNELS * width - round(STEM_CHANNELS * width)) > 1e-9:
        raise ValueError(f"width must be a positive multiple of 1/{STEM_CHANNELS}, got {width}")
    return round(STEM_CHANNELS * width) / STEM_CHANNELS


class FIDInceptionV3(nn.Module):
    """Inception-v3 up to its 2048-d pool features (width 1), with the FID graph's classifier kept so the file loads
    strictly."""

    def __init__(self, width: float = 1.0):
        super().__init__()
        self.width = check_width(width)
        ch = lambda n: max(1, round(n * self.width))  # noqa: E731
        self.Conv2d_1a_3x3 = ConvBNReLU(3, ch(32), 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBNReLU(ch(32), ch(32), 3)
        self.Conv2d_2b_3x3 = ConvBNReLU(ch(32), ch(64), 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBNReLU(ch(64), ch(80), 1)
        self.Conv2d_4a_3x3 = ConvBNReLU(ch(80), ch(192), 3)
        self.Mixed_5b = InceptionA(ch(192), 32, ch)
        self.Mixed_5c = InceptionA(self.Mixed_5b.out_channels, 64, ch)
        self.Mixed_5d = InceptionA(self.Mixed_5c.out_channels, 64, ch)
        self.Mixed_6a = InceptionB(self.Mixed_5d.out_channels, ch)
        self.Mixed_6b = InceptionC(self.Mixed_6a.out_channels, 128, ch)
        self.Mixed_6c = InceptionC(self.Mixed_6b.out_channels, 160, ch)
        self.Mixed_6d = InceptionC(self.Mixed_6c.out_channels, 160, ch)
        self.Mixed_6e = InceptionC(self.Mixed_6d.out_channels, 192, ch)
        self.Mixed_7a = InceptionD(self.Mixed_6e.out_channels, ch)
        self.Mixed_7b = InceptionE(self.Mixed_7a.out_channels, ch, max_pool=False)
        self.Mixed_7c = InceptionE(self.Mixed_7b.out_channels, ch, max_pool=True)
        self.feature_dim = self.Mixed_7c.out_channels  # 2048 at width 1
        self.fc = nn.Linear(self.feature_dim, NUM_CLASSES)  # unused for FID; part of the weights file

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 (or float 0..255) RGB -> (N, feature_dim) float32 pool features."""
        x = resize_bilinear_tf1(pixels.to(torch.float32), INPUT_SIZE)
        x = (x - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)
        return x.mean(dim=(2, 3))


def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) float -> (N, C, size, size), bilinear as TensorFlow 1's resize (align_corners=False).

    Output pixel i reads input position i * in / out (no half-pixel offset, no antialiasing), between
    floor and floor + 1 (clamped to the edge): what the original FID code did and torch-fidelity
    reproduces, rows blended after columns as there."""

    def taps(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        position = torch.arange(size, dtype=torch.float32, device=x.device) * torch.tensor(
            n_in / size, dtype=torch.float32
        )
        low = position.long()
        return low, (low + 1).clamp(max=n_in - 1), (position - low.float()).to(x.dtype)

    def blend_columns(t: torch.Tensor) -> torch.Tensor:  # gathers along contiguous rows: twice as fast as along columns
        t = t.transpose(2, 3).contiguous()
        left, right = t.index_select(2, x0), t.index_select(2, x1)
        return (left + (right - left) * dx.view(-1, 1)).transpose(2, 3)

    y0, y1, dy = taps(x.shape[2])
    x0, x1, dx = taps(x.shape[3])
    top, bottom = blend_columns(x.index_select(2, y0)), blend_columns(x.index_select(2, y1))
    return top + (bottom - top) * dy.view(-1, 1)


# ---------------------------------------------------------------------------------------------
# Loading by path: the real weights file and the tiny test network alike


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch.save file (tensors only: weights_only=True)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("the file holds no state dict of tensors")
    return state


def load_fid_inception(path: str | Path, device: torch.device | str = "cpu") -> FIDInceptionV3:
    """The FID Inception network from a weights file (pytorch-fid's pt_inception-2015-12-05, or a tiny one
    saved by `save_fid_inception`), frozen in eval mode. Never downloads."""
    path = Path(path).expanduser()
    hint = (
        f"download {FID_WEIGHTS_NAME} once ({FID_WEIGHTS_URL}; pytorch-fid and torch-fidelity use the same file) "
        "and pass its path to --inception"
    )
    if not path.is_file():
        raise GentronError(f"FID Inception weights not found: {path}", hint)
    try:
        state = read_state_dict(path)
    except Exception as exc:  # torch.load raises several types for a damaged or foreign file
        raise GentronError(f"cannot read FID Inception weights {path}: {exc}", hint) from None
    stem = state.get(STEM_KEY)
    if stem is None or stem.ndim != 4:
        raise GentronError(f"{path} is not an Inception-v3 state dict (no {STEM_KEY})", hint)
    try:
        network = FIDInceptionV3(width=stem.shape[0] / STEM_CHANNELS)
    except ValueError as exc:
        raise GentronError(f"{path}: {exc}", hint) from None
    expected = {k for k in network.state_dict() if not k.endswith("num_batches_tracked")}
    given = {k for k in state if not k.endswith("num_batches_tracked")}
    if expected != given:
        missing, unexpected = sorted(expected - given), sorted(given - expected)
        raise GentronError(
            f"{path} does not match the FID Inception-v3: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}",
            hint,
        )
    try:
        network.load_state_dict(state, strict=False)  # strict but for batch-norm step counters, which FID never uses
    except RuntimeError as exc:
        raise GentronError(
            f"{path} does not match the FID Inception-v3: {str(exc).splitlines()[-1].strip()}", hint
        ) from None
    return network.to(device).eval().requires_grad_(False)


def save_fid_inception(network: FIDInceptionV3, path: str | Path) -> Path:
    """Write a network's state dict as the real weights file is written (torch.save), or as safetensors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in network.state_dict().items() if not k.endswith("num_batches_tracked")}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path
