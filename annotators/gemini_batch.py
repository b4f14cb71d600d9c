"""Gemini batch judging: the step's requests go through the Gemini Batch API, at about half the online price.

``GeminiBatchJudge`` wraps the online ``GeminiJudge`` (same name, version, prompt, request config, reply
validation and cache) and is *deferred* (``annotators.base.DeferredJudge``):

1. ``prepare(items, state_dir)`` sends every item that is neither cached nor already in a batch job as
   inlined requests: ``client.batches.create(model=, src=[InlinedRequest, ...], config=)``, which
   google-genai posts to ``models/{model}:batchGenerateContent``. A step larger than ``batch_max_mb``
   (Google takes 20 MB inline) is split into several jobs. Each request carries its cache key as
   metadata. What was submitted (job names; per request its key, prompt id, candidate ids and shuffled
   order) is written atomically to ``state_dir/gemini-batch.json`` as soon as each job exists, so an
   owner that restarts polls the same jobs instead of paying twice.
2. It polls the jobs (``client.batches.get(name=)``: ``GET batches/{id}``) for up to ``batch_poll_s``;
   while one runs it raises ``BatchPending`` (a ``core.errors.Waiting``): the round stops, and
   `prefloop round resume` calls ``prepare`` again, which polls the stored jobs.
3. A finished job's inlined responses (``job.dest.inlined_responses``) go through the online judge's
   ``_record`` (the same reply validation) into the same cache, in one append. A job that failed, was
   cancelled or expired, and an item whose response is an error, leave their keys out of the cache;
   the state marks the job ingested.
4. ``judge(items)`` is then the online judge: the batch's replies come from the cache, and the items
   the batch could not answer are sent online, with the online retries.

An invalid reply (paid for, but not a valid rating) is cached as invalid, exactly as online, and is not
paid for again. Known gap: a job Google created in the instant before the state file was written (a
kill -9 right there) is unknown to us; its results are not picked up and its items are sent again.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from google.genai import errors as genai_errors
from google.genai import types
from PIL import Image, UnidentifiedImageError

from annotators.base import CandidateText, JudgeHooks, JudgeItem, JudgeTraits, Verdict
from annotators.gemini import MAX_BACKOFF_S, TEMPLATE_VERSION, GeminiJudge, _Call, classify
from core.errors import PrefloopError, Waiting

log = logging.getLogger(__name__)

STATE_NAME = "gemini-batch.json"
REQUEST_OVERHEAD_BYTES = 4_096
"""JSON around one inlined request's image and texts (the response schema, field names), for the size cap."""
SUCCEEDED = frozenset({"JOB_STATE_SUCCEEDED", "JOB_STATE_PARTIALLY_SUCCEEDED"})
ENDED = SUCCEEDED | {"JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED"}


class BatchPending(Waiting):
    """Submitted batch jobs are not done yet; `prefloop round resume` picks their results up."""


class BatchError(PrefloopError):
    """A batch job could not be created or read (after the retries)."""


@dataclass
class BatchRequest:
    """One inlined request of a submitted job: what maps its reply back to our prompt and candidates."""

    key: str
    """The cache key (also the request's metadata)."""
    prompt_id: str
    """The prompt it rates."""
    candidate_ids: list[str]
    """The prompt's candidates, in input order."""
    order: list[int]
    """The shuffle the request showed them in (``order[p]`` is the input index at position p+1)."""


@dataclass
class SubmittedJob:
    """A batch job we created."""

    name: str
    """Google's name for it, ``batches/<id>``."""
    submitted_at: float
    """Unix time of the submission."""
    requests: list[BatchRequest]
    """Its requests, in the order sent."""
    state: str = "JOB_STATE_PENDING"
    """The last state seen (``types.JobState`` value)."""
    ingested: bool = False
    """Its replies are in the cache (or it ended without any)."""
    failed: dict[str, str] = field(default_factory=dict)
    """key -> why the job gave no reply for it (these are sent online)."""


