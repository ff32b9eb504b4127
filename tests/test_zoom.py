"""The zoom environment: action parsing, model <-> pixel box geometry, full-resolution crops, observations."""

import numpy as np
import pytest
from PIL import Image

from medvr.explore.zoom import Observation, ZoomEnv, parse_action

MIN_PIXELS, MAX_PIXELS = 3136, 12544


def make_env(box_scale=1000, min_side=28, upscale=2.0) -> ZoomEnv:
    return ZoomEnv(
        box_scale=box_scale,
        min_side=min_side,
        upscale=upscale,
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        observation="<obs>",
        invalid_observation="bad: {error}",
    )


def blocks(width=600, height=400, block=10) -> Image.Image:
    """An RGB image whose every `block` x `block` square has its own colour, so a crop shows where it came from."""
    ys, xs = np.mgrid[0:height, 0:width]
    rgb = np.stack([(xs // block) * 4, (ys // block) * 6, np.full_like(xs, 200)], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


# ---- parse_action -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<zoom>[100, 200, 300, 400]</zoom>", (100, 200, 300, 400)),
        ("<zoom>[100,200,300,400]</zoom>", (100, 200, 300, 400)),
        ("<zoom>  [ 100 ,200,  300 , 400 ]\n</zoom>", (100, 200, 300, 400)),
        ("<zoom>[10.5, 20.25, 300.0, 400.75]</zoom>", (10.5, 20.25, 300.0, 400.75)),
        ("<zoom>[-20, -5, 300, 400]</zoom>", (-20, -5, 300, 400)),
        ("<think>The lesion is in the upper left.</think> <zoom>[100, 200, 300, 400]</zoom>", (100, 200, 300, 400)),
        ("<zoom>[100, 200, 300, 400]</zoom> and then some more text", (100, 200, 300, 400)),
    ],
)
def test_parse_action_valid(text, expected):
    assert parse_action(text) == pytest.approx(expected)


def test_parse_action_last_zoom_wins():
    text = "first <zoom>[0, 0, 10, 10]</zoom> no, better <zoom>[100, 200, 300, 400]</zoom>"
    assert parse_action(text) == (100, 200, 300, 400)
    # the last <zoom> is the one judged, even when an earlier one was well formed
    with pytest.raises(ValueError, match="unparsable"):
        parse_action("<zoom>[0, 0, 10, 10]</zoom> and <zoom>[1, 2]</zoom>")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no <zoom>"),
        ("[100, 200, 300, 400]", "no <zoom>"),
        ("<Zoom>[100, 200, 300, 400]</Zoom>", "no <zoom>"),
        ("<zoom>[100, 200, 300]</zoom>", "unparsable"),
        ("<zoom>[100, 200, 300, 400, 500]</zoom>", "unparsable"),
        ("<zoom>[a, b, c, d]</zoom>", "unparsable"),
        ("<zoom>[1e2, 200, 300, 400]</zoom>", "unparsable"),
        ("<zoom>100, 200, 300, 400]</zoom>", "unparsable"),
        ("<zoom>[100, 200, 300, 400</zoom>", "unparsable"),
        ("<zoom>[100, 200, 300, 400]", "unparsable"),
        ("<zoom>[300, 200, 100, 400]</zoom>", "zero-area"),  # x2 < x1
        ("<zoom>[100, 200, 100, 400]</zoom>", "zero-area"),  # x2 == x1
        ("<zoom>[100, 400, 300, 200]</zoom>", "zero-area"),  # y2 < y1
        ("<zoom>[100, 200, 300, 200]</zoom>", "zero-area"),  # y2 == y1
    ],
)
def test_parse_action_malformed(text, message):
    with pytest.raises(ValueError, match=message):
        parse_action(text)


def test_parse_action_error_quotes_the_action():
    with pytest.raises(ValueError, match=r"\[1, 2, x, 4\]"):
        parse_action("text <zoom>[1, 2, x, 4]</zoom>")
    with pytest.raises(ValueError, match=r"\[300, 200, 100, 400\]"):
        parse_action("<zoom>[300, 200, 100, 400]</zoom>")


# ---- to_pixels / from_pixels --------------------------------------------------------------------

W, H = 400, 200  # a non-square image: x and y scale differently


@pytest.mark.parametrize(
    ("box", "expected"),
    [
        ((250, 500, 750, 1000), (100, 100, 300, 200)),
        ((0, 0, 1000, 1000), (0, 0, 400, 200)),
        ((100, 100, 200, 400), (40, 20, 80, 80)),
        ((500, 0, 1000, 500), (200, 0, 400, 100)),
    ],
)
def test_to_pixels_scales_x_and_y_separately(box, expected):
    assert make_env().to_pixels(box, W, H) == expected


def test_to_pixels_covers_fractional_pixels():
    # 0..1000 -> 0..400 is 0.4 px a unit: the pixel box is the smallest one that holds the model's box
    assert make_env(min_side=1).to_pixels((101, 101, 299, 299), W, H) == (40, 20, 120, 60)


