"""A tiny ICC v2 matrix/TRC colour profile written from first principles (header, tag table, XYZ colorants adapted
to D50 with Bradford, one gamma curve), and the colour maths to check a conversion against, independent of
littlecms. No ICC file ships with the test environment, so the tests write their own Display P3."""

from __future__ import annotations

import struct

import numpy as np

BRADFORD = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])
D65, D50 = np.array([0.95047, 1.0, 1.08883]), np.array([0.96422, 1.0, 0.82521])


def rgb_to_xyz(primaries, white):
    """3x3 matrix: linear RGB -> XYZ, white (Y=1) from xy chromaticities."""
    cols = np.array([[x / y, 1.0, (1 - x - y) / y] for x, y in primaries]).T
    wx, wy = white
    w = np.array([wx / wy, 1.0, (1 - wx - wy) / wy])
    return cols * np.linalg.solve(cols, w)


def adapt(src_white, dst_white):
    cone_src, cone_dst = BRADFORD @ src_white, BRADFORD @ dst_white
    return np.linalg.inv(BRADFORD) @ np.diag(cone_dst / cone_src) @ BRADFORD


def s15(v):
    return struct.pack(">i", int(round(v * 65536)))


P3 = [(0.680, 0.320), (0.265, 0.690), (0.150, 0.060)]  # Display P3 primaries (x, y), D65 white
SRGB = [(0.640, 0.330), (0.300, 0.600), (0.150, 0.060)]
D65_XY = (0.3127, 0.3290)
GAMMA = 563 / 256  # 2.2 as an ICC u8Fixed8 curve stores it


def icc_profile(description: str, primaries, white=D65_XY) -> bytes:
    """An RGB display profile: `primaries` and `white` as xy chromaticities, a pure gamma of GAMMA per channel."""
    m = adapt(D65, D50) @ rgb_to_xyz(primaries, white)  # colorants in the D50 PCS
    gamma_u8f8 = round(GAMMA * 256)

    def xyz(v):
        return b"XYZ " + bytes(4) + b"".join(s15(c) for c in v)

    text = description.encode("ascii") + b"\0"
    desc = (
        b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(4) + bytes(4) + bytes(2) + bytes(1) + bytes(67)
    )
    curv = b"curv" + bytes(4) + struct.pack(">IH", 1, gamma_u8f8) + bytes(2)
    tags = [
        (b"desc", desc),
        (b"wtpt", xyz(D50)),
        (b"rXYZ", xyz(m[:, 0])),
        (b"gXYZ", xyz(m[:, 1])),
        (b"bXYZ", xyz(m[:, 2])),
        (b"rTRC", curv),
        (b"gTRC", curv),
        (b"bTRC", curv),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, data = struct.pack(">I", len(tags)), b""
    for sig, body in tags:
        while len(body) % 4:
            body += b"\0"
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = (
        struct.pack(">I", size)
        + bytes(4)
        + struct.pack(">I", 0x02100000)
        + b"mntr"
        + b"RGB "
        + b"XYZ "
        + bytes(12)
        + b"acsp"
        + bytes(4)
        + bytes(4)
        + bytes(4)
        + bytes(4)
        + bytes(8)
        + bytes(4)
        + s15(D50[0])
        + s15(D50[1])
        + s15(D50[2])
        + bytes(4)
    )
    header += bytes(128 - len(header))
    return header + table + data


def p3_to_srgb(pixels: np.ndarray) -> np.ndarray:
    """uint8 RGB in the profile `icc_profile(..., P3)` describes -> uint8 sRGB (clipped), computed directly."""
    linear = (pixels / 255.0) ** GAMMA
    xyz = linear @ rgb_to_xyz(P3, D65_XY).T
    srgb = np.clip(xyz @ np.linalg.inv(rgb_to_xyz(SRGB, D65_XY)).T, 0, 1)
    encoded = np.where(srgb <= 0.0031308, 12.92 * srgb, 1.055 * srgb ** (1 / 2.4) - 0.055)
    return np.round(encoded * 255).astype(np.uint8)
