"""The toy datasets are what their captions say, and the probe reads them back correctly."""

import hashlib
import itertools
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pipelines.data.media import decode_clip
from pipelines.evaluate.probe import (
    BACKGROUND,
    CHANCE,
    COLORS,
    DIRECTIONS,
    INVERSE_RELATION,
    PLACES,
    RELATIONS,
    SHAPES,
    SIDE_BAND,
    SIDES,
    centroid,
    direction_of,
    image_caption,
    is_pair_caption,
    largest_component,
    object_centre,
    pair_caption,
    parse_caption,
    parse_pair_caption,
    place_of,
    probe_image,
    probe_pair,
    probe_video,
    read_pair,
    relation_of,
    shape_of,
    video_caption,
)
from pipelines.toy.data import PairDataConfig, ToyDataConfig, draw_pair, make_pair_dataset, make_toy_dataset

SMALL = ToyDataConfig(images_per_combo=1, videos_per_combo=1, video_seconds=1.0)
HELD_OUT = (("red", "triangle"), ("blue", "circle"))
# Every shape at the side places (the learning benchmark's data), and every shape at the quadrants
SIDE_SHAPES = ToyDataConfig(
    images_per_combo=2, videos_per_combo=1, video_seconds=1.0, shapes=SHAPES, places=SIDES, held_out=HELD_OUT
)
QUADRANT_SHAPES = ToyDataConfig(images_per_combo=1, videos_per_combo=0, shapes=SHAPES)

# What the generator wrote for SMALL before it learnt shapes and sides (the quickstart's data must not move):
# a digest of file names, decoded PNG pixels, captions and the raw video frames handed to the encoder.
SMALL_DIGEST = "18fbdb7e25fd074af8060a830c99b0d2837296e855eb5810a577d7ee7272512b"


def _resize(frames: np.ndarray, side: int) -> np.ndarray:
    """PIL bilinear resize of an (H, W, 3) image or a (T, H, W, 3) video, as prep does."""

    def resize(f):
        return np.asarray(Image.fromarray(f).resize((side, side), Image.BILINEAR))

    return resize(frames) if frames.ndim == 3 else np.stack([resize(f) for f in frames])


def _noisy(frames: np.ndarray, rng: np.random.Generator, std: float = 20.0) -> np.ndarray:
    return np.clip(frames + rng.normal(0, std, frames.shape), 0, 255).astype(np.uint8)