@pytest.mark.parametrize(
    ("box", "expected"),
    [
        ((-100, -50, 500, 500), (0, 0, 200, 100)),
        ((500, 500, 1500, 2000), (200, 100, 400, 200)),
        ((-1000, -1000, 2000, 2000), (0, 0, 400, 200)),
    ],
)
def test_to_pixels_clamps_to_the_image(box, expected):
    assert make_env().to_pixels(box, W, H) == expected


@pytest.mark.parametrize(
    "box",
    [(1100, 0, 1200, 500), (0, 1000, 500, 1500), (-200, 0, -100, 500), (0, -300, 500, -1), (1000, 0, 1001, 1000)],
)
def test_to_pixels_box_outside_the_image(box):
    with pytest.raises(ValueError, match="outside the image"):
        make_env().to_pixels(box, W, H)


def test_to_pixels_grows_a_tiny_box_about_its_centre():
    x1, y1, x2, y2 = make_env(min_side=28).to_pixels((500, 500, 510, 510), W, H)  # 200..204 x 100..102 px
    assert (x2 - x1, y2 - y1) == (28, 28)
    assert (x1, y1, x2, y2) == (188, 87, 216, 115)
    assert abs((x1 + x2) / 2 - 202) <= 1 and abs((y1 + y2) / 2 - 101) <= 1


@pytest.mark.parametrize(
    ("box", "expected"),
    [
        ((990, 990, 1000, 1000), (372, 172, 400, 200)),  # bottom-right corner: shifted left and up
        ((0, 0, 10, 10), (0, 0, 28, 28)),  # top-left corner: shifted right and down
        ((-5, -5, 5, 5), (0, 0, 28, 28)),
        ((995, 0, 1005, 500), (372, 0, 400, 100)),
    ],
)
def test_to_pixels_tiny_box_near_an_edge_is_shifted_inside(box, expected):
    assert make_env(min_side=28).to_pixels(box, W, H) == expected


def test_to_pixels_image_smaller_than_min_side_gets_the_whole_side():
    env = make_env(min_side=28)
    assert env.to_pixels((400, 400, 600, 600), 20, 10) == (0, 0, 20, 10)
    # only the short side is too small: the long side keeps the box, grown to min_side
    assert env.to_pixels((500, 0, 600, 1000), 400, 10) == (200, 0, 240, 10)


def test_to_pixels_without_box_scale_takes_pixels():
    env = make_env(box_scale=None, min_side=1)
    assert env.to_pixels((10, 20, 110, 220), 400, 300) == (10, 20, 110, 220)
    assert env.to_pixels((10.4, 20, 110.6, 220), 400, 300) == (10, 20, 111, 220)
    assert env.to_pixels((350, 250, 500, 400), 400, 300) == (350, 250, 400, 300)
    with pytest.raises(ValueError, match=r"outside the image \(0..400 x 0..300 pixels\)"):
        env.to_pixels((500, 0, 600, 100), 400, 300)
    assert env.from_pixels((10, 20, 110, 220), 400, 300) == (10, 20, 110, 220)


def test_from_pixels_maps_back_to_the_1000_grid():
    env = make_env()
    assert env.from_pixels((100, 100, 300, 200), W, H) == (250, 500, 750, 1000)
    assert env.from_pixels((0, 0, 400, 200), W, H) == (0, 0, 1000, 1000)
    assert env.from_pixels((40, 20, 80, 80), W, H) == (100, 100, 200, 400)


@pytest.mark.parametrize(("width", "height", "tolerance"), [(1500, 1200, 1), (2000, 1000, 1), (400, 200, (2.5, 5))])
def test_from_pixels_inverts_to_pixels(width, height, tolerance):
    """Model box -> pixels -> model box comes back within a unit (or one pixel's worth of units on small images)."""
    env = make_env()
    tx, ty = tolerance if isinstance(tolerance, tuple) else (tolerance, tolerance)
    rng = np.random.default_rng(0)
    for _ in range(300):
        x1, y1 = rng.integers(0, 850, size=2)
        x2, y2 = x1 + rng.integers(150, 1000 - x1 + 1), y1 + rng.integers(150, 1000 - y1 + 1)
        back = env.from_pixels(env.to_pixels((x1, y1, x2, y2), width, height), width, height)
        assert all(abs(b - a) <= tx for a, b in zip((x1, x2), back[0::2])), ((x1, y1, x2, y2), back)
        assert all(abs(b - a) <= ty for a, b in zip((y1, y2), back[1::2])), ((x1, y1, x2, y2), back)


# ---- crop ---------------------------------------------------------------------------------------


