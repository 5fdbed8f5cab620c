"""The emulated image host: presigned URLs, S3-style errors and real picture files.

PNG images are real pictures at the task's requested ``width`` x ``height``: a
diagonal gradient with a few discs, all drawn from the task's seed and the
image's index (deterministic; about 10 ms for 512x512, 0.1 s for 2048x2048,
built only when downloaded and memoised). JPEG and WebP images are tiny valid
placeholders (8x8 grey, 1x1).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import math
import random
import struct
import zlib
from collections.abc import Mapping
from xml.sax.saxutils import escape

from .._results import TaskStatus
from ._tasks import EmulatedTask
from ._wire import Call, Reply

__all__ = ["IMAGE_TYPES", "ImageHost", "image_bytes", "picture_png", "s3_error"]

#: Content type of each ``response_image_type``.
IMAGE_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_S3_CODES = {403: "AccessDenied", 404: "NoSuchKey", 500: "InternalError", 503: "SlowDown"}

# A 1x1 lossless WebP.
_WEBP = base64.b64decode("UklGRhoAAABXRUJQVlA4TA0AAAAvAAAAEAcQERGIiP4HAA==")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.lru_cache(maxsize=16)
def picture_png(width: int, height: int, seed: int, label: str = "") -> bytes:
    """A ``width`` x ``height`` RGB PNG drawn from ``seed``: a gradient and a few discs.

    Rows are sliced from one precomputed diagonal ramp and the discs are
    spliced in as solid spans, so the cost is a few byte copies per row.
    """
    if width < 1 or height < 1:
        raise ValueError("a picture needs width >= 1 and height >= 1")
    rng = random.Random(seed)

    def colour() -> bytes:
        return bytes(rng.randrange(256) for _ in range(3))

    first, last = colour(), colour()
    span = width + height - 1
    ramp = bytearray(3 * span)
    for i in range(span):
        t = i / max(1, span - 1)
        ramp[3 * i : 3 * i + 3] = bytes(
            round(a + (b - a) * t) for a, b in zip(first, last, strict=True)
        )
    side = min(width, height)
    discs = [
        (rng.randrange(width), rng.randrange(height), rng.randint(side // 12, side // 4), colour())
        for _ in range(rng.randint(3, 6))
    ]
    rows = []
    for y in range(height):
        row = bytearray(b"\x00") + ramp[3 * y : 3 * (y + width)]  # filter byte 0, then RGB
        for cx, cy, radius, fill in discs:
            dy = y - cy
            if -radius <= dy <= radius:
                half = math.isqrt(radius * radius - dy * dy)
                x0, x1 = max(0, cx - half), min(width, cx + half + 1)
                if x1 > x0:
                    row[1 + 3 * x0 : 1 + 3 * x1] = fill * (x1 - x0)
        rows.append(bytes(row))
    text = b"Comment\x00" + label.encode("latin-1", "replace") if label else b""
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + (_png_chunk(b"tEXt", text) if text else b"")
        + _png_chunk(b"IDAT", zlib.compress(b"".join(rows), 1))
        + _png_chunk(b"IEND", b"")
    )


def _jpeg(label: str) -> bytes:
    """A real 8x8 grey baseline JPEG carrying ``label`` in a comment segment."""

    def segment(marker: int, payload: bytes) -> bytes:
        return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload

    one_code = bytes([1] + [0] * 15)  # a Huffman table with one 1-bit code
    return (
        b"\xff\xd8"
        + segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
        + segment(0xFE, label.encode("latin-1", "replace"))
        + segment(0xDB, b"\x00" + b"\x01" * 64)
        + segment(0xC0, struct.pack(">BHHB", 8, 8, 8, 1) + b"\x01\x11\x00")
        + segment(0xC4, b"\x00" + one_code + b"\x00")
        + segment(0xC4, b"\x10" + one_code + b"\x00")
        + segment(0xDA, b"\x01\x01\x00\x00\x3f\x00")
        + b"\x3f\xff\xd9"
    )


def image_bytes(
    image_type: str, label: str, *, width: int = 8, height: int = 8, seed: int = 0
) -> bytes:
    """The file of one image: a drawn PNG, or a tiny JPEG/WebP placeholder."""
    if image_type == "jpeg":
        return _jpeg(label)
    if image_type == "webp":
        return _WEBP
    return picture_png(width, height, seed, label)


def s3_error(
    status: int,
    code: str,
    message: str,
    headers: Mapping[str, str] | None = None,
    *,
    request_id: int = 0,
) -> Reply:
    """S3's XML error body."""
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
        f"<RequestId>{request_id:016X}</RequestId><HostId>novita-emulator</HostId></Error>"
    )
    return Reply(status, {"content-type": "application/xml", **(headers or {})}, body.encode())


def s3_code(status: int) -> str:
    return _S3_CODES.get(status, "InternalError")


class ImageHost:
    """Signs image URLs and serves the images of finished tasks, like a presigned S3 bucket."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def sign(self, key: str, expires: str) -> str:
        digest = hmac.new(self._secret, f"{key}|{expires}".encode(), hashlib.sha256)
        return digest.hexdigest()[:32]

    def url(self, base_url: str, key: str, expires: str) -> str:
        return f"{base_url}/{key}?expires={expires}&signature={self.sign(key, expires)}"

    def serve(
        self, call: Call, tasks: Mapping[str, EmulatedTask], now: float, *, request_id: int
    ) -> Reply:
        """Answer one image request (faults and counters are the caller's)."""

        def refuse(status: int, code: str, message: str) -> Reply:
            return s3_error(status, code, message, request_id=request_id)

        if call.method != "GET":
            return refuse(405, "MethodNotAllowed", "The specified method is not allowed")
        if "authorization" in call.headers:  # what S3 says to a presigned URL with a header
            return refuse(
                400,
                "InvalidArgument",
                "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, "
                "Signature query string parameter or the Authorization header should be specified",
            )
        key = call.path.lstrip("/")
        expires, signature = call.param("expires"), call.param("signature")
        if not expires or not signature:
            return refuse(
                403,
                "AccessDenied",
                "Query-string authentication requires the Signature and Expires parameters",
            )
        if not hmac.compare_digest(signature, self.sign(key, expires)):
            return refuse(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided",
            )
        try:
            expired = now >= float(expires)
        except ValueError:
            expired = True
        if expired:  # checked before the key, like S3
            return refuse(403, "AccessDenied", "Request has expired")
        task_id, _, name = key.partition("/")
        index, _, extension = name.partition(".")
        task = tasks.get(task_id)
        if (
            task is None
            or task.status_at(now) is not TaskStatus.SUCCEED
            or not (index.isdigit() and int(index) < task.image_num)
            or extension != task.image_type
        ):
            return refuse(404, "NoSuchKey", "The specified key does not exist.")
        etag = hashlib.md5(key.encode(), usedforsecurity=False).hexdigest()
        content = image_bytes(
            task.image_type,
            f"novita-emulator {key} seed={task.seed}",
            width=int(task.request["width"]),
            height=int(task.request["height"]),
            seed=task.seed + int(index),
        )
        headers = {"content-type": IMAGE_TYPES[task.image_type], "etag": f'"{etag}"'}
        return Reply(200, headers, content)
