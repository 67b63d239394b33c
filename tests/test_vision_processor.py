"""Images (modes, EXIF, bad files) and prompts (templates, <image> expansion, label masks)."""
import io
import warnings

import numpy as np
import pytest
from PIL import Image

from multimodal_rwkv.errors import DataError
from multimodal_rwkv.vision.processor import (
    IGNORE_INDEX,
    IMAGE_TOKEN_ID,
    VisualRWKVProcessor,
    apply_template,
    as_pil,
    check_conversations,
    expand2square,
    image_processor_for,
    load_image,
    to_rgb,
)


@pytest.fixture(scope="module")
def tok():
    from multimodal_rwkv import WorldTokenizer

    return WorldTokenizer()


def _save(im, path, **kw):
    im.save(path, **kw)
    return str(path)


# ---------------------------------------------------------------------------------- image modes
def test_rgba_composited_over_white():
    a = np.zeros((4, 5, 4), np.uint8)
    a[..., 0] = 200  # red channel under a fully transparent pixel must not leak
    a[0, 0] = (10, 20, 30, 255)  # opaque
    a[0, 1] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    out = np.asarray(to_rgb(Image.fromarray(a, "RGBA")))
    assert out.shape == (4, 5, 3)
    assert tuple(out[1, 1]) == (255, 255, 255)
    assert tuple(out[0, 0]) == (10, 20, 30)
    assert all(abs(int(c) - 127) <= 1 for c in out[0, 1])


def test_la_and_l_and_1():
    la = Image.fromarray(np.array([[[40, 255], [40, 0]]], np.uint8), "LA")
    out = np.asarray(to_rgb(la))
    assert tuple(out[0, 0]) == (40, 40, 40) and tuple(out[0, 1]) == (255, 255, 255)
    l_img = Image.fromarray(np.array([[7, 250]], np.uint8), "L")
    assert np.asarray(to_rgb(l_img)).tolist() == [[[7, 7, 7], [250, 250, 250]]]
    one = Image.new("1", (2, 1))
    one.putpixel((1, 0), 1)
    assert np.asarray(to_rgb(one)).tolist() == [[[0, 0, 0], [255, 255, 255]]]


def test_palette_with_and_without_transparency():
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 12, 34, 56, 200, 100, 50] + [0] * (256 * 3 - 9))
    p.putpixel((0, 0), 1)
    p.putpixel((1, 0), 2)
    assert np.asarray(to_rgb(p)).tolist() == [[[12, 34, 56], [200, 100, 50]]]
    p.info["transparency"] = 2  # palette index 2 transparent -> white
    assert np.asarray(to_rgb(p)).tolist() == [[[12, 34, 56], [255, 255, 255]]]


def test_16bit_greyscale_scaled_not_clipped(tmp_path):
    a = np.array([[0, 256, 32768, 65535]], np.uint16)
    im = Image.fromarray(a)  # mode I;16
    assert im.mode.startswith("I;16")
    out = np.asarray(to_rgb(im))[0, :, 0].tolist()
    assert out == [0, 1, 128, 255]
    # a 16-bit PNG read back from disk (PIL may open it as I;16 or I)
    path = _save(im, tmp_path / "g16.png")
    out2 = np.asarray(load_image(path))[0, :, 0].tolist()
    assert out2 == [0, 1, 128, 255]


