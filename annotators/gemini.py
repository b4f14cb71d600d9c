"""The ``gemini`` judge: Gemini rates all candidates of a prompt on the HelpSteer rubric in one call.

Per prompt, one ``generateContent`` call with the image (inline bytes), the question and the k
candidates in a seeded random order; the reply is structured JSON (reasoning first, then five 0-4
scores per candidate), validated by ``annotators.rubric.parse_reply`` and mapped back to candidate
ids. A reply that does not validate is ``invalid`` (raw text kept); a call that still fails after its
retries is ``error``; neither stops the batch.

Network behaviour, all from ``GeminiConfig``:
- ``concurrency`` calls in flight (an ``asyncio.Semaphore``), inside client-side limits of
  ``requests_per_minute`` and ``tokens_per_minute`` (``annotators.ratelimit``; tokens are input
  tokens, as Gemini counts them: estimated from the prompt before the call, corrected from
  ``usage_metadata`` after it).
- Retries are ours, not the SDK's: the SDK's ``HttpRetryOptions`` retries inside one
  ``generate_content`` call, invisibly to us, without going back through the rate limiter and without
  the semaphore released while it sleeps. Our loop retries 408/429/5xx, timeouts and connection
  errors up to ``max_retries`` times with exponential backoff (``backoff_s * 2**n``, capped at 60 s,
  equal jitter: a random 50-100 % of it), honours a server's ``RetryInfo`` delay on 429, counts every
  attempt and retry in ``stats``, and re-acquires the limiter for every attempt. The SDK is left at
  its default of one attempt.
- Each call is bounded by ``timeout_s`` (``asyncio.wait_for``; the SDK's ``HttpOptions.timeout``
  also tells the server, via ``X-Server-Timeout``).
- An authentication failure (401/403, or a 400 naming an invalid API key) stops further calls in the
  batch: the remaining items become ``error`` without being sent.

Every paid reply (``ok`` or ``invalid``) is appended to the on-disk cache (``annotators.judge_cache``)
as it arrives; items already in the cache are not sent again. The API key comes from the argument or
the environment (``GEMINI_API_KEY`` / ``GOOGLE_API_KEY``) and is kept only in memory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import logging
import math
import os
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from PIL import Image, UnidentifiedImageError

from annotators import rubric
from annotators.base import (
    METRICS,
    CandidateScore,
    JudgeHooks,
    JudgeItem,
    JudgeTraits,
    Verdict,
    rubric_overall,
)
from annotators.judge_cache import JudgeCache, cache_key
from annotators.ratelimit import RateLimiter, SlidingWindowLimiter
from core.config import GeminiConfig, WorkspaceConfig
from core.errors import ConfigError

log = logging.getLogger(__name__)

TEMPLATE_VERSION = rubric.TEMPLATE_VERSION
KEY_ENV_VARS = ("GOOGLE_API_KEY", "GEMINI_API_KEY")  # the SDK's own order of preference
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
AUTH_STATUS = frozenset({401, 403})
MAX_BACKOFF_S = 60.0
MAX_SERVER_DELAY_S = 120.0
ERROR_CHARS = 300

# Image formats Gemini takes inline as they are; anything else is re-encoded as PNG.
INLINE_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "MPO": "image/jpeg", "WEBP": "image/webp",
               "HEIC": "image/heic", "HEIF": "image/heif"}
IMAGE_TOKENS_PER_TILE = 258
IMAGE_TILE = 768


def _transport_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(timeout, other transport) exception classes of whichever HTTP stacks are installed."""
    timeouts: list[type[BaseException]] = [TimeoutError]
    transport: list[type[BaseException]] = []
    for mod in ("httpx", "httpx2"):
        try:
            lib = __import__(mod)
        except ImportError:
            continue
        timeouts.append(lib.TimeoutException)
        transport.append(lib.TransportError)
    try:
        import aiohttp
        timeouts.append(aiohttp.ServerTimeoutError)
        transport.append(aiohttp.ClientConnectionError)
    except ImportError:
        pass
    return tuple(timeouts), tuple(transport)


TIMEOUT_ERRORS, TRANSPORT_ERRORS = _transport_errors()


