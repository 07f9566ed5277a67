"""Images in messages: where a content part points, loaded and checked the same way for training
records, evaluation task files and the server.

    {"type": "image", "image": "img/a.png"}                       a path (relative to the records file)
    {"type": "image", "image": "data:image/png;base64,iVBO..."}   a data URL
    {"type": "image_url", "image_url": {"url": ...}}              OpenAI's form of either (or http(s),
                                                                  fetched only when the caller allows it)

An image that is missing, is not an image, or is too large (bytes or pixels) raises BadImage, whose
message says which; the caller adds where (file and line, or the request) and applies its policy
(`finetune.on_bad_record`, or an HTTP 400).
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trulyopen.errors import UserError

MAX_BYTES = 20 * 1024 * 1024  # an encoded image larger than this is refused before it is decoded
MAX_PIXELS = 4096 * 4096  # and a decoded one with more pixels (PIL's decompression-bomb guard is 89M)


class BadImage(UserError, ValueError):
    """An image that cannot be used (missing, not an image, too large); the message says which."""


@dataclass(frozen=True)
class Limits:
    max_bytes: int = MAX_BYTES
    max_pixels: int = MAX_PIXELS
    allow_http: bool = False  # fetch http(s) URLs (the server's --allow-image-urls), else refuse them
    timeout_s: float = 10.0


def image_ref(part: Any) -> str | None:
    """The path, data URL or URL of a content part that is an image; None for any other part."""
    if not isinstance(part, dict):
        return None
    if part.get("type") == "image":
        ref = part.get("image", part.get("url", part.get("path")))
    elif part.get("type") == "image_url":
        url = part.get("image_url")
        ref = url.get("url") if isinstance(url, dict) else url
    else:
        return None
    if not isinstance(ref, str) or not ref:
        raise BadImage("an image part names no image (expected a path, a data URL or a URL)")
    return ref


def read_bytes(ref: str, base_dir: Path | None = None, limits: Limits = Limits()) -> bytes:
    """The encoded bytes an image reference points at, refused when larger than limits.max_bytes."""
    if ref.startswith("data:"):
        head, _, payload = ref.partition(",")
        if ";base64" not in head:
            raise BadImage("a data URL image must be base64-encoded (data:image/png;base64,...)")
        if len(payload) * 3 // 4 > limits.max_bytes:
            raise BadImage(f"image larger than {limits.max_bytes:,} bytes")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise BadImage("a data URL image is not valid base64") from None
    if ref.startswith(("http://", "https://")):
        if not limits.allow_http:
            raise BadImage(f"{ref}: image URLs are not fetched (send a data URL, or allow URLs)")
        return _fetch(ref, limits)
    path = Path(ref[len("file://") :] if ref.startswith("file://") else ref)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_file():
        raise BadImage(f"{path}: no such image file")
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise BadImage(f"{path}: image of {size:,} bytes, larger than {limits.max_bytes:,}")
    return path.read_bytes()


def _fetch(url: str, limits: Limits) -> bytes:
    import httpx

    data = bytearray()
    try:
        with httpx.stream("GET", url, timeout=limits.timeout_s, follow_redirects=True) as r:
            if r.status_code != 200:
                raise BadImage(f"{url}: HTTP {r.status_code}")
            for chunk in r.iter_bytes():
                data += chunk
                if len(data) > limits.max_bytes:  # stop reading: the size limit holds for URLs too
                    raise BadImage(f"{url}: image larger than {limits.max_bytes:,} bytes")
    except httpx.HTTPError as e:
        raise BadImage(f"{url}: cannot fetch ({type(e).__name__})") from None
    return bytes(data)


def decode(data: bytes, what: str = "image", limits: Limits = Limits()):
    """PIL RGB image of encoded bytes; BadImage when they are not an image or have too many pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size  # read from the header: the pixels are not decoded yet
        if w * h > limits.max_pixels:
            raise BadImage(f"{what}: {w}x{h} pixels, more than {limits.max_pixels:,}")
        img.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise BadImage(f"{what}: not an image ({type(e).__name__})") from None
    return img.convert("RGB")


def load_image(ref: str, base_dir: Path | None = None, limits: Limits = Limits()):
    """The PIL RGB image a reference points at (path, data URL, or URL when allowed), checked."""
    what = "data URL image" if ref.startswith("data:") else ref
    return decode(read_bytes(ref, base_dir, limits), what, limits)


def data_url(img, fmt: str = "PNG") -> str:
    """A PIL image as a data URL (what a client sends in an image_url part)."""
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"
