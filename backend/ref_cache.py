"""The reference log-prob cache: each pair's reference log-probs, computed once and kept on disk.

TRL 1.16 refuses ``precompute_ref_log_probs`` for vision datasets, so without this a retried or re-run
round runs the reference forward pass again on every step. The training job (``backend.jobs.train``) looks
every pair up here first; the trainer (``backend.dpo.CachedRefDPOTrainer``) computes only the missing
ones, with TRL's own ``compute_ref_log_probs``, and appends them as they are computed, so a job killed
half way keeps what it paid for.

A pair's key is the SHA-256 of

- the reference checkpoint: its ``config.json`` and, per weights file, name, size, mtime and a hash of
  the file's head, tail and 16 evenly spaced 64 KiB blocks (``model_fingerprint``; a rewritten file
  always gets a new mtime, a copy keeps it with ``cp -p``/``shutil.copy2``/hard links);
- the processor: its JSON config (image processor, chat template) and the tokenizer's full definition;
- the settings that shape the sequence or the numbers: dtype, ``max_length``, ``max_completion_length``,
  the TRL version and this file's ``FORMAT``;
- the pair as it is fed: the image's SHA-256 and the prompt / chosen / rejected messages after the
  answers were capped (so prompt ids play no part: equal content gives equal values).

Storage: ``<cache_dir>/part-<host>-<pid>-<random>.jsonl``, one file per writing process (so ranks of
a distributed job never share a file), one JSON line per pair ``{"key", "chosen", "rejected", ...}``.
Each batch of lines goes out in one ``write`` on an ``O_APPEND`` descriptor, then ``fsync``; a line
cut short by a crash is skipped (and counted) on reading. Values are float32 numbers written as JSON
floats, which round-trip exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FORMAT = 1
PART_GLOB = "part-*.jsonl"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
BLOCK = 64 * 1024
SAMPLED_BLOCKS = 16
SMALL_FILE = 4 * 1024 * 1024  # smaller files are hashed whole


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _file_digest(path: Path, size: int) -> str:
    """SHA-256 of a whole small file, or of its head, tail and evenly spaced blocks for a big one."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        if size <= SMALL_FILE:
            h.update(f.read())
            return h.hexdigest()
        offsets = [0, size - BLOCK] + [i * (size - BLOCK) // (SAMPLED_BLOCKS + 1) for i in range(1, SAMPLED_BLOCKS + 1)]
        for off in offsets:
            f.seek(off)
            h.update(f.read(BLOCK))
    return h.hexdigest()


def resolve_model_folder(path: str | Path) -> Path | None:
    """A local folder for a checkpoint path or a hub id already in the local cache; None if neither."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path), local_files_only=True))
    except Exception:  # noqa: BLE001 - not a cached hub id either: the caller runs without the cache
        return None


def model_fingerprint(folder: Path) -> str:
    """Identity of a model folder's weights and config, cheap even for a 7B model (no full read)."""
    folder = Path(folder)
    config = folder / "config.json"
    parts: list[Any] = [config.read_text(encoding="utf-8") if config.is_file() else None]
    weights = sorted(p for p in folder.iterdir() if p.is_file() and (p.name.endswith(WEIGHT_SUFFIXES)
                                                                      or p.name.endswith(".index.json")))
    if not weights:
        raise FileNotFoundError(f"no weights files in {folder}")
    for p in weights:
        st = p.stat()
        parts.append([p.name, st.st_size, st.st_mtime_ns, _file_digest(p, st.st_size)])
    return _sha(parts)


def processor_fingerprint(processor) -> str:
    """The processor's JSON config plus the tokenizer's full definition (vocab, merges, special tokens)."""
    tok = getattr(processor, "tokenizer", processor)
    backend = getattr(tok, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else sorted(tok.get_vocab().items())
    config = processor.to_json_string() if hasattr(processor, "to_json_string") else repr(processor)
    templates = [getattr(processor, "chat_template", None), getattr(tok, "chat_template", None)]
    return _sha([config, vocab, templates, tok.padding_side, tok.pad_token])


_IMAGE_SHA: dict[tuple[str, int, int], str] = {}


def image_sha(path: str | Path) -> str:
    """SHA-256 of an image file's bytes (memoised per path, size and mtime within the process)."""
    p = Path(path)
    st = p.stat()
    memo = (str(p), st.st_size, st.st_mtime_ns)
    if memo not in _IMAGE_SHA:
        _IMAGE_SHA[memo] = hashlib.sha256(p.read_bytes()).hexdigest()
    return _IMAGE_SHA[memo]


def pair_fingerprint(image_path: str | Path, row: dict) -> str:
    """The pair as it is fed to training: image bytes and the prompt/chosen/rejected messages."""
    return _sha([image_sha(image_path), row["prompt"], row["chosen"], row["rejected"]])


@dataclass(frozen=True)
class CacheContext:
    """Everything besides the pair that the reference log-probs depend on."""

    reference: str
    """model_fingerprint of the reference checkpoint."""
    processor: str
    """processor_fingerprint of the processor that builds the batches."""
    settings: dict = field(default_factory=dict)
    """dtype, max_length, max_completion_length, trl version, cache format."""

    @property
    def digest(self) -> str:
        return _sha([self.reference, self.processor, self.settings])

    def key(self, pair_fp: str) -> str:
        return hashlib.sha256(f"{self.digest}|{pair_fp}".encode()).hexdigest()

    def row_key(self, image_path: str | Path, row: dict) -> str:
        """The cache key of a TRL row as fed (``backend.dpo.RefKeyFn``)."""
        return self.key(pair_fingerprint(image_path, row))


def make_context(reference_folder: Path, processor, *, dtype: str, max_length: int | str,
                 max_completion_length: int) -> CacheContext:
    try:
        trl_version = metadata.version("trl")
    except metadata.PackageNotFoundError:
        trl_version = None
    settings = {"dtype": dtype, "max_length": max_length, "max_completion_length": max_completion_length,
                "trl": trl_version, "format": FORMAT}
    return CacheContext(model_fingerprint(reference_folder), processor_fingerprint(processor), settings)


@dataclass
class CacheStats:
    """What one training run took from the cache and added to it (counted per pair and step)."""

    loaded: int = 0
    """Entries found on disk when the cache was opened."""
    damaged: int = 0
    """Lines skipped on reading (cut short by a crash, or not ours)."""
    served: int = 0
    """Pair-steps whose reference log-probs came from the cache."""
    computed: int = 0
    """Pairs whose reference log-probs were computed in this run (and appended)."""
    ref_forwards: int = 0
    """Reference forward passes (batches) run in this run."""

    def as_dict(self) -> dict:
        return {"loaded": self.loaded, "damaged": self.damaged, "served": self.served,
                "computed": self.computed, "ref_forwards": self.ref_forwards}


class RefLogpCache:
    """Reference log-probs by pair key, read from every part file of a folder; appends to its own part."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.entries: dict[str, tuple[float, float]] = {}
        self.stats = CacheStats()
        self._part = self.folder / f"part-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self._load()

    def _load(self) -> None:
        for part in sorted(self.folder.glob(PART_GLOB)):
            with part.open("rb") as f:
                for raw in f:
                    try:
                        rec = json.loads(raw)
                        self.entries[rec["key"]] = (float(rec["chosen"]), float(rec["rejected"]))
                    except (ValueError, KeyError, TypeError):
                        self.stats.damaged += 1
        self.stats.loaded = len(self.entries)
        if self.stats.damaged:
            log.warning("reference cache %s: skipped %d damaged line(s)", self.folder, self.stats.damaged)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def get(self, key: str) -> tuple[float, float] | None:
        return self.entries.get(key)

    def missing(self, keys: Iterable[str]) -> list[str]:
        return [k for k in keys if k not in self.entries]

    def put_many(self, records: list[tuple[str, float, float, dict]]) -> None:
        """Append (key, chosen, rejected, info) records in one write, then make them durable."""
        new = list({k: (k, c, r, info) for k, c, r, info in records if k not in self.entries}.values())
        if not new:
            return
        now = round(time.time(), 3)
        data = "".join(json.dumps({"key": k, "chosen": c, "rejected": r, **info, "t": now}) + "\n"
                       for k, c, r, info in new).encode()
        fd = os.open(self._part, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        for k, c, r, _ in new:
            self.entries[k] = (c, r)