def resolve_api_key(explicit: str | None = None) -> str:
    """The API key: the argument, else GOOGLE_API_KEY, else GEMINI_API_KEY; never from a config file."""
    key = explicit or next((os.environ[v] for v in KEY_ENV_VARS if os.environ.get(v)), None)
    if not key:
        raise ConfigError(
            "no Gemini API key: set GEMINI_API_KEY (or GOOGLE_API_KEY) in the environment of the process "
            "that runs the judge (get a key at https://aistudio.google.com/apikey); keys are never read "
            "from prefloop.toml")
    return key


@dataclass
class JudgeStats:
    """Counters of one ``judge``/``ajudge`` run."""

    items: int = 0
    cache_hits: int = 0
    calls: int = 0
    """HTTP requests sent, retries included"""
    retries: int = 0
    ok: int = 0
    invalid: int = 0
    error: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    rate_wait_s: float = 0.0
    """time spent waiting for the client-side rate limit"""

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Failure:
    message: str
    retryable: bool
    fatal: bool = False
    server_delay_s: float | None = None


@dataclass
class _Call:
    """A prepared request for one item."""

    item: JudgeItem
    key: str
    order: list[int]
    user_prompt: str
    image: bytes
    mime: str
    est_tokens: int


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 3] + "..."


def _retry_info_delay(details) -> float | None:
    """The ``google.rpc.RetryInfo`` delay of an error body, in seconds, if any."""
    try:
        for d in details.get("error", {}).get("details", []) or []:
            if str(d.get("@type", "")).endswith("google.rpc.RetryInfo"):
                m = re.fullmatch(r"\s*([0-9.]+)s\s*", str(d.get("retryDelay", "")))
                if m:
                    return float(m.group(1))
    except AttributeError:
        pass
    return None


def classify(err: BaseException, timeout_s: float) -> _Failure:
    """What a failed call means: its message, and whether to retry it or stop the batch."""
    if isinstance(err, genai_errors.APIError):
        code = int(err.code or 0)
        msg = _short(f"{code} {err.status or ''}: {err.message or err.details}")
        fatal = code in AUTH_STATUS or (code == 400 and "API_KEY_INVALID" in str(err.details))
        if fatal:
            msg += " (check GEMINI_API_KEY / GOOGLE_API_KEY)"
        retryable = code in RETRY_STATUS or code >= 500
        return _Failure(msg, retryable, fatal, _retry_info_delay(err.details) if code == 429 else None)
    if isinstance(err, TIMEOUT_ERRORS):
        return _Failure(f"no reply within {timeout_s:g} s (timeout_s)", True)
    if isinstance(err, TRANSPORT_ERRORS):
        return _Failure(_short(f"connection error: {type(err).__name__}: {err}"), True)
    return _Failure(_short(f"{type(err).__name__}: {err}"), False)


def load_image(path: Path) -> tuple[bytes, str, tuple[int, int]]:
    """Image bytes, mime type and size, re-encoded as PNG if Gemini does not take the format inline."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        fmt, size = im.format, im.size
        if fmt in INLINE_MIME:
            return data, INLINE_MIME[fmt], size
        buf = io.BytesIO()
        im.convert("RGBA" if "A" in im.getbands() else "RGB").save(buf, format="PNG")
    return buf.getvalue(), "image/png", size


def estimate_tokens(text: str, image_size: tuple[int, int]) -> int:
    """Input tokens before the call: ~4 characters a token, 258 tokens per 768-pixel image tile."""
    return estimate_tokens_of(len(text), image_size)


def estimate_tokens_of(chars: int, image_size: tuple[int, int]) -> int:
    """``estimate_tokens`` from the text's length alone."""
    w, h = image_size
    tiles = 1 if max(w, h) <= 384 else math.ceil(w / IMAGE_TILE) * math.ceil(h / IMAGE_TILE)
    return math.ceil(chars / 4) + IMAGE_TOKENS_PER_TILE * tiles


