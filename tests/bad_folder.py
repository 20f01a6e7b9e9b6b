"""An image folder of good and bad files, written for the tests of unreadable images (test_bad_images.py,
test_decoded_folder.py): valid PNG/JPEG images in class folders next to a truncated JPEG, a zero-byte PNG, a text
file named .jpg, a PNG whose header is valid but whose compressed data is garbage, and a PNG whose header claims a
decompression-bomb size."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png(width: int, height: int, idat: bytes) -> bytes:
    """A PNG (8-bit greyscale) with a valid signature, IHDR and CRCs around ``idat``."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def noise(seed: int, size=(24, 20)) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr)


def jpeg_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    noise(seed, (64, 48)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_bad_folder(root: Path) -> tuple[list[str], set[str]]:
    """Write the folder; return the sorted relative paths and the set of bad relative paths."""
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir(parents=True)
    noise(0).save(root / "a" / "00.png")
    noise(1).save(root / "a" / "01.jpg", quality=90)
    (root / "a" / "02_zero.png").write_bytes(b"")
    (root / "a" / "03_text.jpg").write_text("this is a text file, not a JPEG\n")
    noise(2).save(root / "a" / "04.png")
    noise(3).save(root / "b" / "00.jpg", quality=90)
    # header (signature, IHDR, CRCs) fine, the zlib stream is random bytes
    garbage = np.random.default_rng(7).integers(0, 256, 400, dtype=np.uint8).tobytes()
    (root / "b" / "01_garbage.png").write_bytes(png(20, 20, garbage))
    noise(4).save(root / "b" / "02.png")
    # 40000 x 40000 pixels > 2 * Image.MAX_IMAGE_PIXELS: refused before decoding
    (root / "b" / "03_bomb.png").write_bytes(png(40000, 40000, zlib.compress(bytes(40001))))
    whole = jpeg_bytes(5)
    (root / "b" / "04_trunc.jpg").write_bytes(whole[: len(whole) // 2])  # last file: wraps around
    rel = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    bad = {"a/02_zero.png", "a/03_text.jpg", "b/01_garbage.png", "b/03_bomb.png", "b/04_trunc.jpg"}
    return rel, bad


# index of the image each index is replaced by (the next readable one, wrapping)
EXPECTED_SOURCE = [0, 1, 4, 4, 4, 5, 7, 7, 0, 0]
EXPECTED_LABELS = [0, 0, 0, 0, 0, 1, 1, 1, 0, 0]


def file_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
