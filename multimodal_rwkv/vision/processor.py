"""Images and prompts for VisualRWKV: image loading, prompt templates and ``<image>`` expansion.

Token layout (VisualRWKV v6.0, ``src/dataset.py``): each turn is ``"User: " + text + "\\n\\n"`` or
``"Assistant: " + text + "\\n\\n"``; ``"\\n\\n"`` (World id 261) is the stop token, so blank lines
inside a turn collapse to one ``"\\n"``. At inference the prompt ends with ``"Assistant:"``.

Templates (where the image goes in a human turn that holds ``<image>``):

- ``sandwich`` (VisualRWKV "middle"): ``{all human turns, images and the short-answer suffix
  removed, joined by \\n}\\n<image>\\n{this turn's text}``: the RNN reads the question before and after
  the image.
- ``image_first`` (LLaVA, VisualRWKV stage 1): ``<image>\\n{text}``. The image prefix does not depend
  on the question, so its recurrent state can be computed once and reused for many questions.
- ``image_last``: ``{text}\\n<image>``.

Each ``<image>`` expands to ``num_image_tokens`` copies of :data:`IMAGE_TOKEN_ID` (a negative id that no
real token has); the model scatters the projected image features into those positions. Text chunks
between images are tokenised separately, so a prefix that ends at an image is the same token
sequence whatever follows it.
"""
from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from multimodal_rwkv.errors import ConfigError, DataError
from multimodal_rwkv.training.data import lone_surrogate

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = -200
IGNORE_INDEX = -100
STOP = "\n\n"
SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."
TEMPLATES = ("sandwich", "image_first", "image_last")
ASPECT_MODES = ("crop", "pad")
# PIL's own limit (Image.MAX_IMAGE_PIXELS) is ~89.5 Mpx; bigger images are treated as decompression bombs.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
_BLANK_LINES = re.compile(r"\n(\s*\n)+")


# ------------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------------
def missing_image(path) -> str | None:
    """Why ``path`` is no image file to open ("image file not found", "a directory, not an image
    file", "not a regular file" for a pipe or device), or None when it is a file."""
    if os.path.isfile(path):
        return None
    if os.path.isdir(path):
        return "a directory, not an image file"
    return "not a regular file (a pipe or a device), not an image file" if os.path.exists(path) else \
        "image file not found"