def _variants(pixels: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Ground truth as written, at 32 px, and both with noise: what a good model's samples look like."""
    small = _resize(pixels, 32)
    return {"full": pixels, "32px": small, "full+noise": _noisy(pixels, rng), "32px+noise": _noisy(small, rng)}


def _images(dirs):
    for path in sorted(dirs["images"].glob("*.png")):
        yield path, np.asarray(Image.open(path)), path.with_suffix(".txt").read_text()


def _videos(dirs):
    for path in sorted(dirs["videos"].glob("*.mp4")):
        yield path, decode_clip(path.read_bytes()), path.with_suffix(".txt").read_text()


@pytest.fixture(scope="module")
def side_shapes(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("sides"), SIDE_SHAPES)


def test_default_dataset_is_unchanged(tmp_path, monkeypatch):
    written = []
    monkeypatch.setattr(
        "pipelines.toy.data.encode_h264", lambda frames, fps, crf: written.append(np.array(frames)) or b""
    )
    dirs = make_toy_dataset(tmp_path, SMALL)
    digest = hashlib.sha256()
    for path, pixels, caption in _images(dirs):
        digest.update(path.name.encode())
        digest.update(pixels.tobytes())
        digest.update(caption.encode())
    for path in sorted(dirs["videos"].glob("*.txt")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    for frames in written:
        digest.update(frames.tobytes())
    assert digest.hexdigest() == SMALL_DIGEST
    # the same, readably: the first image's square and caption
    image = np.asarray(Image.open(dirs["images"] / "red_top_left_0.png"))
    ys, xs = np.nonzero(image.any(axis=-1))
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (7, 30, 5, 28)
    assert (image[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] == COLORS["red"]).all()
    assert (dirs["images"] / "red_top_left_0.txt").read_text() == "a red square in the top left"
    assert (dirs["videos"] / "yellow_down_0.txt").read_text() == "a yellow square moving down"


def test_dataset_matches_its_captions_according_to_the_probe(tmp_path):
    dirs = make_toy_dataset(tmp_path, SMALL)
    images, videos = list(_images(dirs)), list(_videos(dirs))
    assert len(images) == 16 and len(videos) == 16
    # the quickstart's captions keep the quickstart's score columns (no shape)
    for _path, pixels, caption in images:
        assert probe_image(pixels, caption) == {"color": True, "place": True}, caption
    for _path, frames, caption in videos:
        assert probe_video(frames, caption) == {"color": True, "direction": True, "axis": True}, caption
        assert probe_video(frames, caption, with_shape=True)["shape"] is True


def test_probe_rejects_wrong_content(tmp_path):
    dirs = make_toy_dataset(tmp_path, SMALL)
    image = np.asarray(Image.open(dirs["images"] / "red_top_left_0.png"))
    assert probe_image(image, "a blue square in the top left") == {"color": False, "place": True}
    assert probe_image(image, "a red square in the bottom right") == {"color": True, "place": False}
    assert probe_image(np.zeros_like(image), "a red square in the top left") == {"color": False, "place": False}
    frames = decode_clip((dirs["videos"] / "green_left_0.mp4").read_bytes())
    assert direction_of(frames) == "left" and direction_of(frames[::-1]) == "right"
    assert direction_of(np.repeat(frames[:1], 4, axis=0)) is None  # a still video has no direction
    assert probe_video(frames[::-1], "a green square moving left") == {"color": True, "direction": False, "axis": True}
    assert probe_video(frames, "a green square moving up") == {"color": True, "direction": False, "axis": False}
    assert probe_video(np.repeat(frames[:1], 4, axis=0), "a green square moving left")["axis"] is False


@pytest.mark.parametrize("cfg", [SIDE_SHAPES, QUADRANT_SHAPES], ids=["sides", "quadrants"])
def test_probe_reads_every_shape_and_place_of_ground_truth_images(tmp_path, cfg):
    rng = np.random.default_rng(0)
    dirs = make_toy_dataset(tmp_path, cfg)
    images = list(_images(dirs))
    assert len(images) == len(cfg.combos()) * len(cfg.places) * cfg.images_per_combo
    for _path, pixels, caption in images:
        for name, variant in _variants(pixels, rng).items():
            assert probe_image(variant, caption, with_shape=True) == {"color": True, "place": True, "shape": True}, (
                caption,
                name,
            )
        if cfg.places == SIDES:  # shape is scored by default outside the quickstart's squares at quadrants
            assert "shape" in probe_image(pixels, caption)


def test_probe_reads_every_shape_and_direction_of_ground_truth_videos(side_shapes):
    rng = np.random.default_rng(1)
    videos = list(_videos(side_shapes))
    assert len(videos) == len(SIDE_SHAPES.combos()) * len(DIRECTIONS)
    for _path, frames, caption in videos:
        clip = frames[::3]  # 8 of the 24 decoded frames, as prep picks them
        for name, variant in _variants(clip, rng).items():
            scores = probe_video(variant, caption, with_shape=True)
            assert scores == {"color": True, "direction": True, "axis": True, "shape": True}, (caption, name)
        if parse_caption(caption)["shape"] != "square":  # shape is scored by default for a named non-square
            assert "shape" in probe_video(clip, caption)


def test_probe_marks_exactly_the_attribute_a_wrong_prompt_changes(side_shapes):
    """Each ground-truth image against every prompt that differs in one attribute: that one fails, the rest pass."""
    rng = np.random.default_rng(2)
    for _path, pixels, caption in list(_images(side_shapes))[::3]:
        truth = parse_caption(caption)
        image = _noisy(_resize(pixels, 32), rng)
        for attribute, values in (("color", COLORS), ("shape", SHAPES), ("place", SIDES)):
            for value in values:
                if value == truth[attribute]:
                    continue
                asked = {**truth, attribute: value}
                scores = probe_image(image, image_caption(asked["color"], asked["place"], asked["shape"]))
                assert scores == {"color": True, "shape": True, "place": True, attribute: False}, (caption, asked)
    path, frames, caption = next(v for v in _videos(side_shapes) if "triangle moving right" in v[2])
    color = parse_caption(caption)["color"]
    assert probe_video(frames, video_caption(color, "right", "circle")) == {
        "color": True,
        "direction": True,
        "axis": True,
        "shape": False,
    }
    assert probe_video(frames[::-1], caption) == {"color": True, "direction": False, "axis": True, "shape": True}


def test_probe_of_an_empty_frame_reads_nothing():
    black = np.zeros((32, 32, 3), np.uint8)
    assert shape_of(black) is None and object_centre(black) is None and place_of(black, SIDES) is None
    assert probe_image(black, "a red circle on the left") == {"color": False, "place": False, "shape": False}
    assert probe_video(np.zeros((8, 32, 32, 3), np.uint8), "a red circle moving up") == {
        "color": False,
        "direction": False,
        "axis": False,
        "shape": False,
    }
    speck = black.copy()
    speck[5, 5] = 255  # one stray pixel is no object
    assert shape_of(speck) is None and place_of(speck) is None


def test_side_places_are_where_the_module_says(side_shapes):
    """A side place's box centre lies in the outer third on that side and within SIDE_BAND of the middle across."""
    pixel = 1 / SIDE_SHAPES.image_size  # a triangle's apex row holds no pixel centre: its visible box is a row short
    for _path, pixels, caption in _images(side_shapes):
        side = parse_caption(caption)["place"]
        y, x = object_centre(pixels)
        along, across = (x, y) if side in ("left", "right") else (y, x)
        assert along <= 1 / 3 + pixel if side in ("left", "top") else along >= 2 / 3 - pixel, caption
        assert abs(across - 0.5) <= SIDE_BAND + pixel, caption


def test_shapes_share_one_bounding_box(tmp_path):
    cfg = ToyDataConfig(images_per_combo=1, videos_per_combo=0, shapes=SHAPES, places=("top left",), seed=3)
    dirs = make_toy_dataset(tmp_path, cfg)
    boxes = {}
    for _path, pixels, caption in _images(dirs):
        ys, xs = np.nonzero(pixels.any(axis=-1))
        boxes[parse_caption(caption)["shape"]] = (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
    side = int(cfg.image_size * cfg.square)
    assert boxes["square"] == (side, side) and boxes["circle"] == (side, side)
    assert boxes["triangle"][1] == side and boxes["triangle"][0] >= side - 1  # the apex row's centre is outside


def test_a_shape_covers_the_same_share_of_the_frame_at_every_aspect(tmp_path):
    sizes = ((64, 64), (96, 48), (48, 96), (128, 32))
    cfg = ToyDataConfig(images_per_combo=len(sizes), videos_per_combo=0, places=SIDES, image_sizes=sizes)
    dirs = make_toy_dataset(tmp_path, cfg)
    shares = {}
    for path, pixels, _caption in _images(dirs):
        height, width = pixels.shape[:2]
        ys, xs = np.nonzero(pixels.any(axis=-1))
        box = (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
        assert box[0] == box[1] <= min(width, height) // 2, path.name  # a square box, beside the frame's middle
        shares.setdefault((width, height), set()).add(box[0] ** 2 / (width * height))
    assert set(shares) == set(sizes) and all(len(s) == 1 for s in shares.values())
    square = shares[(64, 64)].pop()
    assert square == 0.375**2
    for size in ((96, 48), (48, 96)):  # 1:2 and 2:1 keep the square frame's share, to the pixel
        assert abs(shares[size].pop() - square) < 2 / 48
    assert shares[(128, 32)].pop() == 16**2 / (128 * 32)  # 4:1: capped at half the short side


def test_videos_take_their_durations_in_turn(tmp_path, monkeypatch):
    written = []
    monkeypatch.setattr("pipelines.toy.data.encode_h264", lambda frames, fps, crf: written.append(len(frames)) or b"")
    cfg = ToyDataConfig(images_per_combo=0, videos_per_combo=3, video_durations=(2.0, 0.5))
    make_toy_dataset(tmp_path, cfg)
    assert written == [48, 12, 48] * (len(COLORS) * len(DIRECTIONS))  # at 24 FPS, video i takes duration i % 2
    with pytest.raises(ValueError, match="durations"):
        ToyDataConfig(video_durations=(1.0, 0.0))


def test_held_out_pairs_are_never_written(side_shapes):
    shown = {
        (parse_caption(c)["color"], parse_caption(c)["shape"])
        for kind in (_images, _videos)
        for _, _, c in kind(side_shapes)
    }
    assert shown == set(itertools.product(COLORS, SHAPES)) - set(HELD_OUT)
    assert not any("red_triangle" in p.name or "blue_circle" in p.name for p in side_shapes["images"].parent.rglob("*"))


def test_videos_cross_the_frame_through_its_middle(tmp_path):
    """Caption and time fix where the square is: it travels edge to edge along the middle (up to the jitter)."""
    dirs = make_toy_dataset(tmp_path, SMALL)
    for path, frames, caption in _videos(dirs):
        direction = parse_caption(caption)["direction"]
        (y0, x0), (y1, x1) = centroid(frames[0]), centroid(frames[-1])
        moving, still = ((x0, x1), (y0, y1)) if direction in ("left", "right") else ((y0, y1), (x0, x1))
        assert abs(moving[1] - moving[0]) > 0.5, path.name  # most of the way across
        assert all(abs(v - 0.5) < 0.15 for v in still), path.name  # near the middle of the other axis


def test_dataset_is_deterministic(tmp_path):
    a = make_toy_dataset(tmp_path / "a", SMALL)
    b = make_toy_dataset(tmp_path / "b", SMALL)
    for p in sorted(a["images"].iterdir()):
        assert p.read_bytes() == (b["images"] / p.name).read_bytes()
    # The videos are H.264, as users' files are; x264 is not bit-reproducible (pipelines/data/media.py),
    # so the same video is checked on its decoded frames.
    for p in sorted(a["videos"].glob("*.mp4")):
        first, second = decode_clip(p.read_bytes()), decode_clip((b["videos"] / p.name).read_bytes())
        assert first.shape == second.shape
        assert np.abs(first.astype(int) - second.astype(int)).mean() < 1.0
        assert p.with_suffix(".txt").read_text() == (b["videos"] / p.name).with_suffix(".txt").read_text()


def test_parse_caption():
    assert parse_caption("a red square in the top left") == {"color": "red", "shape": "square", "place": "top left"}
    assert parse_caption("a blue square moving up") == {"color": "blue", "shape": "square", "direction": "up"}
    assert parse_caption("a green triangle on the left") == {"color": "green", "shape": "triangle", "place": "left"}
    assert parse_caption("a yellow circle at the bottom") == {"color": "yellow", "shape": "circle", "place": "bottom"}
    for color, shape in itertools.product(COLORS, SHAPES):  # every caption the generator can write
        for place in PLACES + SIDES:
            assert parse_caption(image_caption(color, place, shape)) == {"color": color, "shape": shape, "place": place}
        for direction in DIRECTIONS:
            assert parse_caption(video_caption(color, direction, shape)) == {
                "color": color,
                "shape": shape,
                "direction": direction,
            }
    for bad in (
        "a red fox in the snow",
        "a red circle in the left",
        "a red circle on the top",
        "a purple square moving up",
        "",
    ):
        with pytest.raises(ValueError):
            parse_caption(bad)
    assert set(COLORS) == {"red", "green", "blue", "yellow"}


def test_config_checks_its_values():
    with pytest.raises(ValueError):
        ToyDataConfig(shapes=("hexagon",))
    with pytest.raises(ValueError):
        ToyDataConfig(places=("middle",))
    with pytest.raises(ValueError):
        ToyDataConfig(held_out=(("red", "hexagon"),))
    with pytest.raises(ValueError, match="square"):
        ToyDataConfig(square=0.6)
    assert SIDE_SHAPES.combos()[:3] == [("red", "square"), ("red", "circle"), ("green", "square")]


def test_chance_per_attribute():
    assert CHANCE == {"color": 0.25, "shape": 1 / 3, "place": 0.25, "direction": 0.25, "axis": 0.5}


def test_largest_component_is_four_connected():
    mask = np.zeros((6, 8), bool)
    mask[0:3, 0:3] = True  # 9 pixels
    mask[3, 3] = mask[4, 4] = True  # touch the block and each other only at corners
    mask[2:6, 6:8] = True  # 8 pixels
    largest = largest_component(mask)
    assert largest.sum() == 9 and largest[0:3, 0:3].all()
    mask[2, 3:6] = True  # a bridge from the block to the strip, which also reaches (3, 3) but not (4, 4)
    assert largest_component(mask).sum() == 9 + 3 + 8 + 1
    assert not largest_component(np.zeros((4, 4), bool)).any()


# --------------------------------------------------------------------------- two objects

PAIRS = PairDataConfig(images=96, seed=1)


@pytest.fixture(scope="module")
def pair_images(tmp_path_factory):
    folder = make_pair_dataset(tmp_path_factory.mktemp("pairs"), PAIRS)
    return [
        (path.name, np.asarray(Image.open(path)), path.with_suffix(".txt").read_text())
        for path in sorted(folder.glob("*.png"))
    ]


def _swap_shapes(caption: dict) -> str:
    (c1, s1), (c2, s2) = caption["first"], caption["second"]
    return pair_caption((c1, s2), caption["relation"], (c2, s1))


def test_pair_captions_parse_back_and_name_each_scene_both_ways():
    for first, second in itertools.permutations([("red", "circle"), ("blue", "square"), ("yellow", "triangle")], 2):
        for relation in RELATIONS:
            caption = pair_caption(first, relation, second)
            assert parse_pair_caption(caption) == {"first": first, "relation": relation, "second": second}
            assert is_pair_caption(caption) and not is_pair_caption(image_caption(first[0], "left", first[1]))
    assert pair_caption(("red", "circle"), "left of", ("blue", "square")) == "a red circle to the left of a blue square"
    assert pair_caption(("red", "circle"), "below", ("blue", "square")) == "a red circle below a blue square"
    assert {INVERSE_RELATION[INVERSE_RELATION[r]] for r in RELATIONS} == set(RELATIONS)
    for bad in (
        "a red circle to the left of a red square",  # one colour: the reader could not tell the objects apart
        "a red circle left of a blue square",
        "a red circle beside a blue square",
        "a red circle to the left of a purple square",
        "a red circle to the left of",
    ):
        with pytest.raises(ValueError):
            parse_pair_caption(bad)


def test_pair_dataset_draws_what_its_captions_say_without_the_held_out_pairs(pair_images):
    assert len(pair_images) == PAIRS.images
    shown, relations, colours_per_image = set(), set(), []
    for name, pixels, caption in pair_images:
        want = parse_pair_caption(caption)
        shown |= {want["first"], want["second"]}
        relations.add(want["relation"])
        drawn = {tuple(int(v) for v in p) for p in np.unique(pixels.reshape(-1, 3), axis=0)} - {BACKGROUND}
        colours_per_image.append(drawn == {COLORS[want["first"][0]], COLORS[want["second"][0]]})
        # the relation's axis parts the two boxes with the gap; both lie inside the frame
        first, second = (np.all(pixels == COLORS[want[k][0]], axis=-1) for k in ("first", "second"))
        (t1, b1, l1, r1), (t2, b2, l2, r2) = (
            (ys.min(), ys.max(), xs.min(), xs.max()) for ys, xs in (np.nonzero(first), np.nonzero(second))
        )
        apart = {"left of": l2 - r1, "right of": l1 - r2, "above": t2 - b1, "below": t1 - b2}[want["relation"]]
        assert apart >= PAIRS.gap * PAIRS.image_size, (name, caption)
    assert all(colours_per_image)
    assert relations == set(RELATIONS)
    assert shown == set(PAIRS.combos()) and not shown & set(PAIRS.held_out)
    assert {("yellow", "triangle"), ("blue", "circle")} == set(PAIRS.held_out)


def test_pair_dataset_captions_one_layout_from_either_object(pair_images):
    """Both phrasings occur: each relation names a fair share of the scenes (a scene's two captions are equally
    likely), and a scene reads right under either caption."""
    written = Counter(parse_pair_caption(c)["relation"] for _, _, c in pair_images)
    assert set(written) == set(RELATIONS) and min(written.values()) >= len(pair_images) // 8, written
    # the same scene drawn under its two captions reads the same
    rng = np.random.default_rng(0)
    a = draw_pair(("red", "circle"), "left of", ("blue", "square"), PAIRS, rng)
    probe_of_inverse = probe_pair(a, "a blue square to the right of a red circle")
    assert probe_of_inverse == {"colors": True, "binding": True, "relation": True, "all": True, "swapped": False}


def test_pair_probe_reads_every_ground_truth_image_at_32px_and_with_noise(pair_images):
    rng = np.random.default_rng(3)
    for name, pixels, caption in pair_images:
        for variant_name, variant in _variants(pixels, rng).items():
            scores = probe_pair(variant, caption)
            assert scores == {"colors": True, "binding": True, "relation": True, "all": True, "swapped": False}, (
                name,
                caption,
                variant_name,
            )


def test_pair_probe_marks_exactly_what_a_wrong_prompt_changes(pair_images):
    rng = np.random.default_rng(4)
    for name, pixels, caption in pair_images[::4]:
        image = _noisy(_resize(pixels, 32), rng)
        want = parse_pair_caption(caption)
        (c1, s1), (c2, s2) = want["first"], want["second"]
        for relation in RELATIONS:  # only the asked relation reads true
            asked = pair_caption(want["first"], relation, want["second"])
            assert probe_pair(image, asked)["relation"] == (relation == want["relation"]), (name, asked)
        # each colour asked on the other's shape: binding fails, and it is the classic swap when the shapes differ
        swapped = probe_pair(image, _swap_shapes(want))
        if s1 != s2:
            assert swapped == {"colors": True, "binding": False, "relation": True, "all": False, "swapped": True}
        # a colour that is not drawn: no object of it, so nothing about it holds
        absent = next(c for c in COLORS if c not in (c1, c2))
        missing = probe_pair(image, pair_caption((absent, s1), want["relation"], want["second"]))
        assert missing == {"colors": False, "binding": False, "relation": False, "all": False, "swapped": False}
        # the mirror caption of the scene is as right as its own
        mirror = pair_caption(want["second"], INVERSE_RELATION[want["relation"]], want["first"])
        assert probe_pair(image, mirror)["all"], (name, mirror)


def test_pair_probe_ignores_specks_and_reads_relations_of_centres():
    rng = np.random.default_rng(5)
    for _ in range(20):  # an untrained model's sample: clipped Gaussian noise holds no object of any colour
        noise = ((np.clip(rng.normal(0, 1, (32, 32, 3)), -1, 1) + 1) * 127.5).round().astype(np.uint8)
        assert probe_pair(noise, "a red circle to the left of a blue square")["colors"] is False
    assert relation_of((0.5, 0.2), (0.5, 0.8)) == "left of" and relation_of((0.5, 0.8), (0.5, 0.2)) == "right of"
    assert relation_of((0.2, 0.5), (0.8, 0.55)) == "above" and relation_of((0.8, 0.4), (0.2, 0.5)) == "below"
    assert relation_of((0.5, 0.5), (0.5, 0.5)) is None
    # the scene's layout puts the centres apart along the relation's axis more than across it
    for relation in RELATIONS:
        image = draw_pair(("green", "triangle"), relation, ("red", "square"), PAIRS, rng)
        seen = read_pair(image, ("green", "red"))
        assert seen["green"][0] == "triangle" and seen["red"][0] == "square"
        assert relation_of(seen["green"][1], seen["red"][1]) == relation


def test_pair_config_checks_its_values():
    with pytest.raises(ValueError):
        PairDataConfig(square=0.5)  # two boxes and the gap do not fit
    with pytest.raises(ValueError):
        PairDataConfig(held_out=(("red", "hexagon"),))
    with pytest.raises(ValueError):
        PairDataConfig(shapes=("square",), held_out=(("green", "square"), ("blue", "square"), ("yellow", "square")))
    assert len(PairDataConfig().combos()) == 10