def test_cmyk_jpeg_and_tiff(tmp_path):
    c = Image.new("CMYK", (3, 2), (0, 0, 0, 0))  # no ink = white
    c.putpixel((1, 0), (0, 255, 255, 0))  # magenta+yellow = red
    c.putpixel((2, 0), (0, 0, 0, 255))  # black
    out = np.asarray(load_image(_save(c, tmp_path / "c.tif")))
    assert tuple(out[1, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (255, 0, 0)
    assert tuple(out[0, 2]) == (0, 0, 0)
    big = Image.new("CMYK", (16, 16), (0, 255, 255, 0))
    jp = np.asarray(load_image(_save(big, tmp_path / "c.jpg", quality=95)))
    r, g, b = jp[8, 8]
    assert r > 200 and g < 60 and b < 60


def test_exif_orientation_applied(tmp_path):
    a = np.zeros((2, 3, 3), np.uint8)  # 3 wide, 2 tall; red at top-left
    a[0, 0] = (255, 0, 0)
    im = Image.fromarray(a, "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = _save(im, tmp_path / "o.png", exif=exif.tobytes())
    out = np.asarray(load_image(path))
    assert out.shape == (3, 2, 3)  # now 2 wide, 3 tall
    assert tuple(out[0, 1]) == (255, 0, 0)  # top-left went to top-right


def test_damaged_exif_is_ignored_not_a_corrupt_image(tmp_path, capsys):
    """A PNG whose EXIF block Pillow cannot parse was refused as 'corrupt or truncated' (its pixels
    decode fine), and Pillow's warnings about it went to stderr."""
    path = _save(Image.new("RGB", (5, 3), (255, 0, 0)), tmp_path / "e.png", exif=b"XX*\x00garbage")
    out = np.asarray(load_image(path))
    assert out.shape == (3, 5, 3) and (out == (255, 0, 0)).all()
    assert capsys.readouterr().err == ""
    # a JPEG's damaged EXIF warned while the file was opened, before the orientation step
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (5, 3), (255, 0, 0)).save(buf, "JPEG", exif=exif)
    data = bytearray(buf.getvalue())
    at = data.find(b"Exif")
    data[at + 10:at + 30] = b"\xff" * 20
    (tmp_path / "e.jpg").write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        assert load_image(tmp_path / "e.jpg").size == (5, 3)


def test_tensor_inputs():
    import torch

    t = torch.zeros(3, 2, 4, dtype=torch.uint8)
    t[0, 1, 3] = 255
    out = np.asarray(as_pil(t))
    assert out.shape == (2, 4, 3) and tuple(out[1, 3]) == (255, 0, 0)
    f = torch.full((3, 2, 2), 0.5)
    assert np.asarray(as_pil(f))[0, 0].tolist() == [128, 128, 128]
    with pytest.raises(DataError):
        as_pil(torch.zeros(2, 3, 4, 5))


def test_numpy_inputs_are_hwc_like_pil():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    a.setflags(write=False)  # e.g. np.asarray(pil_image)
    assert np.array_equal(np.asarray(as_pil(a)), a)
    assert np.array_equal(np.asarray(as_pil(a.astype(np.float32) / 255)), a)
    g = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    assert np.array_equal(np.asarray(as_pil(g)), np.repeat(g[..., None], 3, axis=-1))
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red; the rest transparent: white, as for a PIL RGBA image
    out = np.asarray(as_pil(rgba))
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[1, 1]) == (255, 255, 255)
    with pytest.raises(DataError, match=r"image array must be"):
        as_pil(np.zeros((2, 3, 4, 5)))
    with pytest.raises(DataError, match="expected an image"):
        as_pil(None)


# ---------------------------------------------------------------------------------- bad files
def test_bad_image_files_name_the_file(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    notimg = tmp_path / "text.jpg"
    notimg.write_text("hello, not a jpeg")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "JPEG")
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    corrupt = tmp_path / "corrupt.png"
    png = io.BytesIO()
    Image.new("RGB", (32, 32), (9, 9, 9)).save(png, "PNG")
    raw = bytearray(png.getvalue())
    raw[60:80] = b"\x00" * 20  # damage the image data
    corrupt.write_bytes(bytes(raw))
    for path, why in ((empty, "empty"), (notimg, "not a recognised"), (trunc, "truncated"),
                      (corrupt, "corrupt"), (tmp_path / "missing.png", "not found")):
        with pytest.raises(DataError) as e:
            load_image(path)
        assert str(path) in str(e.value) and why in str(e.value), str(e.value)
    folder = tmp_path / "dir.png"
    folder.mkdir()
    with pytest.raises(DataError, match="dir.png: a directory, not an image file"):
        load_image(folder)
    tail_cut = tmp_path / "tail.jpg"  # the header reads, the pixels do not
    tail_cut.write_bytes(buf.getvalue()[:-64])
    with Image.open(tail_cut) as lazy:  # a PIL image opened lazily decodes inside as_pil
        with pytest.raises(DataError, match="tail.jpg: corrupt or truncated image"):
            as_pil(lazy)


def test_decompression_bomb(tmp_path):
    path = _save(Image.new("L", (300, 300)), tmp_path / "big.png")
    with pytest.raises(DataError, match="decompression bomb"):
        load_image(path, max_pixels=300 * 299)
    assert load_image(path, max_pixels=300 * 300).size == (300, 300)
    # max_pixels is the limit, whatever Pillow's own MAX_IMAGE_PIXELS says (None: no limit)
    old = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = 1000
        assert load_image(path, max_pixels=None).size == (300, 300)
        with pytest.raises(DataError, match="decompression bomb"):
            load_image(path, max_pixels=300 * 299)
        assert Image.MAX_IMAGE_PIXELS == 1000
    finally:
        Image.MAX_IMAGE_PIXELS = old


def test_expand2square_uses_background():
    im = Image.new("RGB", (4, 2), (255, 0, 0))
    sq = np.asarray(expand2square(im, (1, 2, 3)))
    assert sq.shape == (4, 4, 3)
    assert tuple(sq[0, 0]) == (1, 2, 3) and tuple(sq[3, 3]) == (1, 2, 3)
    assert tuple(sq[1, 0]) == (255, 0, 0) and tuple(sq[2, 3]) == (255, 0, 0)


# ---------------------------------------------------------------------------------- conversations
def conv(*turns):
    return [{"from": f, "value": v} for f, v in turns]


def test_check_conversations_errors_name_the_record():
    ok = conv(("human", "<image>\nWhat?"), ("gpt", "yes"))
    assert len(check_conversations(ok, 1, "record 'a'")) == 2
    cases = [
        ([], 0, "empty"),
        (conv(("human", "What?"), ("gpt", "yes")), 1, "no <image>"),
        (conv(("human", "<image><image>What?"), ("gpt", "yes")), 1, "only 1 image"),
        (conv(("human", "<image>What?"), ("gpt", "yes")), 2, "2 images"),
        (conv(("human", "<image>What?"), ("gpt", "")), 1, "no non-empty assistant"),
        (conv(("robot", "<image>What?"), ("gpt", "x")), 1, "unknown speaker"),
        ([{"from": "human"}], 0, "'from' and 'value'"),
        (conv(("human", "<image>What?"), ("gpt", "<image> x")), 1, "assistant turn"),
        (conv(("gpt", "Hello!"), ("human", "<image>What?")), 1, "no non-empty assistant"),  # only the dropped opener
    ]
    for c, n, why in cases:
        with pytest.raises(DataError) as e:
            check_conversations(c, n, "record 'r7'")
        assert "record 'r7'" in str(e.value) and why in str(e.value), str(e.value)


def test_an_opening_assistant_turn_is_dropped_as_llava_does(tok):
    turns = conv(("gpt", "Hi there"), ("human", "<image>\nWhat?"), ("gpt", "yes"))
    assert check_conversations(turns, 1, "r") == [("human", "<image>\nWhat?"), ("gpt", "yes")]
    p = VisualRWKVProcessor(tok, None, num_image_tokens=2, template="image_first")
    ids, labels = p.encode_conversation(turns, 1)
    assert (ids, labels) == p.encode_conversation(turns[1:], 1)
    assert tok.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX]) == " yes\n\n"


