"""Turn a row's image references into what the API takes: URLs, or base64 data URLs.

The gateways accept jpeg, png and webp up to 10 MB each and at most 10 images per
request. Checking that here means a bad image costs an
``invalid_input`` row instead of a 413 from the server, after the money for the
other rows was already committed to the run.
"""

from __future__ import annotations

import base64
import stat
from pathlib import Path

from pipeline.errors import ImageError as ImageError
from pipeline.source import open_regular

MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_IMAGES_PER_ROW = 10


def sniff_image_type(head: bytes) -> str | None:
    """The MIME type from the file's first bytes (not its name, which can lie)."""
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def resolve_image(ref: str, base_dir: Path, image_root: Path | None = None) -> str:
    """Return the URL to send for one image reference.

    http(s) and data: URLs pass through. Anything else is a local path, resolved
    against the input file's folder, which it may not leave unless ``image_root``
    names the folder images live in: a job file must not be able to read
    ``/etc/passwd`` into a request.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise ImageError("image reference must be a non-empty string")
    lowered = ref.lower()
    if lowered.startswith(("http://", "https://")):
        return ref
    if lowered.startswith("data:"):
        if not lowered.startswith(("data:image/jpeg", "data:image/png", "data:image/webp")):
            raise ImageError(f"data URL {ref[:30]}...: only jpeg, png and webp images are accepted")
        size = data_url_bytes(ref)
        if size > MAX_IMAGE_BYTES:
            raise ImageError(
                f"data URL {ref[:30]}...: {size / 1048576:.1f} MB, over the 10 MB limit"
            )
        return ref
    root = (image_root or base_dir).resolve()
    path = Path(ref) if Path(ref).is_absolute() else (base_dir / ref)
    path = path.resolve()
    if not path.is_relative_to(root):
        raise ImageError(f"image {ref}: outside {root} (use --image-root to allow another folder)")
    try:
        info = path.stat()
    except OSError:
        raise ImageError(f"image {ref}: file not found") from None
    if not stat.S_ISREG(info.st_mode):
        # A named pipe would block the read forever, a device would never end.
        raise ImageError(f"image {ref}: not a regular file")
    if info.st_size > MAX_IMAGE_BYTES:
        raise ImageError(f"image {ref}: {info.st_size / 1048576:.1f} MB, over the 10 MB limit")
    try:
        with open_regular(path) as fh:  # checked again on the open file: no FIFO swap
            data = fh.read(MAX_IMAGE_BYTES + 1)  # the file may have grown since the stat
    except OSError as exc:
        raise ImageError(f"image {ref}: cannot be read ({exc.strerror})") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"image {ref}: over the 10 MB limit")
    mime = sniff_image_type(data[:16])
    if mime is None:
        raise ImageError(f"image {ref}: not a jpeg, png or webp file")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def data_url_bytes(url: str) -> int:
    """The size of the image a ``data:`` URL holds, from its length alone (no decoding):
    base64 carries 3 bytes in every 4 characters; other data URLs at most one byte a
    character."""
    header, _, payload = url.partition(",")
    if header.lower().endswith(";base64"):
        return len(payload) * 3 // 4 - payload[-2:].count("=")
    return len(payload)