def test_crop_is_the_original_region_at_full_resolution():
    image = blocks()
    # a one-pixel checkerboard, which any downsized view would blur to grey
    checker = (np.indices((400, 600)).sum(axis=0) % 2 * 255).astype(np.uint8)
    image.paste(Image.fromarray(np.stack([checker] * 3, axis=-1)).crop((300, 200, 340, 240)), (300, 200))
    env = make_env(upscale=1.0)  # every box below is inside the pixel budget as it is
    for box in [(100, 50, 180, 110), (290, 190, 370, 250), (0, 0, 70, 70), (520, 340, 600, 400)]:
        crop = env.crop(image, box)
        assert crop.size == (box[2] - box[0], box[3] - box[1])
        np.testing.assert_array_equal(np.asarray(crop), np.asarray(image.crop(box)))


def test_crop_upscales_the_original_region():
    image = blocks()
    box = (100, 50, 160, 90)  # 6 x 4 blocks of 10 px; 2x gives 120 x 80 = 9600 px, inside the budget
    crop = np.asarray(make_env(upscale=2.0).crop(image, box)).astype(int)
    assert crop.shape == (80, 120, 3)
    source = np.asarray(image).astype(int)
    for i in range(6):
        for j in range(4):
            # the centre of block (i, j) of the crop has the colour of the same block in the original
            got = crop[20 * j + 10, 20 * i + 10]
            want = source[box[1] + 10 * j + 5, box[0] + 10 * i + 5]
            assert np.abs(got - want).max() <= 1, (i, j, got, want)


@pytest.mark.parametrize(
    ("box", "size"),
    [
        ((0, 0, 600, 400), (137, 91)),  # 1200 x 800 after 2x: scaled down into max_pixels
        ((0, 0, 400, 100), (224, 56)),
        ((50, 50, 250, 250), (112, 112)),
        ((0, 0, 10, 20), (40, 80)),  # 20 x 40 after 2x: scaled up to (at least) min_pixels
        ((100, 100, 128, 128), (56, 56)),  # exactly min_pixels after 2x
    ],
)
def test_crop_keeps_within_the_pixel_budget_and_the_aspect_ratio(box, size):
    crop = make_env(upscale=2.0).crop(blocks(), box)
    w, h = box[2] - box[0], box[3] - box[1]
    assert crop.size == size
    assert MIN_PIXELS <= crop.size[0] * crop.size[1] <= MAX_PIXELS
    assert abs(crop.size[0] - crop.size[1] * w / h) <= 1  # aspect ratio kept within rounding
    if (2 * w) * (2 * h) > MAX_PIXELS:
        assert crop.size[0] * crop.size[1] > 0.97 * MAX_PIXELS  # scaled to the budget, not far below it


# ---- step ---------------------------------------------------------------------------------------


def test_step_valid_action():
    env, image = make_env(), blocks()
    obs = env.step("<think>look closer</think><zoom>[100, 100, 300, 300]</zoom>", image)
    assert isinstance(obs, Observation)
    assert obs.error is None
    assert obs.text == "<obs>"
    assert obs.box == (60, 40, 180, 120)
    assert isinstance(obs.image, Image.Image)
    assert obs.image.size == (137, 91)  # 120 x 80 px at 2x = 38400 > max_pixels
    np.testing.assert_array_equal(np.asarray(obs.image), np.asarray(env.crop(image, obs.box)))


@pytest.mark.parametrize(
    ("action", "message"),
    [
        ("I will look at the lungs", "no <zoom>"),
        ("<zoom>[1, 2, 3]</zoom>", "unparsable"),
        ("<zoom>[300, 200, 100, 400]</zoom>", "zero-area"),
        ("<zoom>[1100, 0, 1200, 500]</zoom>", "outside the image"),
    ],
)
def test_step_malformed_action_is_an_error_observation(action, message):
    obs = make_env().step(action, blocks())
    assert obs.image is None and obs.box is None
    assert message in obs.error
    assert obs.text == f"bad: {obs.error}"


@pytest.mark.parametrize(
    "action",
    [
        "",
        "</zoom>",
        "<zoom>",
        "<zoom></zoom>",
        "<zoom>[]</zoom>",
        "<zoom>[nan, nan, nan, nan]</zoom>",
        "<zoom>[inf, 0, 1, 1]</zoom>",
        "<zoom>[" + "9" * 400 + ", 0, 1, 1]</zoom>",
        "<zoom>[{error}, {0}, %s, }{]</zoom>",
        "<zoom>[5, 5, 5, 5]</zoom>",
        "<zoom>[-50, -50, -10, -10]</zoom>",
        "<zoom>[1, 2, 3, 4</zoom><zoom>",
        "\x00\udcff<zoom>[\u00bd, 1, 2, 3]</zoom>",
        "<zoom>" * 1000,
    ],
)
def test_step_never_raises_on_garbage(action):
    obs = make_env().step(action, blocks())
    assert obs.image is None and obs.box is None
    assert isinstance(obs.error, str) and obs.error
    assert obs.text == f"bad: {obs.error}"
