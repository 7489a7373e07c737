"""Image preprocessing against HF's SigLIP / LLaVA-NeXT processors (PIL backend) and by hand.

Both sides resize with the same PIL filter (bicubic for SigLIP, bilinear for SigLIP2) on
uint8 images and normalise with the same float32 arithmetic, so the tolerance is exact:
every comparison asserts a max abs difference of 0.0.
"""

from concurrent.futures import ProcessPoolExecutor
import multiprocessing

import numpy as np
from PIL import Image
import pytest
import torch
from transformers import LlavaNextImageProcessorPil, SiglipImageProcessorPil

from megatron_asvr.data import images

SIZES = [(384, 384), (500, 333), (333, 500), (97, 211), (1600, 900), (1300, 1300)]


def _random_image(width: int, height: int, seed: int) -> Image.Image:
    """Smooth gradients plus noise: exercises the bicubic kernel away from flat regions."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs * 255 // max(width - 1, 1), ys * 255 // max(height - 1, 1), (xs + ys) % 256], axis=-1)
    noise = rng.integers(-40, 41, size=(height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def _llava_expand2square(pil_img, background_color):
    """LLaVA-1.5's expand2square (llava/mm_utils.py), reproduced verbatim as the reference."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


@pytest.fixture(scope="module")
def siglip_processor():
    # The preprocessor_config.json of google/siglip-so400m-patch14-384.
    return SiglipImageProcessorPil(
        size={"height": 384, "width": 384}, resample=3, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )


@pytest.fixture(scope="module")
def siglip2_processor():
    # The preprocessor_config.json of a SigLIP2 FixRes checkpoint (google/siglip2-so400m-patch14-384):
    # SigLIP's processor with bilinear resampling.
    return SiglipImageProcessorPil(
        size={"height": 384, "width": 384}, resample=2, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )


@pytest.fixture(scope="module")
def llava_next_processor():
    return LlavaNextImageProcessorPil(
        size={"height": 384, "width": 384},
        crop_size={"height": 384, "width": 384},
        do_center_crop=False,
        resample=3,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        # HF lists pinpoints as [height, width]; ours are (width, height).
        image_grid_pinpoints=[[h, w] for w, h in images.DEFAULT_GRID_PINPOINTS],
    )


def _hf_pixels(processor, image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(processor(image)["pixel_values"][0]))


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    return (a - b).abs().max().item()


@pytest.mark.parametrize("size", SIZES)
def test_resize_mode_matches_siglip_processor(siglip_processor, size):
    image = _random_image(*size, seed=size[0])
    ours = images.preprocess_image(image, "resize")
    assert ours.shape == (1, 3, 384, 384)
    assert _max_abs_diff(ours[0], _hf_pixels(siglip_processor, image)) == 0.0


@pytest.mark.parametrize("size", SIZES[1:4])
def test_siglip2_resamples_bilinearly_as_its_processor(siglip_processor, siglip2_processor, size):
    """SigLIP2 FixRes (vision.resample=bilinear) in resize and pad modes: exact against its processor,
    and not what SigLIP's bicubic filter gives."""
    from megatron_asvr.config import VISION_PRESETS

    image = _random_image(*size, seed=size[0] * 7)
    resample = VISION_PRESETS["siglip2_so400m_384"].resample
    ours = images.preprocess_image(image, "resize", resample=resample)[0]
    assert _max_abs_diff(ours, _hf_pixels(siglip2_processor, image)) == 0.0
    assert _max_abs_diff(ours, _hf_pixels(siglip_processor, image)) > 0.1
    padded = images.preprocess_image(image, "pad", resample=resample)[0]
    background = tuple(int(x * 255) for x in siglip2_processor.image_mean)
    assert _max_abs_diff(padded, _hf_pixels(siglip2_processor, _llava_expand2square(image, background))) == 0.0


@pytest.mark.parametrize("size", SIZES)
def test_pad_mode_matches_llava_expand2square_then_siglip(siglip_processor, size):
    image = _random_image(*size, seed=size[1])
    background = tuple(int(x * 255) for x in siglip_processor.image_mean)
    reference = _hf_pixels(siglip_processor, _llava_expand2square(image, background))
    assert _max_abs_diff(images.preprocess_image(image, "pad")[0], reference) == 0.0


def test_pad_background_is_gray_127():
    assert images.PAD_BACKGROUND == (127, 127, 127)
    # A 384 x 192 image: 96 rows of background above and below, no resize needed.
    pixels = images.preprocess_image(Image.new("RGB", (384, 192), (255, 0, 0)), "pad")[0]
    gray = np.float32(np.float32(127 * (1 / 255)) - np.float32(0.5)) / np.float32(0.5)
    assert torch.all(pixels[:, :96] == torch.tensor(gray))
    assert torch.all(pixels[:, 288:] == torch.tensor(gray))
    assert torch.all(pixels[0, 96:288] == 1.0) and torch.all(pixels[1:, 96:288] == -1.0)