@dataclass
class BatchState:
    """``gemini-batch.json``: every job submitted for one step."""

    model: str
    template_version: str
    jobs: list[SubmittedJob] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> BatchState | None:
        if not path.exists():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        jobs = [SubmittedJob(**{**j, "requests": [BatchRequest(**r) for r in j["requests"]]})
                for j in data["jobs"]]
        return cls(data["model"], data["template_version"], jobs)

    def save(self, path: Path) -> None:
        """Write atomically (temporary file, fsync, rename): a crash leaves the old state or the new one."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(asdict(self), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def _short_state(state: str) -> str:
    return state.removeprefix("JOB_STATE_")


def _age(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class GeminiBatchJudge:
    """The gemini judge in batch mode; see the module docstring."""

    name = "gemini"
    traits = JudgeTraits(reports_progress=True, deferred=True)

    def __init__(self, online: GeminiJudge, *, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep):
        self.online = online
        self.version = online.version
        self.config = online.config
        self.cache = online.cache
        self.hooks: JudgeHooks = online.hooks  # shared: the step's progress hook reaches the online calls
        self.state_dir = online.cache.path.parent
        """Where ``gemini-batch.json`` lives: the cache's folder until ``prepare`` names the step's run
        folder."""
        self._clock = clock
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"GeminiBatchJudge({self.online!r})"

    @property
    def state_path(self) -> Path:
        return self.state_dir / STATE_NAME

    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        """``prepare`` (raises BatchPending while jobs run), then the online judge: batch replies from the
        cache, the items the batch could not answer online."""
        self.prepare(items, self.state_dir)
        return self.online.judge(items)

    def prepare(self, items: Sequence[JudgeItem], state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        path = self.state_path
        state = BatchState.load(path) or BatchState(self.config.model, TEMPLATE_VERSION)
        client = None
        try:
            waiting = [j for j in state.jobs if not j.ingested]
            if not waiting:
                todo = self._todo(items, state)
                if not todo:
                    return
                client = self.online._client()
                waiting = self._submit(client, todo, state, path)
                if not waiting:
                    return
            client = client or self.online._client()
            deadline = self._clock() + self.config.batch_poll_s
            while True:
                for job in waiting:
                    self._poll(client, job)
                    state.save(path)
                waiting = [j for j in waiting if not j.ingested]
                if not waiting:
                    return
                left = deadline - self._clock()
                if left <= 0:
                    raise BatchPending(self._describe(waiting))
                self._sleep(min(self.config.batch_poll_interval_s, left))
        finally:
            if client is not None:
                client.close()

    # ---- submit -----------------------------------------------------------------------------------

    def _todo(self, items: Sequence[JudgeItem], state: BatchState) -> list[tuple[JudgeItem, str]]:
        """Items to send: not cached, not in a job already (a job's failed items go online), one per key."""
        sent = {r.key for job in state.jobs for r in job.requests}
        todo: dict[str, JudgeItem] = {}
        for item in items:
            key = self.online._key(item)
            if item.candidates and key not in self.cache and key not in sent:
                todo.setdefault(key, item)
        return [(item, key) for key, item in todo.items()]

    def _submit(self, client, todo: list[tuple[JudgeItem, str]], state: BatchState,
                path: Path) -> list[SubmittedJob]:
        """Create jobs of at most ``batch_max_mb`` each; the state is saved after each one."""
        cap = self.config.batch_max_mb * 1_000_000
        jobs: list[SubmittedJob] = []
        chunk: list[_Call] = []
        size = 0
        for item, key in todo:
            try:
                call = self.online._prepare(item, key)
            except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as err:
                log.warning("gemini batch: prompt %s not sent (the online path reports it): %s",
                            item.prompt_id, err)
                continue
            n = (len(call.image) * 4 // 3 + len(call.user_prompt) + len(self.online.guide)
                 + REQUEST_OVERHEAD_BYTES)
            if chunk and size + n > cap:
                jobs.append(self._create(client, chunk, state, path))
                chunk, size = [], 0
            chunk.append(call)
            size += n
        if chunk:
            jobs.append(self._create(client, chunk, state, path))
        return jobs

    def _create(self, client, calls: list[_Call], state: BatchState, path: Path) -> SubmittedJob:
        online = self.online
        src = [types.InlinedRequest(contents=online._contents(c), config=online._gen_config(len(c.order)),
                                    metadata={"key": c.key}) for c in calls]
        display = f"prefloop {self.name} {self.version} {len(calls)} prompts"
        created = self._retrying(lambda: client.batches.create(
            model=self.config.model, src=src, config=types.CreateBatchJobConfig(display_name=display)),
            f"create a Gemini batch job of {len(calls)} requests")
        requests = [BatchRequest(c.key, c.item.prompt_id, [x.candidate_id for x in c.item.candidates],
                                 c.order) for c in calls]
        job = SubmittedJob(created.name, self._clock(), requests,
                           state=created.state.value if created.state else "JOB_STATE_PENDING")
        state.jobs.append(job)
        state.save(path)
        log.info("gemini batch: submitted %s (%d requests, model %s)", job.name, len(calls),
                 self.config.model)
        return job

    # ---- poll and ingest --------------------------------------------------------------------------

    def _poll(self, client, job: SubmittedJob) -> None:
        got = self._retrying(lambda: client.batches.get(name=job.name),
                             f"read the Gemini batch job {job.name}", missing_ok=True)
        if got is None:
            job.state = "NOT_FOUND"
            self._end(job, [], f"batch job {job.name} no longer exists at Google")
            return
        job.state = got.state.value if got.state else "JOB_STATE_UNSPECIFIED"
        if job.state not in ENDED:
            return
        if job.state in SUCCEEDED:
            responses = (got.dest.inlined_responses if got.dest else None) or []
            self._end(job, responses, "no reply in the job's output")
        else:
            why = f"batch job {_short_state(job.state)}" + (f": {got.error.message}" if got.error else "")
            self._end(job, [], why)

    def _end(self, job: SubmittedJob, responses: list[types.InlinedResponse], missing: str) -> None:
        """Validate and cache a finished job's replies (one append); every other key is failed."""
        by_key = {r.key: r for r in job.requests}
        records, answered = [], set()
        for i, resp in enumerate(responses):
            key = (resp.metadata or {}).get("key")
            if key is None and len(responses) == len(job.requests):
                key = job.requests[i].key  # responses come in request order
            req = by_key.get(key)
            if req is None:
                log.warning("gemini batch %s: a response for an unknown request (%s); ignored", job.name, key)
                continue
            answered.add(key)
            if resp.error is not None or resp.response is None:
                err = resp.error
                code, message = getattr(err, "code", None), getattr(err, "message", None)
                job.failed[key] = f"batch item error {code}: {message}"
                continue
            if key in self.cache:  # ingested before a crash that came before the state write
                continue
            cands = tuple(CandidateText(c, "") for c in req.candidate_ids)
            item = JudgeItem(req.prompt_id, question="", image_path="", image_id="", candidates=cands)
            call = _Call(item, key, req.order, "", b"", "", 0)
            records.append({**self.online._record(call, resp.response, None, 1), "batch": job.name})
        for key in by_key.keys() - answered:
            job.failed[key] = missing
        self.cache.extend(records)
        job.ingested = True
        ok = sum(r["status"] == "ok" for r in records)
        log.info("gemini batch %s %s: %d replies cached (%d ok, %d invalid), %d to retry online", job.name,
                 _short_state(job.state), len(records), ok, len(records) - ok, len(job.failed))

    def _describe(self, jobs: list[SubmittedJob]) -> str:
        names = ", ".join(j.name for j in jobs)
        states = ", ".join(sorted({_short_state(j.state) for j in jobs}))
        n = sum(len(j.requests) for j in jobs)
        age = _age(self._clock() - min(j.submitted_at for j in jobs))
        return f"Gemini batch {names} (state {states}, {n} requests, submitted {age} ago)"

    def _retrying(self, fn, what: str, missing_ok: bool = False):
        """``fn()``, retried like an online call on 408/429/5xx and connection errors; a BatchError after."""
        cfg = self.config
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except Exception as err:  # noqa: BLE001 - classify() decides
                if missing_ok and isinstance(err, genai_errors.APIError) and err.code == 404:
                    return None
                failure = classify(err, cfg.timeout_s)
            if failure.fatal or not failure.retryable or attempt > cfg.max_retries:
                raise BatchError(f"cannot {what}: {failure.message}; the judge step can be run again "
                                 "(`prefloop round resume`), or set judges.gemini.mode = \"online\"")
            delay = min(MAX_BACKOFF_S, cfg.backoff_s * 2 ** (attempt - 1))
            log.info("gemini batch: %s: %s; retry %d/%d in %.2f s", what, failure.message, attempt,
                     cfg.max_retries, delay)
            self._sleep(delay)
