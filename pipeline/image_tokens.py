"""Prompt tokens of an image by OpenAI's tile rule, and its size from its header.

An image is billed by its pixel size, never by the length of its base64 text:
``detail: low`` is 85 tokens; ``high`` and ``auto`` (taken as high: the upper bound)
scale the image to fit 2048x2048, then its shortest side down to 768, and cost
``85 + 170`` per 512-px tile. The size is read from the image's header (local files
become data URLs in the request, so the header is right there); an http(s) image,
whose size is unknown offline, counts as a 1024x1024 one: 765 tokens. Some small
models (gpt-4o-mini, gpt-4.1-mini) bill images on other scales; the 85/170 rule is
used for every model.

Only headers are parsed (PNG, JPEG, WebP, GIF), without an image library: the bytes
come from input rows, so a header that cannot be read gives no size (and the
1024x1024 default), not an error.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from collections.abc import Mapping
from typing import Any

# Images (OpenAI's vision pricing for the GPT-4o / GPT-4.1 / GPT-5 family).
IMAGE_BASE_TOKENS = 85  # every image; all of a detail=low image
IMAGE_TILE_TOKENS = 170  # per 512-px tile at high detail
IMAGE_TILE_PX = 512
IMAGE_MAX_SIDE = 2048
IMAGE_SHORT_SIDE = 768
# An image whose size cannot be known offline (an http(s) URL) counts as 1024x1024.
DEFAULT_IMAGE_SIZE = (1024, 1024)


def image_tokens(width: int, height: int, detail: str | None) -> int:
    """Prompt tokens of one image of this size: OpenAI's tile rule.

    ``auto`` is counted as ``high``: the server may pick either, and an estimate's
    upper end must not be below what is billed.
    """
    if detail == "low":
        return IMAGE_BASE_TOKENS
    w, h = float(width), float(height)
    if max(w, h) > IMAGE_MAX_SIDE:
        scale = IMAGE_MAX_SIDE / max(w, h)
        w, h = w * scale, h * scale
    if min(w, h) > IMAGE_SHORT_SIDE:
        scale = IMAGE_SHORT_SIDE / min(w, h)
        w, h = w * scale, h * scale
    tiles = math.ceil(w / IMAGE_TILE_PX) * math.ceil(h / IMAGE_TILE_PX)
    return IMAGE_BASE_TOKENS + IMAGE_TILE_TOKENS * tiles


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, JPEG, WebP or GIF header, or None if unreadable.

    Only the header is parsed: no image library is needed to price a request.
    """
    if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return int(width), int(height)
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        width, height = struct.unpack("<HH", data[6:10])
        return int(width), int(height)
    if data.startswith(b"\xff\xd8"):
        return _jpeg_size(data)
    if len(data) >= 30 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_size(data)
    return None


# JPEG start-of-frame markers: they carry the size. (C4, C8, CC are not frames.)
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header seen
            return None
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in _SOF_MARKERS:
            if i + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return int(width), int(height)
        i += 2 + length
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[26:30])
        return int(width & 0x3FFF), int(height & 0x3FFF)
    if chunk == b"VP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    return None


def _data_url_image_size(url: str) -> tuple[int, int] | None:
    """The size of a base64 data URL's image, from its header bytes.

    PNG, GIF and WebP headers sit in the first bytes; a JPEG's frame header can follow
    large EXIF blocks, so if it is not in the first 48 KiB the whole image is decoded.
    """
    head, sep, payload = url.partition(",")
    if not sep or not head.lower().endswith(";base64"):
        return None
    try:
        size = image_size(base64.b64decode(payload[:65536]))
        if size is None and len(payload) > 65536:
            size = image_size(base64.b64decode(payload))
    except (binascii.Error, ValueError):
        return None
    return size


def image_part_tokens(part: Mapping[str, Any]) -> int:
    """Prompt tokens of one ``image_url`` content part (see ``image_tokens``)."""
    spec = part.get("image_url")
    url = spec if isinstance(spec, str) else spec.get("url") if isinstance(spec, Mapping) else None
    detail = spec.get("detail") if isinstance(spec, Mapping) else None
    if detail == "low":
        return IMAGE_BASE_TOKENS
    size = None
    if isinstance(url, str) and url[:5].lower() == "data:":
        size = _data_url_image_size(url)
    width, height = size or DEFAULT_IMAGE_SIZE
    return image_tokens(width, height, detail if isinstance(detail, str) else None)