def test_templates_match_visualrwkv_layout():
    turns = [("human", "<image>\nWhat is it?\nAnswer the question using a single word or phrase."),
             ("gpt", "a cat"), ("human", "And\n\n\nits colour?"), ("gpt", "black")]
    sand = apply_template(turns, "sandwich")
    all_q = "What is it?\nAnd\nits colour?"
    assert sand[0] == ("human", all_q + "\n<image>\nWhat is it?\nAnswer the question using a single word or phrase.")
    assert sand[2] == ("human", "And\nits colour?")  # blank lines collapse: "\n\n" is the stop token
    first = apply_template(turns, "image_first")
    assert first[0][1] == "<image>\nWhat is it?\nAnswer the question using a single word or phrase."
    last = apply_template([("human", "Q?<image>"), ("gpt", "x")], "image_last")
    assert last[0][1] == "Q?\n<image>"
    two = apply_template([("human", "<image> and <image>: same?"), ("gpt", "no")], "image_first")
    assert two[0][1] == "<image>\n<image>\nand : same?"


def test_encode_expands_images_and_masks_labels(tok):
    p = VisualRWKVProcessor(tok, None, num_image_tokens=5, template="sandwich")
    ids, labels = p.encode_conversation(conv(("human", "<image>\nWhat?"), ("gpt", "yes"),
                                             ("human", "Sure?"), ("gpt", "no")), 1)
    text = "User: What?\nSure?\n<image>\nWhat?\n\nAssistant: yes\n\nUser: Sure?\n\nAssistant: no\n\n"
    before, after = text.split("<image>")
    # independent tokenisation of the pieces: "Assistant:" and " answer\n\n" are tokenised apart
    want = (tok.encode(before) + [IMAGE_TOKEN_ID] * 5 + tok.encode("\nWhat?\n\n") + tok.encode("Assistant:")
            + tok.encode(" yes\n\n") + tok.encode("User: Sure?\n\n") + tok.encode("Assistant:") + tok.encode(" no\n\n"))
    assert ids == want
    assert len(labels) == len(ids)
    sup = [i for i, l in zip(ids, labels) if l != IGNORE_INDEX]
    assert tok.decode(sup) == " yes\n\n no\n\n"
    assert all(l == IGNORE_INDEX or l == i for i, l in zip(ids, labels))
    assert tok.encode(" yes\n\n")[-1] == 261  # the stop token "\n\n" is supervised