class GeminiJudge:
    """Gemini HelpSteer rubric judge; see the module docstring."""

    name = "gemini"
    version = TEMPLATE_VERSION
    traits = JudgeTraits(reports_progress=True)  # rates all candidates of a prompt in one call

    def __init__(self, config: GeminiConfig, cache_path: Path, *, api_key: str | None = None, seed: int = 0,
                 on_progress: Callable[[int, int], None] | None = None, image_root: Path | None = None,
                 limiter: RateLimiter | None = None):
        """``image_root`` resolves relative ``JudgeItem.image_path``s (the workspace folder);
        ``limiter`` replaces the default 60 s window (tests use a scaled window)."""
        self.config = config
        self._api_key = resolve_api_key(api_key)
        self.seed = seed
        self.hooks = JudgeHooks(on_progress=on_progress)
        self.image_root = Path(image_root) if image_root is not None else None
        self.cache = JudgeCache(Path(cache_path))
        self.limiter = limiter or SlidingWindowLimiter(config.requests_per_minute, config.tokens_per_minute, 60.0)
        self.stats = JudgeStats()
        self.guide = rubric.labelling_guide()
        self._gen_configs: dict[int, types.GenerateContentConfig] = {}
        self._rng = random.Random()

    def __repr__(self) -> str:
        return f"GeminiJudge(model={self.config.model!r}, version={self.version!r}, cache={self.cache.path})"

    # ---- public ---------------------------------------------------------------------------------

    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        """Judge a batch; same length and order as ``items``. Usable from any thread."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.ajudge(items))
        # called from inside a running event loop: run the batch on a loop of its own
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gemini-judge") as pool:
            return pool.submit(asyncio.run, self.ajudge(items)).result()

    async def ajudge(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        items = list(items)
        self.stats = JudgeStats(items=len(items))
        keys = [self._key(it) for it in items]
        misses = len({k for k in keys if k not in self.cache})
        log.info("gemini judge: %d items, %d to send (%d in the cache %s); model %s, concurrency %d, "
                 "%d requests / %d tokens per minute", len(items), misses, len(items) - misses,
                 self.cache.path.name, self.config.model, self.config.concurrency,
                 self.config.requests_per_minute, self.config.tokens_per_minute)
        self._sem = asyncio.Semaphore(self.config.concurrency)
        self._key_locks: dict[str, asyncio.Lock] = {}
        self._fatal: str | None = None
        self._done = 0
        wait_before = getattr(self.limiter, "waited_s", 0.0)
        client = self._client() if misses else None
        verdicts: list[Verdict | None] = [None] * len(items)
        todo = iter(enumerate(zip(items, keys)))

        async def worker() -> None:
            for i, (item, key) in todo:
                verdicts[i] = await self._one(client, item, key)

        # Workers, not one task per item: only ~2 x concurrency images are in memory at a time; twice
        # as many workers as slots, so a worker sleeping in a backoff does not idle a slot.
        n_workers = min(len(items), 2 * self.config.concurrency)
        try:
            await asyncio.gather(*(worker() for _ in range(n_workers)))
        finally:
            if client is not None:
                aclose = getattr(client.aio, "aclose", None)  # older google-genai releases have none
                if aclose is not None:
                    await aclose()
                client.close()
        self.stats.rate_wait_s = getattr(self.limiter, "waited_s", 0.0) - wait_before
        s = self.stats
        log.info("gemini judge: %d ok, %d invalid, %d error; %d calls (%d retries), %d cache hits, "
                 "%d tokens in, %d out", s.ok, s.invalid, s.error, s.calls, s.retries, s.cache_hits,
                 s.tokens_in, s.tokens_out)
        return list(verdicts)

    # ---- per item -------------------------------------------------------------------------------

    def _client(self) -> genai.Client:
        opts = types.HttpOptions(timeout=max(1, int(self.config.timeout_s * 1000)))
        if self.config.base_url:  # else the SDK's default, or GOOGLE_GEMINI_BASE_URL
            opts.base_url = self.config.base_url
        return genai.Client(api_key=self._api_key, http_options=opts)

    def _key(self, item: JudgeItem) -> str:
        return cache_key(self.config.model, TEMPLATE_VERSION, item.image_id, item.question,
                         [c.text for c in item.candidates])

    async def _one(self, client, item: JudgeItem, key: str) -> Verdict:
        try:
            lock = self._key_locks.setdefault(key, asyncio.Lock())
            async with lock:  # a duplicate item waits for the first and then hits the cache
                verdict = await self._judge_item(client, item, key)
        except Exception as err:  # never let one item kill the batch
            log.exception("gemini judge: prompt %s failed unexpectedly", item.prompt_id)
            verdict = self._error(item, _short(f"{type(err).__name__}: {err}"))
        setattr(self.stats, verdict.status, getattr(self.stats, verdict.status) + 1)
        self._done += 1
        if self.hooks.on_progress is not None:
            try:
                self.hooks.on_progress(self._done, self.stats.items)
            except Exception:
                log.exception("gemini judge: the progress callback failed; continuing")
        return verdict

    async def _judge_item(self, client, item: JudgeItem, key: str) -> Verdict:
        record = self.cache.get(key)
        if record is not None:
            self.stats.cache_hits += 1
            return verdict_from_record(record, item)
        if not item.candidates:
            return self._error(item, "no candidates to judge")
        if self._fatal:
            return self._error(item, f"not sent: {self._fatal}")
        try:
            call = await asyncio.to_thread(self._prepare, item, key)
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as err:
            return self._error(item, _short(f"cannot read image {item.image_path}: {err}"))
        outcome = await self._send(client, call)
        if isinstance(outcome, _Failure):
            return self._error(item, outcome.message)
        response, latency_ms, attempts = outcome
        record = self._record(call, response, latency_ms, attempts)
        await asyncio.to_thread(self.cache.append, record)
        return verdict_from_record(record, item)

    def _prepare(self, item: JudgeItem, key: str) -> _Call:
        path = Path(item.image_path)
        if not path.is_absolute() and self.image_root is not None:
            path = self.image_root / path
        image, mime, size = load_image(path)
        order = rubric.presentation_order(item.prompt_id, self.seed, len(item.candidates))
        user = rubric.build_user_prompt(item.question, [item.candidates[i].text for i in order])
        return _Call(item, key, order, user, image, mime, estimate_tokens(self.guide + user, size))

    def _gen_config(self, k: int) -> types.GenerateContentConfig:
        """The request config for k candidates (built once per k: it is the same for every prompt)."""
        if k not in self._gen_configs:
            self._gen_configs[k] = types.GenerateContentConfig(
                system_instruction=self.guide,
                temperature=self.config.temperature,
                response_mime_type="application/json",
                response_json_schema=rubric.response_json_schema(k),
            )
        return self._gen_configs[k]

    @staticmethod
    def _contents(call: _Call) -> list[types.Content]:
        """The user turn of a request: the image, then the question and the candidates."""
        return [types.Content(role="user", parts=[types.Part.from_bytes(data=call.image, mime_type=call.mime),
                                                  types.Part.from_text(text=call.user_prompt)])]

    async def _send(self, client, call: _Call):
        """(response, latency_ms, attempts), or the _Failure that ended the retries."""
        cfg = self.config
        gen_config = self._gen_config(len(call.order))
        contents = self._contents(call)
        attempt = 0
        while True:
            attempt += 1
            async with self._sem:
                if self._fatal:  # checked once a slot is ours: the failure may have come while we waited
                    return _Failure(f"not sent: {self._fatal}", False)
                ticket = await self.limiter.acquire(call.est_tokens)
                actual_tokens = None
                try:
                    if self._fatal:
                        return _Failure(f"not sent: {self._fatal}", False)
                    self.stats.calls += 1
                    t0 = time.perf_counter()
                    response = await asyncio.wait_for(
                        client.aio.models.generate_content(model=cfg.model, contents=contents, config=gen_config),
                        timeout=cfg.timeout_s)
                    latency_ms = (time.perf_counter() - t0) * 1000.0
                    usage = response.usage_metadata
                    actual_tokens = usage.prompt_token_count if usage else None
                    return response, latency_ms, attempt
                except Exception as err:  # noqa: BLE001 - classify() decides: retry, give up, or stop the batch
                    failure = classify(err, cfg.timeout_s)
                finally:
                    ticket.done(actual_tokens)
            if failure.fatal:
                self._fatal = failure.message
            if not failure.retryable or attempt > cfg.max_retries:
                if failure.retryable:
                    failure.message += f" (gave up after {attempt} attempts)"
                log.warning("gemini judge: prompt %s: %s", call.item.prompt_id, failure.message)
                return failure
            delay = min(MAX_BACKOFF_S, cfg.backoff_s * 2 ** (attempt - 1)) * self._rng.uniform(0.5, 1.0)
            if failure.server_delay_s is not None:
                delay = max(delay, min(failure.server_delay_s, MAX_SERVER_DELAY_S))
            self.stats.retries += 1
            log.info("gemini judge: prompt %s: %s; retry %d/%d in %.2f s", call.item.prompt_id,
                     failure.message, attempt, cfg.max_retries, delay)
            await asyncio.sleep(delay)

    def _record(self, call: _Call, response: types.GenerateContentResponse, latency_ms: float | None,
                attempts: int) -> dict:
        """The cache line for a paid reply: parsed scores by input index, or why it is invalid (``latency_ms``
        None for a reply from a batch job)."""
        text = _reply_text(response)
        usage = response.usage_metadata
        tokens_in = usage.prompt_token_count if usage else None
        tokens_out = ((usage.candidates_token_count or 0) + (usage.thoughts_token_count or 0)) if usage else None
        self.stats.tokens_in += tokens_in or 0
        self.stats.tokens_out += tokens_out or 0
        rec = {
            "key": call.key, "judge": self.name, "template_version": TEMPLATE_VERSION, "model": self.config.model,
            "prompt_id": call.item.prompt_id, "candidate_ids": [c.candidate_id for c in call.item.candidates],
            "order": call.order, "status": "ok", "raw_output": text, "reasoning": None, "scores": None,
            "error": None, "latency_ms": None if latency_ms is None else round(latency_ms, 1),
            "tokens_in": tokens_in, "tokens_out": tokens_out,
            "attempts": attempts, "created_at": time.time(),
        }
        try:
            if text is None:
                raise rubric.RubricParseError(f"no text in the reply (finish reason {_finish_reason(response)})")
            parsed = rubric.parse_reply(text, len(call.order))
        except rubric.RubricParseError as err:
            rec.update(status="invalid", error=str(err))
            log.warning("gemini judge: prompt %s: invalid reply: %s", call.item.prompt_id, err)
            return rec
        scores: list[dict | None] = [None] * len(call.order)
        for pos, idx in enumerate(call.order, start=1):
            scores[idx] = parsed.ratings[pos]
        rec.update(reasoning=parsed.reasoning, scores=scores)
        return rec

    def _error(self, item: JudgeItem, message: str) -> Verdict:
        return Verdict(prompt_id=item.prompt_id, status="error", error=message,
                       scores=[CandidateScore(c.candidate_id, status="error") for c in item.candidates])


def _reply_text(response: types.GenerateContentResponse) -> str | None:
    try:
        return response.text
    except (ValueError, AttributeError):
        return None


def _finish_reason(response: types.GenerateContentResponse) -> str:
    try:
        reason = response.candidates[0].finish_reason
        return getattr(reason, "value", str(reason))
    except (TypeError, IndexError, AttributeError):
        feedback = getattr(response, "prompt_feedback", None)
        return f"prompt blocked: {getattr(feedback, 'block_reason', None)}" if feedback else "none"


def verdict_from_record(record: dict, item: JudgeItem) -> Verdict:
    """A Verdict for ``item`` from a cache record (scores are by input index, so ids map through)."""
    status = record["status"]
    scores = []
    for i, cand in enumerate(item.candidates):
        s = CandidateScore(cand.candidate_id, status=status)
        if status == "ok":
            for m in METRICS:
                setattr(s, m, float(record["scores"][i][m]))
            s.overall = rubric_overall(s)
        scores.append(s)
    return Verdict(prompt_id=item.prompt_id, status=status, scores=scores, raw_output=record.get("raw_output"),
                   reasoning=record.get("reasoning"), error=record.get("error"),
                   latency_ms=record.get("latency_ms"), tokens_in=record.get("tokens_in"),
                   tokens_out=record.get("tokens_out"))


def make_gemini(config: WorkspaceConfig, workspace_root: Path):
    """The workspace's Gemini judge (cache at runs/judge_cache/gemini-<template version>.jsonl); with
    ``judges.gemini.mode = "batch"`` wrapped in ``annotators.gemini_batch.GeminiBatchJudge``."""
    root = Path(workspace_root)
    gcfg = config.judges.gemini
    judge = GeminiJudge(gcfg, root / "runs" / "judge_cache" / f"gemini-{TEMPLATE_VERSION}.jsonl",
                        seed=getattr(gcfg, "seed", 0), image_root=root)
    if gcfg.mode == "batch":
        from annotators.gemini_batch import GeminiBatchJudge

        return GeminiBatchJudge(judge)
    return judge