@pytest.mark.parametrize("size", SIZES + [(1152, 200), (200, 1152), (800, 600)])
def test_anyres_matches_llava_next_processor(llava_next_processor, size):
    image = _random_image(*size, seed=size[0] + size[1])
    ours = images.preprocess_image(image, "anyres")
    reference = _hf_pixels(llava_next_processor, image)
    assert ours.shape[0] == images.tile_count(*size, "anyres")
    assert _max_abs_diff(ours, reference) == 0.0


@pytest.mark.parametrize(
    "size, grid",
    [
        ((300, 200), (384, 384)),  # fits in one tile: least waste among full-effective grids
        ((500, 300), (768, 384)),  # 768x384 keeps all 150,000 pixels, 384x384 only 384*230
        ((2000, 1000), (1152, 768)),  # effective 1152*576 everywhere it is maximal; least waste
        ((1000, 1000), (1152, 1152)),
        ((400, 1200), (384, 1152)),  # scale 0.96 -> 384*1152 effective, the tall strip wastes least
        ((1152, 384), (1152, 384)),
    ],
)
def test_grid_selection_by_hand(size, grid):
    assert images.select_best_resolution(*size) == grid
    tiles = 1 + (grid[0] // 384) * (grid[1] // 384)
    assert images.tile_count(*size, "anyres") == tiles
    assert images.image_token_count(*size, "anyres") == 729 * tiles


def test_token_count_single_tile_modes_and_bad_mode():
    for mode in ("resize", "pad"):
        assert images.image_token_count(1600, 900, mode) == 729
    with pytest.raises(ValueError, match="'square'"):
        images.image_token_count(10, 10, "square")


def test_anyres_tile_contents_by_hand():
    # 768 x 300 picks the 768 x 384 grid at scale 1: no resize, 42 black rows above and below.
    image = Image.new("RGB", (768, 300))
    image.paste((255, 0, 0), (0, 0, 384, 300))
    image.paste((0, 0, 255), (384, 0, 768, 300))
    views = images.preprocess_image(image, "anyres")
    assert views.shape == (3, 3, 384, 384)
    assert torch.equal(views[0], images.siglip_preprocess(image))  # the whole image first
    for tile, colour in ((views[1], (1.0, -1.0, -1.0)), (views[2], (-1.0, -1.0, 1.0))):
        assert torch.all(tile[:, :42] == -1.0) and torch.all(tile[:, 342:] == -1.0)
        for channel, value in enumerate(colour):
            assert torch.all(tile[channel, 42:342] == value)


def test_load_rgb_converts_modes(tmp_path):
    Image.fromarray(np.array([[18, 200]], dtype=np.uint8), "L").save(tmp_path / "gray.png")
    rgba = np.array([[[10, 20, 30, 0], [200, 100, 0, 128]]], dtype=np.uint8)  # [1, 2, 4]
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    Image.fromarray(rgba[..., :3], "RGB").convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    gray = images.load_rgb(tmp_path / "gray.png")
    assert gray.mode == "RGB"
    assert np.asarray(gray).tolist() == [[[18, 18, 18], [200, 200, 200]]]
    assert np.asarray(images.load_rgb(tmp_path / "alpha.png")).tolist() == [[[10, 20, 30], [200, 100, 0]]]
    cmyk = np.asarray(images.load_rgb(tmp_path / "cmyk.jpg")).astype(int)
    assert cmyk.shape == (1, 2, 3) and np.abs(cmyk - rgba[..., :3]).max() <= 2  # quality-100 JPEG: 0 measured


def test_load_rgb_names_bad_files(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    for name in ("empty.jpg", "junk.jpg", "missing.jpg"):
        with pytest.raises(images.ImageLoadError, match=name):
            images.load_rgb(tmp_path / name)


def test_load_image_batch_in_worker_process(tmp_path):
    paths = []
    for index, size in enumerate([(500, 333), (1600, 900), (200, 200)]):
        paths.append(tmp_path / f"{index}.jpg")
        _random_image(*size, seed=index).save(paths[-1], quality=90)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        batch = pool.submit(images.load_image_batch, paths, "anyres").result()
    assert batch.tiles_per_image == (3, 7, 2)
    expected = torch.cat([images.preprocess_image(Image.open(p).convert("RGB"), "anyres") for p in paths])
    assert torch.equal(batch.pixels, expected)
    empty = images.load_image_batch([], "pad")
    assert empty.pixels.shape == (0, 3, 384, 384) and empty.tiles_per_image == ()
