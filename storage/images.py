"""The content-addressed image store and the ``images`` table.

An image lives once at ``images/ab/<sha256>.<ext>`` (workspace-relative; ``ab`` = the first two hex
digits of the hash). The extension comes from the format PIL detects in the bytes, never from the
file's name. Files are written atomically (temporary file, then rename), and an import parks its
images in a staging folder until it has validated every row, so a rejected import leaves no files.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa

from core.errors import PrefloopError
from storage.db import fetch_one, scalar

log = logging.getLogger(__name__)

STORE_DIR = "images"
DEFAULT_MAX_MEGAPIXELS = 50.0

# PIL format name -> file extension in the store (formats not listed use the lower-cased name).
FORMAT_EXT: dict[str, str] = {
    "PNG": "png",
    "JPEG": "jpg",
    "MPO": "jpg",
    "GIF": "gif",
    "WEBP": "webp",
    "BMP": "bmp",
    "TIFF": "tiff",
    "JPEG2000": "jp2",
    "ICO": "ico",
    "PPM": "ppm",
    "AVIF": "avif",
}

IMAGE_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("path", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("format", pa.string()),
    ("n_bytes", pa.int64()),
])


class BadImage(PrefloopError):
    """Bytes that are not a usable image (not an image, truncated, corrupt, or too large)."""


@dataclass(frozen=True)
class ImageInfo:
    """What PIL found in the bytes."""

    format: str
    width: int
    height: int


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def store_relpath(image_id: str, fmt: str) -> str:
    """Workspace-relative store path of an image, e.g. ``images/ab/ab12....png``."""
    ext = FORMAT_EXT.get(fmt, fmt.lower())
    return f"{STORE_DIR}/{image_id[:2]}/{image_id}.{ext}"


def probe_image(data: bytes, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS) -> ImageInfo:
    """Identify, size-check, verify and fully decode ``data``; raise BadImage saying what is wrong.

    The pixel count is checked from the header before anything is decoded, so a decompression bomb
    costs nothing. PIL's own hard limit (2 x ``Image.MAX_IMAGE_PIXELS``) still applies above ours.
    """
    from PIL import Image, UnidentifiedImageError

    limit = max_megapixels * 1_000_000
    with warnings.catch_warnings():
        # Our own limit decides; PIL's warning threshold must not reject what --max-megapixels allows.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt, (width, height) = im.format, im.size
        except UnidentifiedImageError:
            raise BadImage("not an image (PIL cannot identify its content; the file extension does not count)") from None
        except Image.DecompressionBombError as err:
            raise BadImage(f"decompression bomb refused by PIL ({err})") from None
        except Exception as err:  # noqa: BLE001 - any decoder failure means a corrupt header
            raise BadImage(f"corrupt image header ({type(err).__name__}: {err})") from None
        if width * height > limit:
            raise BadImage(f"image is {width}x{height} = {width * height / 1e6:.1f} megapixels, over the limit "
                           f"of {max_megapixels:g} (a decompression bomb?); raise it with --max-megapixels")
        if width <= 0 or height <= 0:
            raise BadImage(f"image has no pixels ({width}x{height})")
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.verify()
            with Image.open(io.BytesIO(data)) as im:
                im.load()
        except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, EOFError, struct.error...
            raise BadImage(f"truncated or corrupt {fmt} image ({type(err).__name__}: {err})") from None
    return ImageInfo(format=str(fmt), width=int(width), height=int(height))


def write_atomic(dest: Path, data: bytes) -> None:
    """Write ``dest`` via a temporary file in the same folder and a rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


@dataclass
class ImageStager:
    """Parks new image files under ``images/.staging-<uuid>/`` until ``publish()`` (or ``discard()``).

    ``add`` skips images already in the store. ``publish`` renames every parked file into its store
    path (same filesystem, so each move is atomic) and removes the staging folder.
    """

    root: Path
    pending: dict[str, Path] = field(default_factory=dict)
    _dir: Path | None = None

    def add(self, relpath: str, data: bytes) -> None:
        if relpath in self.pending or (self.root / relpath).is_file():
            return
        if self._dir is None:
            self._dir = self.root / STORE_DIR / f".staging-{uuid.uuid4().hex}"
            self._dir.mkdir(parents=True)
        tmp = self._dir / Path(relpath).name
        tmp.write_bytes(data)
        self.pending[relpath] = tmp

    def publish(self, keep: set[str] | None = None) -> int:
        """Move parked files (only those in ``keep`` when given) into the store; returns how many."""
        n = 0
        for relpath, tmp in self.pending.items():
            if keep is not None and relpath not in keep:
                continue
            dest = self.root / relpath
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dest)
            n += 1
        self.pending.clear()
        self.discard()
        return n

    def discard(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self.pending.clear()


def _register(cur: duckdb.DuckDBPyConnection, table: pa.Table) -> str:
    name = f"_images_{uuid.uuid4().hex}"
    cur.register(name, table)
    return name


def existing_image_ids(cur: duckdb.DuckDBPyConnection, image_ids: list[str]) -> set[str]:
    """The subset of ``image_ids`` already in the ``images`` table."""
    if not image_ids:
        return set()
    name = _register(cur, pa.table({"image_id": pa.array(list(image_ids), pa.string())}))
    try:
        rows = cur.execute(f"SELECT i.image_id FROM images i JOIN {name} n USING (image_id)").fetchall()
    finally:
        cur.unregister(name)
    return {r[0] for r in rows}


def insert_images(cur: duckdb.DuckDBPyConnection, rows: list[dict]) -> int:
    """Bulk-insert image rows (keys of IMAGE_SCHEMA); rows whose image_id exists are skipped.

    Returns the number of new rows. ``rows`` must not repeat an image_id.
    """
    if not rows:
        return 0
    name = _register(cur, pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA))
    try:
        return cur.execute(
            f"""INSERT INTO images (image_id, path, width, height, format, n_bytes)
                SELECT n.image_id, n.path, n.width, n.height, n.format, n.n_bytes FROM {name} n
                WHERE NOT EXISTS (SELECT 1 FROM images i WHERE i.image_id = n.image_id)""").fetchone()[0]
    finally:
        cur.unregister(name)


def get_image(cur: duckdb.DuckDBPyConnection, image_id: str) -> dict | None:
    return fetch_one(cur, "SELECT * FROM images WHERE image_id = ?", [image_id])


def count_images(cur: duckdb.DuckDBPyConnection) -> int:
    return scalar(cur, "SELECT count(*) FROM images")