def load_image(path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, decode: bool = True) -> Image.Image | None:
    """Read an image file as an RGB PIL image with EXIF orientation applied.

    Raises DataError naming the file when it is missing, empty, not an image, truncated or
    corrupt, or larger than ``max_pixels`` (a decompression bomb; None: no limit, and Pillow's own
    ~89-megapixel limit does not apply either). ``decode=False`` runs only the cheap checks
    (header, size; no pixel decoding) and returns None.
    """
    path = str(path)
    why = missing_image(path)
    if why is not None and os.path.exists(path):  # a folder, a pipe (a missing file: below, once)
        raise DataError(f"{path}: {why}")
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read image file ({e.strerror})") from None
    if size == 0:
        raise DataError(f"{path}: empty image file (0 bytes)")
    pil_limit = Image.MAX_IMAGE_PIXELS  # max_pixels is the limit (checked below), not Pillow's ~89 Mpx
    try:
        Image.MAX_IMAGE_PIXELS = None
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # a damaged EXIF block: Pillow's two-line warning while reading it (see to_rgb)
            warnings.filterwarnings("ignore", message="(Possibly )?corrupt EXIF", category=UserWarning)
            with Image.open(path) as im:
                w, h = im.size
                if max_pixels is not None and w * h > max_pixels:
                    raise DataError(f"{path}: image is {w}x{h} = {w * h} pixels, over the limit of "
                                    f"{max_pixels} (decompression bomb?)")
                if not decode:
                    return None
                im.load()
                return to_rgb(im)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{path}: decompression bomb ({_short(e)})") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a recognised image file") from None
    except PermissionError as e:  # (it was called corrupt)
        raise DataError(f"{path}: cannot read image file ({e.strerror})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DataError(f"{path}: corrupt or truncated image ({_short(e)})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, with EXIF orientation applied (where the EXIF data can be read: an
    image whose EXIF is damaged is taken as stored, as other readers take it).

    Transparency (RGBA, LA, PA, P/L/RGB with a transparency key) is composited over white, as
    ``transformers``' ``convert_to_rgb`` does. 16-bit and 32-bit greyscale (I;16*, I) are scaled
    to 8 bits (value >> 8) instead of being clipped at 255 as ``Image.convert`` does; float
    greyscale (F) is taken as [0,1] when its maximum is <= 1, else scaled by its maximum.
    """
    try:
        with warnings.catch_warnings():  # Pillow warns, at length, about the EXIF it cannot parse
            warnings.simplefilter("ignore")
            im = ImageOps.exif_transpose(im)
    except Exception as e:  # noqa: BLE001 - unreadable EXIF: the pixels are fine, shown as stored
        logger.debug("EXIF orientation not applied (%s: %s)", type(e).__name__, e)
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im).astype(np.int64)
        if mode == "I" and a.size and a.min() >= 0 and a.max() <= 255:
            a8 = a
        elif mode == "I" and a.size and (a.min() < 0 or a.max() > 65535):
            lo, hi = int(a.min()), int(a.max())
            a8 = (a - lo) * 255 // max(hi - lo, 1)
        else:
            a8 = a >> 8
        return Image.fromarray(a8.astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        a = np.asarray(im).astype(np.float64)
        a = np.nan_to_num(a)
        hi = float(a.max()) if a.size else 1.0
        a = a * 255.0 if hi <= 1.0 else a * (255.0 / hi)
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def image_from_tensor(t) -> Image.Image:
    """A raw image tensor -> RGB PIL image. Accepts [3,H,W] or [1,H,W] (CHW) or [H,W];
    uint8 in [0,255] or float in [0,1]. Float values outside [0,1] (a 0-255 image given as float,
    a normalised one) or NaN raise DataError naming the range found: they are not clipped."""
    import torch

    if not isinstance(t, torch.Tensor):
        raise DataError(f"expected an image (a path, PIL image, tensor or numpy array), got {type(t).__name__}")
    x = t.detach().cpu()
    if x.dim() == 3 and x.shape[0] in (1, 3):
        x = x.permute(1, 2, 0)
    elif x.dim() == 2:
        x = x.unsqueeze(-1)
    else:
        raise DataError(f"image tensor must be [3,H,W], [1,H,W] or [H,W]; got {tuple(t.shape)}")
    if x.dtype == torch.uint8:
        a = x.numpy()
    elif x.is_floating_point():
        a = _float_to_uint8(x.float().numpy())
    else:
        raise DataError(f"image tensor must be uint8 or float, got {x.dtype}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(a), "RGB")


def _float_to_uint8(a: np.ndarray) -> np.ndarray:
    """Float pixel values in [0, 1] -> uint8; values outside [0, 1] or NaN raise DataError."""
    if a.size:
        if np.isnan(a).any():
            raise DataError("float image holds NaN values; expected values in [0, 1]")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0.0 or hi > 1.0:
            hint = " (a 0-255 image: pass it as uint8, or divide by 255)" if hi > 1.0 and lo >= 0.0 else ""
            raise DataError(f"float image values must be in [0, 1]; found [{lo:g}, {hi:g}]{hint}")
    return np.rint(a * 255.0).astype(np.uint8)


def as_pil(image, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Path, PIL image, raw tensor (CHW) or numpy array (HWC or HW, as PIL and OpenCV give them;
    uint8, or float in [0, 1]) -> RGB PIL image. A 4-channel array is RGBA, composited over white
    whether uint8 or float. Float values outside [0, 1] raise DataError (see image_from_tensor)."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, max_pixels)
    if isinstance(image, Image.Image):
        try:
            image.load()  # an image opened lazily decodes here: a truncated file is bad data
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            where = getattr(image, "filename", None) or "image"
            raise DataError(f"{where}: corrupt or truncated image ({_short(e)})") from None
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        import torch

        a = np.array(image)  # a writable, contiguous copy
        if a.ndim == 3 and a.shape[-1] == 4 and (a.dtype == np.uint8 or np.issubdtype(a.dtype, np.floating)):
            if a.dtype != np.uint8:
                a = _float_to_uint8(a.astype(np.float32))
            return to_rgb(Image.fromarray(a, "RGBA"))
        if a.ndim == 3 and a.shape[-1] in (1, 3, 4):
            return image_from_tensor(torch.from_numpy(np.array(a[..., :3])).permute(2, 0, 1))
        if a.ndim == 2:
            return image_from_tensor(torch.from_numpy(a))
        raise DataError(f"image array must be [H,W,3], [H,W,4], [H,W,1] or [H,W]; got {a.shape}")
    return image_from_tensor(image)


def expand2square(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad to a square with ``background`` (LLaVA ``--image_aspect_ratio pad``), image centred."""
    w, h = im.size
    if w == h:
        return im
    side = max(w, h)
    out = Image.new(im.mode, (side, side), background)
    out.paste(im, ((side - w) // 2, (side - h) // 2))
    return out


def is_unicode(text: str) -> bool:
    """Whether ``text`` is real text: no unpaired surrogates, so it can be encoded."""
    return lone_surrogate(text) is None


def is_blank_question(text: str) -> bool:
    """Whether a question holds no text besides white space and ``<image>`` placeholders."""
    return not text.replace(IMAGE_TOKEN, "").strip()


def check_image_folder(folder, setting: str | None = None) -> None:
    """DataError naming ``folder`` (and ``setting``) when it is missing, not a folder, or cannot be
    listed (no permission): one error, not a missing or unreadable image for every record."""
    folder = Path(folder)
    where = f" ({setting})" if setting else ""
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder {'is not a folder' if folder.exists() else 'not found'}{where}")
    try:
        with os.scandir(folder) as it:
            next(it, None)
    except OSError as e:
        raise DataError(f"{folder}: cannot list the image folder ({e.strerror or e}){where}") from None


def _wide_text(raw: bytes) -> str | None:
    """"UTF-32" or "UTF-16" when ``raw`` is text in that encoding: a byte-order mark, or without
    one NUL bytes where its characters' high bytes are (in every character's two top bytes for
    UTF-32; in one byte of many characters and almost never the other for UTF-16), and it decodes
    to text (no NUL character, nearly all printable), else None: a binary file (zeros, an int32
    array, a token .npy) is no text."""
    def text(enc: str, skip: int) -> bool:
        try:
            t = raw[skip:].decode(enc)
        except UnicodeDecodeError:
            return False
        return "\x00" not in t and sum(c.isprintable() or c in "\t\r\n" for c in t) >= 0.95 * len(t)

    boms = ((b"\xff\xfe\x00\x00", "utf-32-le", "UTF-32"), (b"\x00\x00\xfe\xff", "utf-32-be", "UTF-32"),
            (b"\xff\xfe", "utf-16-le", "UTF-16"), (b"\xfe\xff", "utf-16-be", "UTF-16"))
    for bom, enc, name in boms:
        if raw.startswith(bom):
            return name if text(enc, len(bom)) else None
    n = len(raw)
    if n >= 4 and n % 4 == 0:
        z = [raw[i::4].count(0) / (n // 4) for i in range(4)]
        for enc, hit in (("utf-32-le", z[3] == 1 and z[2] >= 0.9), ("utf-32-be", z[0] == 1 and z[1] >= 0.9)):
            if hit and text(enc, 0):
                return "UTF-32"
    if n >= 2 and n % 2 == 0:
        even, odd = raw[0::2].count(0) / (n // 2), raw[1::2].count(0) / (n // 2)
        for enc, hit in (("utf-16-le", odd >= 0.3 and even <= 0.02), ("utf-16-be", even >= 0.3 and odd <= 0.02)):
            if hit and text(enc, 0):
                return "UTF-16"
    return None


def read_text_file(path, what: str = "data file") -> tuple[str, bool]:
    """A UTF-8 text file -> (text, clean). A leading byte-order mark is dropped. Bytes that are not
    UTF-8 do not reject the whole file: they become lone surrogates ``\\udc80``-``\\udcff`` (Python's
    "surrogateescape"), ``clean`` is False, and :func:`utf8_error` tells, line by line, where they
    are. Raises DataError naming the file (``what``: "data file", "questions file") when it is
    missing or unreadable, UTF-16, or binary (it holds NUL bytes)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    if raw.startswith(b"\xef\xbb\xbf"):  # a byte-order mark is not JSON
        raw = raw[3:]
    # a whole file that is no UTF-8 text is one error, not a bad line for every line it seems to have
    wide = _wide_text(raw)
    if wide:
        raise DataError(f"{path}: {wide} text; a {what} must be UTF-8")
    if b"\x00" in raw:  # (JSON writes a NUL as \u0000)
        raise DataError(f"{path}: not a text file (it holds NUL bytes: a binary file?)")
    try:
        return raw.decode("utf-8"), True
    except UnicodeDecodeError:
        return raw.decode("utf-8", "surrogateescape"), False


def utf8_error(line: str) -> str | None:
    """Why a line of :func:`read_text_file` text is not valid UTF-8 ("not valid UTF-8 (byte 0xe9 at
    column 7: invalid continuation byte)", the column counted in bytes), or None when it is."""
    if is_unicode(line):
        return None
    raw = line.encode("utf-8", "surrogateescape")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}: {e.reason})"
    return "not valid UTF-8"


def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


# ------------------------------------------------------------------------------------------------
# conversations
# ------------------------------------------------------------------------------------------------
def check_conversations(conversations, num_images: int, where: str) -> list[tuple[str, str]]:
    """Validate a LLaVA ``conversations`` list -> [(role, text)] with role "human"/"gpt".

    ``where`` names the record in error messages. Raises DataError when the list is empty or
    malformed, a turn has an unknown speaker or a value that is not a string or not text (an
    unpaired surrogate, as a JSON ``"\\ud800"`` escape gives: it cannot be tokenised), there is no
    non-empty assistant reply, ``<image>`` appears in an assistant turn, or the number of
    ``<image>`` placeholders differs from ``num_images``. A first turn from the assistant has no
    prompt: it is dropped, as LLaVA's ``preprocess`` does ("skip the first one if it is not from
    human"), and neither trained on nor counted.
    """
    if not isinstance(conversations, list) or not conversations:
        raise DataError(f"{where}: empty or missing conversations")
    turns = []
    for i, t in enumerate(conversations):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise DataError(f"{where}: turn {i} must be an object with 'from' and 'value'")
        role = _ROLES.get(str(t["from"]).lower())
        if role is None:
            raise DataError(f"{where}: turn {i} has unknown speaker {t['from']!r} (expected human or gpt)")
        if not isinstance(t["value"], str):
            raise DataError(f"{where}: turn {i} value must be a string")
        if not is_unicode(t["value"]):
            raise DataError(f"{where}: turn {i} value holds an unpaired surrogate (\\ud800-\\udfff), not text")
        if role == "gpt" and IMAGE_TOKEN in t["value"]:
            raise DataError(f"{where}: turn {i}: {IMAGE_TOKEN} in an assistant turn")
        turns.append((role, t["value"]))
    if turns[0][0] == "gpt":
        turns = turns[1:]
    if not any(r == "gpt" and v.strip() for r, v in turns):
        raise DataError(f"{where}: no non-empty assistant (gpt) reply")
    n_tok = sum(v.count(IMAGE_TOKEN) for r, v in turns)
    if num_images and n_tok == 0:
        raise DataError(f"{where}: has {num_images} image(s) but no {IMAGE_TOKEN} placeholder")
    if n_tok > num_images:
        raise DataError(f"{where}: {n_tok} {IMAGE_TOKEN} placeholders but only {num_images} image(s)")
    if n_tok < num_images:
        raise DataError(f"{where}: {num_images} images but only {n_tok} {IMAGE_TOKEN} placeholder(s)")
    return turns


def _clean(text: str) -> str:
    return _BLANK_LINES.sub("\n", text.strip())


def apply_template(turns: list[tuple[str, str]], template: str) -> list[tuple[str, str]]:
    """Place each human turn's images per ``template`` (see module doc); collapse blank lines."""
    if template not in TEMPLATES:
        raise ConfigError(f"unknown prompt template {template!r} (choose from {TEMPLATES})")
    all_human = None
    if template == "sandwich":
        parts = []
        for role, v in turns:
            if role != "human":
                continue
            if IMAGE_TOKEN in v:
                v = v.replace(IMAGE_TOKEN, "").strip().replace(SHORT_ANSWER_SUFFIX, "").strip()
            parts.append(_clean(v))
        all_human = "\n".join(p for p in parts if p)
    out = []
    for role, v in turns:
        k = v.count(IMAGE_TOKEN) if role == "human" else 0
        if k == 0:
            out.append((role, _clean(v)))
            continue
        text = _clean(v.replace(IMAGE_TOKEN, ""))
        images = "\n".join([IMAGE_TOKEN] * k)
        if template == "image_first":
            v = images + ("\n" + text if text else "")
        elif template == "image_last":
            v = (text + "\n" if text else "") + images
        else:
            v = (all_human + "\n" if all_human else "") + images + ("\n" + text if text else "")
        out.append((role, v.strip()))
    return out


class VisualRWKVProcessor:
    """Turns images and conversations into model inputs.

    tokenizer: anything with ``encode(str) -> list[int]`` and ``decode(list[int]) -> str`` (the World
    tokenizer). image_processor: the tower's `transformers` image processor (CLIP/SigLIP).
    """

    def __init__(self, tokenizer, image_processor, num_image_tokens: int, template: str = "sandwich",
                 image_aspect_ratio: str = "crop", max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
        if template not in TEMPLATES:
            raise ConfigError(f"unknown prompt template {template!r} (choose from {TEMPLATES})")
        if image_aspect_ratio not in ASPECT_MODES:
            raise ConfigError(f"unknown image_aspect_ratio {image_aspect_ratio!r} (choose from {ASPECT_MODES})")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.num_image_tokens = int(num_image_tokens)
        self.template = template
        self.image_aspect_ratio = image_aspect_ratio
        self.max_image_pixels = max_image_pixels
        self._cache: dict[str, tuple[int, ...]] = {}  # text chunk -> ids (picklable, for DataLoader workers)

    # ---- images ---------------------------------------------------------------------------------
    @property
    def background(self) -> tuple[int, int, int]:
        mean = getattr(self.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
        return tuple(int(m * 255) for m in mean)

    def preprocess_images(self, images) -> "torch.Tensor":  # noqa: F821
        """List of paths / PIL images / raw tensors -> pixel_values [N,3,H,W] float32."""
        import torch

        if not images:
            return torch.zeros(0, 3, *self.image_size)
        pils = [as_pil(im, self.max_image_pixels) for im in images]
        for im, p in zip(images, pils):
            self._check_work_size(p, im)
        if self.image_aspect_ratio == "pad":
            pils = [expand2square(p, self.background) for p in pils]
        pv = self.image_processor(images=pils, return_tensors="pt")["pixel_values"]
        return pv.float()

    def _check_work_size(self, im: Image.Image, source) -> None:
        """The image the preprocessing makes on the way must stay within 4x ``max_image_pixels``
        (a big photo padded to a square may grow that much): a 1,000,000 x 1 strip is a small file,
        but scaling its short side up to the tower's size (CLIP's shortest-edge resize) or padding it
        to a square would take terabytes. A resize straight to the tower's (height, width), as
        SigLIP's, makes nothing bigger than the two."""
        w, h = im.size
        where = source if isinstance(source, (str, os.PathLike)) else "image"
        if w == 0 or h == 0:
            raise DataError(f"{where}: image is {w}x{h}, empty")
        if self.max_image_pixels is None:
            return
        ip = self.image_processor
        side = min(self.image_size)
        if self.image_aspect_ratio == "pad":
            work = max(w, h) ** 2
        elif not getattr(ip, "do_resize", True):
            work = w * h
        elif "height" in (getattr(ip, "size", None) or {}):  # SigLIP: straight to (height, width)
            work = max(self.image_size[0] * self.image_size[1], w * h)
        else:  # CLIP: the shortest edge scaled to the tower's size first
            work = side * side * max(w, h) / min(w, h)
        if work > 4 * self.max_image_pixels:
            raise DataError(f"{where}: image is {w}x{h}; preprocessing it ({self.image_aspect_ratio}) would make "
                            f"{work:.3g} pixels, over the limit of {4 * self.max_image_pixels} (aspect ratio too extreme)")

    @property
    def fixed_size(self) -> tuple[int, int] | None:
        """(H, W) of every image the preprocessing makes, or None when it depends on the image:
        no resize and no centre crop, or a resize of the shortest edge with neither a centre crop
        nor ``image_aspect_ratio="pad"`` squaring the image first."""
        ip = self.image_processor
        if getattr(ip, "do_center_crop", False) and getattr(ip, "crop_size", None):
            return self.image_size
        if not getattr(ip, "do_resize", True):
            return None
        size = getattr(ip, "size", None) or {}
        if "height" in size or self.image_aspect_ratio == "pad":
            return self.image_size
        return None

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the processor's output (nominal: see :attr:`fixed_size`)."""
        ip = self.image_processor
        crop = getattr(ip, "crop_size", None) if getattr(ip, "do_center_crop", False) else None
        size = crop or getattr(ip, "size", None) or {}
        if "height" in size:
            return int(size["height"]), int(size["width"])
        s = int(size.get("shortest_edge", 224))
        return s, s

    # ---- text -----------------------------------------------------------------------------------
    def encode_text(self, s: str) -> list[int]:
        """World ids of a text chunk (cached: prompts repeat the same chunks)."""
        if not s:
            return []
        ids = self._cache.get(s)
        if ids is None:
            ids = tuple(self.tokenizer.encode(s))
            if len(self._cache) >= 8192:
                self._cache.clear()
            self._cache[s] = ids
        return list(ids)

    def _encode_with_images(self, s: str) -> list[int]:
        ids: list[int] = []
        chunks = s.split(IMAGE_TOKEN)
        for j, chunk in enumerate(chunks):
            ids += self.encode_text(chunk)
            if j < len(chunks) - 1:
                ids += [IMAGE_TOKEN_ID] * self.num_image_tokens
        return ids

    def encode_turns(self, turns: list[tuple[str, str]], add_generation_prompt: bool = False
                     ) -> tuple[list[int], list[int]]:
        """Templated turns -> (input_ids, labels) with IMAGE_TOKEN_ID placeholders expanded.

        labels equal input_ids on the assistant's answer tokens and its closing "\\n\\n" and are
        IGNORE_INDEX elsewhere ("User: …", "Assistant:", images). With ``add_generation_prompt``
        a final "Assistant:" (no trailing space) is appended for generation.
        """
        ids: list[int] = []
        labels: list[int] = []
        for role, text in turns:
            if role == "human":
                t = self._encode_with_images("User: " + text + STOP)
                ids += t
                labels += [IGNORE_INDEX] * len(t)
            else:
                head = self.encode_text("Assistant:")
                ids += head
                labels += [IGNORE_INDEX] * len(head)
                body = self.encode_text(" " + text + STOP) if text else self.encode_text(STOP)
                ids += body
                labels += body
        if add_generation_prompt:
            head = self.encode_text("Assistant:")
            ids += head
            labels += [IGNORE_INDEX] * len(head)
        return ids, labels

    def encode_conversation(self, conversations, num_images: int, where: str = "conversation"
                            ) -> tuple[list[int], list[int]]:
        """A LLaVA ``conversations`` list -> (input_ids, labels); validates it (DataError naming ``where``)."""
        turns = check_conversations(conversations, num_images, where)
        return self.encode_turns(apply_template(turns, self.template))

    def build_prompt(self, question: str, num_images: int = 1, template: str | None = None) -> list[int]:
        """Ids of a single-turn prompt ending in "Assistant:"; ``<image>`` is prepended to the
        question when it has none and ``num_images`` > 0."""
        if num_images and IMAGE_TOKEN not in question:
            question = "\n".join([IMAGE_TOKEN] * num_images) + "\n" + question
        n = question.count(IMAGE_TOKEN)
        if n != num_images:
            raise DataError(f"question has {n} {IMAGE_TOKEN} placeholders for {num_images} image(s)")
        turns = apply_template([("human", question)], template or self.template)
        ids, _ = self.encode_turns(turns, add_generation_prompt=True)
        return ids

    def image_first_split(self, question: str) -> tuple[list[int], list[int]]:
        """(prefix, suffix) ids of the image-first prompt for one image: prefix = "User: " + image,
        the same for every question; prefix + suffix == build_prompt(question, 1, "image_first")."""
        full = self.build_prompt(question, 1, template="image_first")
        prefix = self.encode_text("User: ") + [IMAGE_TOKEN_ID] * self.num_image_tokens
        if full[:len(prefix)] != prefix:  # cannot happen with chunked tokenisation; guard anyway
            raise DataError("image-first prompt does not start with the shared image prefix")
        return prefix, full[len(prefix):]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i >= 0])

    # ---- persistence ----------------------------------------------------------------------------
    def save_pretrained(self, out_dir) -> None:
        """Writes the image processor's preprocessor_config.json (the tokenizer is the fixed World one)."""
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self.image_processor.save_pretrained(str(out_dir))


def image_processor_for(vision_config, image_size: int | None = None):
    """Default `transformers` image processor for a CLIP/SigLIP vision config (used for towers built
    from a config and for released checkpoints without a preprocessor_config.json)."""
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    size = int(image_size or vision_config.image_size)
    if vision_config.model_type in ("clip_vision_model", "clip"):
        return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    if vision_config.model_type in ("siglip_vision_model", "siglip"):
        return SiglipImageProcessor(size={"height": size, "width": size})
    raise ConfigError(f"no default image processor for {vision_config.model_type!r}")