def test_prompt_and_image_first_split(tok):
    p = VisualRWKVProcessor(tok, None, num_image_tokens=3, template="image_first")
    ids = p.build_prompt("How many?")
    assert ids[-3:] == tok.encode("Assistant:")
    assert ids.count(IMAGE_TOKEN_ID) == 3
    for q in ("How many?", "What colour is the big one?"):
        pre, suf = p.image_first_split(q)
        assert pre + suf == p.build_prompt(q)
        assert pre == tok.encode("User: ") + [IMAGE_TOKEN_ID] * 3
    s = VisualRWKVProcessor(tok, None, num_image_tokens=2, template="sandwich")
    ids = s.build_prompt("Why?")
    assert tok.decode([i for i in ids if i >= 0]) == "User: Why?\n\nWhy?\n\nAssistant:"
    assert ids.count(IMAGE_TOKEN_ID) == 2
    with pytest.raises(DataError):
        s.build_prompt("<image> <image> two?", num_images=1)


def test_preprocess_pad_vs_crop():
    from transformers import CLIPVisionConfig

    ip = image_processor_for(CLIPVisionConfig(image_size=16, patch_size=8))
    wide = Image.new("RGB", (32, 8), (255, 0, 0))
    crop = VisualRWKVProcessor(None, ip, 5, image_aspect_ratio="crop").preprocess_images([wide])
    pad = VisualRWKVProcessor(None, ip, 5, image_aspect_ratio="pad").preprocess_images([wide])
    assert crop.shape == pad.shape == (1, 3, 16, 16)
    mean, std = np.array(ip.image_mean), np.array(ip.image_std)
    red = (np.array([1.0, 0, 0]) - mean) / std
    bg = (np.array([int(m * 255) / 255 for m in ip.image_mean]) - mean) / std
    # crop: the whole square is red; pad: the top rows are the mean colour (~0 after normalising)
    assert np.allclose(crop[0, :, 8, 8].numpy(), red, atol=0.05)
    assert np.allclose(crop[0, :, 0, 0].numpy(), red, atol=0.05)
    assert np.allclose(pad[0, :, 0, 8].numpy(), bg, atol=0.05)
    assert np.allclose(pad[0, :, 8, 8].numpy(), red, atol=0.05)



def test_a_long_strip_is_refused_by_clip_resizes_but_not_by_siglips():
    """SigLIP resizes straight to its (height, width): a 50000x20 strip makes no big intermediate
    image, but the check estimated CLIP's shortest-edge resize for it and refused it."""
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    strip = Image.new("RGB", (50000, 20), (200, 10, 10))  # 1 Mpx
    sig = VisualRWKVProcessor(None, image_processor_for(SiglipVisionConfig(image_size=384, patch_size=64)), 5)
    assert sig.preprocess_images([strip]).shape == (1, 3, 384, 384)
    clip = VisualRWKVProcessor(None, image_processor_for(CLIPVisionConfig(image_size=384, patch_size=64)), 5)
    with pytest.raises(DataError, match="image is 50000x20; preprocessing it .*aspect ratio too extreme"):
        clip.preprocess_images([strip])  # (384 x 960000 pixels on the way)


def test_float_arrays_out_of_range_are_errors_not_clipped():
    import torch

    for bad in (np.full((4, 4, 3), 128.0), np.full((4, 4), 128.0), np.full((4, 4, 1), 2.0),
                np.full((4, 4, 4), 200.0), torch.full((3, 4, 4), 128.0)):
        with pytest.raises(DataError, match=r"must be in \[0, 1\]; found \[.*\] \(a 0-255 image"):
            as_pil(bad)
    with pytest.raises(DataError, match=r"found \[-0\.5, 0\.5\]"):
        as_pil(np.array([[-0.5, 0.5]]))
    with pytest.raises(DataError, match="NaN"):
        as_pil(np.full((2, 2, 3), np.nan, np.float32))
    g = np.asarray(as_pil(np.full((2, 2, 1), 0.5)))  # [H,W,1] and [H,W] floats in [0, 1] are fine
    assert g.shape == (2, 2, 3) and (g == 128).all()
    # a float RGBA array is composited over white, like a uint8 one (not its alpha dropped)
    rgba = np.zeros((2, 2, 4), np.float32)
    rgba[0, 0] = (1, 0, 0, 1)
    out = np.asarray(as_pil(rgba))
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[1, 1]) == (255, 255, 255)


def test_max_image_pixels_is_the_limit_not_pillows(tmp_path):
    """Pillow's own ~89-megapixel bomb check applied whatever max_pixels said: None did not turn it
    off, and a higher limit could not raise it."""
    from multimodal_rwkv.vision.processor import load_image

    big = tmp_path / "big.png"
    Image.new("1", (10000, 9500)).save(big)  # 95 Mpx, a small file (1 bit per pixel)
    assert load_image(big, None, decode=False) is None
    assert load_image(big, 200_000_000, decode=False) is None
    with pytest.raises(DataError, match="image is 10000x9500 = 95000000 pixels, over the limit of 1000000"):
        load_image(big, 1_000_000, decode=False)
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's own setting is left as it was
