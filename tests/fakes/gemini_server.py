"""A fake Gemini API on 127.0.0.1 for the real google-genai SDK, in tests and benchmarks.

It serves ``POST /{v1,v1beta,v1alpha}/models/{model}:generateContent`` (google-genai 3.x calls ``v1``,
older releases ``v1beta``) and answers with the JSON the SDK parses: ``candidates[0].content.parts[0]
.text`` plus ``usageMetadata``. By default it plays a well-behaved rubric judge: it reads the
``<candidate n="i">`` blocks from the prompt and returns valid scores that depend only on each
candidate's text (``default_scores``), so a test can check the mapping back through a shuffle.

Behaviour is scriptable per request with rules (first match wins, each optionally limited to N uses):

    fake.add_rule(error(429), times=2)                 # 429 twice, then the default
    fake.add_rule(malformed(), when="BROKEN")          # requests whose prompt contains "BROKEN"
    fake.add_rule(hang(5.0))                           # sleep past the client's timeout
    fake.outage(2.0)                                   # 503 for the next 2 s
    FakeGemini(latency_s=0.3)                          # every reply takes 300 ms

Every request is recorded (``fake.requests``): arrival time on ``time.monotonic()`` (the clock the
judge's rate limiter uses), path, model, headers without the API key (``key_sent`` / ``key_ok`` say
whether one was sent and whether it matched), the JSON body, the parsed prompt and the reply status.
The fake never stores the key it receives.

The Batch API (what ``client.batches.create`` / ``client.batches.get`` call, google-genai's
``batches.py``): ``POST .../models/{model}:batchGenerateContent`` with inlined requests answers a
long-running operation ``{"name": "batches/<id>", "metadata": {... "state": "BATCH_STATE_PENDING"}}``;
``GET .../batches/<id>`` answers the same with the state, and once the batch is done
``metadata.output.inlinedResponses.inlinedResponses`` (one ``{"response"|"error", "metadata"}`` per
request, in request order). A batch stays ``BATCH_STATE_RUNNING`` for ``batch_running_polls`` GETs,
then succeeds: each inlined request is answered then, through the same rules as an online request
(recorded in ``fake.requests`` with ``batch`` set; a non-200 reply becomes that item's ``error``).
``fake.end_batch(name, "BATCH_STATE_FAILED")`` ends one otherwise; ``fake.batch_calls`` records the
batch endpoints' calls (method, path).

``FakeGeminiProcess`` runs the same server in a child process (``python gemini_server.py``), so a
benchmark does not share its GIL with the server; it reads the arrival clock over
``GET /_fake/requests`` (``time.monotonic`` is system-wide on Linux, so the clocks compare).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

METRICS = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
PATH = re.compile(r"^/(v1|v1beta|v1alpha)/models/([^/:?]+):generateContent(?:\?.*)?$")
BATCH_CREATE = re.compile(r"^/(v1|v1beta|v1alpha)/models/([^/:?]+):batchGenerateContent(?:\?.*)?$")
BATCH_GET = re.compile(r"^/(v1|v1beta|v1alpha)/batches/([^/:?]+)(?:\?.*)?$")
BATCH_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch"
CANDIDATE = re.compile(r'<candidate n="(\d+)">\n(.*?)\n</candidate>', re.DOTALL)
QUESTION = re.compile(r"<question>\n(.*?)\n</question>", re.DOTALL)
KEY_HEADER = "x-goog-api-key"


@dataclass
class RecordedRequest:
    t: float
    """arrival time, time.monotonic()"""
    path: str
    api_version: str | None
    model: str | None
    headers: dict[str, str]
    """request headers without the API key"""
    key_sent: bool
    key_ok: bool
    body: dict | None
    system: str = ""
    prompt: str = ""
    """the user turn's text"""
    images: list[tuple[str, int]] = field(default_factory=list)
    """(mime type, bytes) of inline images"""
    question: str | None = None
    candidates: list[str] = field(default_factory=list)
    """candidate texts in the order shown to the model (position 1 first)"""
    status: int | None = None
    batch: str | None = None
    """the batch job it came in (``batches/<id>``), None for an online request"""
    metadata: dict | None = None
    """an inlined batch request's metadata"""

    @property
    def generation_config(self) -> dict:
        return (self.body or {}).get("generationConfig", {})


@dataclass
class Reply:
    """How to answer one request."""

    status: int = 200
    text: str | None = None
    """the model's reply text; None means well-formed scores from the server's scorer"""
    body: dict | None = None
    """a whole JSON body (overrides text)"""
    delay_s: float = 0.0
    """extra time before answering (a hang when longer than the client's timeout)"""
    usage: dict | None = None


Responder = Reply | Callable[[RecordedRequest, "FakeGemini"], Reply]


def default_scores(text: str) -> dict[str, int]:
    """Five 0-4 scores that depend only on the candidate text (a different digest byte per metric)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return {m: digest[i] % 5 for i, m in enumerate(METRICS)}


def ratings_for(req: RecordedRequest, scorer: Callable[[str], dict[str, int]]) -> list[dict]:
    return [{"candidate": i, **scorer(text)} for i, text in enumerate(req.candidates, start=1)]


def rubric_text(reasoning: str, ratings: list[dict]) -> str:
    return json.dumps({"reasoning": reasoning, "ratings": ratings})


# ---- reply factories --------------------------------------------------------------------------

def scores() -> Responder:
    """Well-formed scores (the default)."""
    return lambda req, fake: Reply(text=rubric_text("Each candidate checked against the image.",
                                                    ratings_for(req, fake.scorer)))


def text(reply_text: str) -> Reply:
    """A 200 whose model text is exactly ``reply_text``."""
    return Reply(text=reply_text)


def malformed() -> Reply:
    return Reply(text='{"reasoning": "The first answer is right, but the rati')


def missing_candidate() -> Responder:
    return lambda req, fake: Reply(text=rubric_text("one forgotten", ratings_for(req, fake.scorer)[:-1]))


def out_of_range(metric: str = "helpfulness", value: int = 5) -> Responder:
    def make(req, fake):
        ratings = ratings_for(req, fake.scorer)
        ratings[0][metric] = value
        return Reply(text=rubric_text("generous", ratings))
    return make


def extra_candidate() -> Responder:
    def make(req, fake):
        ratings = ratings_for(req, fake.scorer)
        ratings.append({"candidate": len(ratings) + 1, **{m: 2 for m in METRICS}})
        return Reply(text=rubric_text("one too many", ratings))
    return make


def error(code: int, status: str | None = None, message: str | None = None, retry_delay_s: float | None = None) -> Reply:
    status = status or {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                        408: "DEADLINE_EXCEEDED", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL",
                        503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}.get(code, "UNKNOWN")
    err = {"code": code, "message": message or f"fake {status}", "status": status}
    if retry_delay_s is not None:
        err["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{retry_delay_s}s"}]
    return Reply(status=code, body={"error": err})


def blocked(reason: str = "SAFETY") -> Reply:
    """A paid reply with no text: the candidate was stopped (safety filter, recitation, ...)."""
    return Reply(body={"candidates": [{"content": {"role": "model"}, "finishReason": reason, "index": 0}],
                       "usageMetadata": {"promptTokenCount": 300, "totalTokenCount": 300}})


def hang(seconds: float) -> Reply:
    """Answer (well-formed) only after ``seconds``: past the client's timeout, it has given up by then."""
    return Reply(delay_s=seconds)


# ---- the server -------------------------------------------------------------------------------

@dataclass
class FakeBatch:
    """One batch job: its inlined requests, its state and, once it succeeded, the inlined responses."""

    name: str
    model: str
    display_name: str | None
    requests: list[RecordedRequest]
    created: str
    state: str = "BATCH_STATE_PENDING"
    polls: int = 0
    responses: list[dict] | None = None

    def operation(self) -> dict:
        """The long-running operation GET batches/<id> answers."""
        n = len(self.requests)
        failed = sum("error" in r for r in self.responses or [])
        done = self.state in ("BATCH_STATE_SUCCEEDED", "BATCH_STATE_FAILED", "BATCH_STATE_CANCELLED",
                              "BATCH_STATE_EXPIRED")
        meta = {"@type": BATCH_TYPE, "name": self.name, "model": f"models/{self.model}", "state": self.state,
                "createTime": self.created, "updateTime": _now_iso(),
                "batchStats": {"requestCount": str(n), "pendingRequestCount": str(0 if done else n),
                               "successfulRequestCount": str(n - failed if self.responses else 0),
                               "failedRequestCount": str(failed)}}
        if self.display_name:
            meta["displayName"] = self.display_name
        if self.responses is not None:
            meta["output"] = {"inlinedResponses": {"inlinedResponses": self.responses}}
        op = {"name": self.name, "metadata": meta}
        if done:
            op["done"] = True
        return op


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())


@dataclass
class _Rule:
    responder: Responder
    when: Callable[[RecordedRequest], bool] | None
    times: int | None


class FakeGemini:
    """The fake server; use as a context manager or call start()/stop()."""

    def __init__(self, *, api_key: str | None = "fake-key", latency_s: float = 0.0,
                 scorer: Callable[[str], dict[str, int]] = default_scores):
        """``api_key``: the key it accepts (others get Gemini's 400 API_KEY_INVALID); None accepts any."""
        self._expected_key = api_key
        self.latency_s = latency_s
        self.scorer = scorer
        self._rules: list[_Rule] = []
        self._outage_until = 0.0
        self._outage_status = 503
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._requests: list[RecordedRequest] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.batches: dict[str, FakeBatch] = {}
        """batch jobs by name (``batches/<id>``)"""
        self.batch_calls: list[tuple[str, str]] = []
        """(method, path) of every call to the batch endpoints"""
        self.batch_running_polls = 0
        """GETs a batch answers RUNNING before it succeeds"""

    # lifecycle
    def start(self) -> Self:
        fake = self

        class Handler(_Handler):
            server_fake = fake

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256

        self._server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-gemini", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # wakes handlers sleeping in latency / hang
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the fake first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # scripting
    def add_rule(self, responder: Responder, *, when: str | Callable[[RecordedRequest], bool] | None = None,
                 times: int | None = None) -> None:
        """Answer matching requests with ``responder``; ``when`` a predicate or a prompt substring."""
        if isinstance(when, str):
            needle = when
            when = lambda req: needle in req.prompt
        with self._lock:
            self._rules.append(_Rule(responder, when, times))

    def clear_rules(self) -> None:
        with self._lock:
            self._rules.clear()

    def outage(self, seconds: float, status: int = 503) -> None:
        """Every request gets ``status`` for the next ``seconds``."""
        with self._lock:
            self._outage_until = time.monotonic() + seconds
            self._outage_status = status

    # inspection
    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def arrivals(self) -> list[float]:
        return [r.t for r in self.requests]

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()

    def end_batch(self, name: str, state: str = "BATCH_STATE_SUCCEEDED") -> None:
        """End a batch now: SUCCEEDED answers its requests (through the rules), any other state none."""
        batch = self.batches[name]
        if state == "BATCH_STATE_SUCCEEDED":
            self._answer_batch(batch)
        batch.state = state

    # the batch endpoints
    def _create_batch(self, model: str, body: dict, key_ok: bool) -> FakeBatch:
        spec = body.get("batch") or {}
        inlined = ((spec.get("inputConfig") or {}).get("requests") or {}).get("requests") or []
        salt = hashlib.sha256(str(time.time()).encode()).hexdigest()[:8]
        name = f"batches/fake{len(self.batches) + 1:04d}{salt}"
        reqs = []
        for i, entry in enumerate(inlined):
            req = RecordedRequest(t=time.monotonic(), path=f"{name}#{i}", api_version=None, model=model,
                                  headers={}, key_sent=True, key_ok=key_ok, body=entry.get("request") or {}, batch=name,
                                  metadata=entry.get("metadata"))
            _parse_prompt(req)
            reqs.append(req)
        batch = FakeBatch(name, model, spec.get("displayName"), reqs, _now_iso())
        with self._lock:
            self.batches[name] = batch
        return batch

    def _poll_batch(self, name: str) -> FakeBatch | None:
        batch = self.batches.get(name)
        if batch is None:
            return None
        batch.polls += 1
        if batch.state in ("BATCH_STATE_PENDING", "BATCH_STATE_RUNNING"):
            if batch.polls > self.batch_running_polls:
                self.end_batch(name)
            else:
                batch.state = "BATCH_STATE_RUNNING"
        return batch

    def _answer_batch(self, batch: FakeBatch) -> None:
        out = []
        for req in batch.requests:
            reply = self._record(req)
            req.status = reply.status
            body = self._body(req, reply)
            entry = {"metadata": req.metadata} if req.metadata is not None else {}
            if reply.status == 200:
                entry["response"] = body
            else:
                err = body.get("error") or {}
                entry["error"] = {"code": err.get("code", reply.status),
                                  "message": err.get("message", "fake error")}
            out.append(entry)
        batch.responses = out

    # internals
    def _record(self, req: RecordedRequest) -> Reply:
        with self._lock:
            self._requests.append(req)
            if req.t < self._outage_until:
                return error(self._outage_status)
            if self._expected_key is not None and not req.key_ok:
                return Reply(status=400, body={"error": {
                    "code": 400, "message": "API key not valid. Please pass a valid API key.",
                    "status": "INVALID_ARGUMENT",
                    "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}]}})
            for rule in self._rules:
                if rule.times is not None and rule.times <= 0:
                    continue
                if rule.when is None or rule.when(req):
                    if rule.times is not None:
                        rule.times -= 1
                    responder = rule.responder
                    break
            else:
                responder = scores()
        return responder if isinstance(responder, Reply) else responder(req, self)

    def _body(self, req: RecordedRequest, reply: Reply) -> dict:
        if reply.body is not None:
            return reply.body
        if reply.text is None:
            reply = scores()(req, self)
        n_in = (len(req.system) + len(req.prompt)) // 4 + 258 * len(req.images)
        n_out = max(1, len(reply.text) // 4)
        usage = reply.usage or {"promptTokenCount": n_in, "candidatesTokenCount": n_out, "totalTokenCount": n_in + n_out}
        return {"candidates": [{"content": {"role": "model", "parts": [{"text": reply.text}]},
                                "finishReason": "STOP", "index": 0}],
                "usageMetadata": usage, "modelVersion": req.model}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's pooled client expects
    disable_nagle_algorithm = True  # else headers and body in two writes cost a 40 ms delayed ACK
    server_fake: FakeGemini

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout)

    def do_GET(self) -> None:
        bm = BATCH_GET.match(self.path)
        if bm:
            self._batch_get(f"batches/{bm.group(2)}")
        elif self.path == "/_fake/requests":  # for FakeGeminiProcess
            self._send(200, {"requests": [{"t": r.t, "path": r.path, "status": r.status, "key_sent": r.key_sent,
                                           "key_ok": r.key_ok, "candidates": len(r.candidates)}
                                          for r in self.server_fake.requests]})
        else:
            self._send(404, {"error": {"code": 404, "message": "fake: unknown path", "status": "NOT_FOUND"}})

    def do_POST(self) -> None:
        t = time.monotonic()
        fake = self.server_fake
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/_fake/reset":
            fake.reset()
            self._send(200, {})
            return
        bm = BATCH_CREATE.match(self.path)
        if bm:
            self._batch_create(bm.group(2), raw)
            return
        m = PATH.match(self.path)
        key = self.headers.get(KEY_HEADER)
        headers = {k: v for k, v in self.headers.items() if k.lower() != KEY_HEADER}
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        req = RecordedRequest(t=t, path=self.path, api_version=m.group(1) if m else None,
                              model=m.group(2) if m else None, headers=headers, key_sent=bool(key),
                              key_ok=fake._expected_key is None or key == fake._expected_key, body=body)
        del key
        if not m or body is None:
            req.status = 404 if not m else 400
            with fake._lock:
                fake._requests.append(req)
            self._send(req.status, {"error": {"code": req.status, "message": "fake: unknown path or bad JSON",
                                              "status": "NOT_FOUND" if not m else "INVALID_ARGUMENT"}})
            return
        _parse_prompt(req)
        reply = fake._record(req)
        wait = fake.latency_s + reply.delay_s
        if wait > 0 and fake._stop.wait(wait):
            return  # server stopping
        req.status = reply.status
        self._send(reply.status, fake._body(req, reply))


    def _key_refused(self) -> bool:
        """Answer Gemini's 400 API_KEY_INVALID (and return True) when the key is wrong."""
        fake = self.server_fake
        if fake._expected_key is None or self.headers.get(KEY_HEADER) == fake._expected_key:
            return False
        self._send(400, {"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.",
                                   "status": "INVALID_ARGUMENT"}})
        return True

    def _batch_create(self, model: str, raw: bytes) -> None:
        fake = self.server_fake
        fake.batch_calls.append(("POST", self.path))
        if self._key_refused():
            return
        try:
            body = json.loads(raw)
        except ValueError:
            self._send(400, {"error": {"code": 400, "message": "fake: bad JSON",
                                       "status": "INVALID_ARGUMENT"}})
            return
        self._send(200, fake._create_batch(model, body, key_ok=True).operation())

    def _batch_get(self, name: str) -> None:
        fake = self.server_fake
        fake.batch_calls.append(("GET", self.path))
        if self._key_refused():
            return
        batch = fake._poll_batch(name)
        if batch is None:
            self._send(404, {"error": {"code": 404, "message": f"fake: no batch {name}",
                                       "status": "NOT_FOUND"}})
        else:
            self._send(200, batch.operation())


def _parse_prompt(req: RecordedRequest) -> None:
    body = req.body or {}
    sys_parts = ((body.get("systemInstruction") or {}).get("parts")) or []
    req.system = "".join(p.get("text", "") for p in sys_parts)
    texts = []
    for content in body.get("contents", []):
        for part in content.get("parts", []):
            if "text" in part:
                texts.append(part["text"])
            inline = part.get("inlineData") or part.get("inline_data")
            if inline:
                mime = inline.get("mimeType") or inline.get("mime_type") or ""
                data = str(inline.get("data", "")).replace("-", "+").replace("_", "/")
                req.images.append((mime, len(base64.b64decode(data + "=" * (-len(data) % 4)))))
    req.prompt = "\n".join(texts)
    q = QUESTION.search(req.prompt)
    req.question = q.group(1) if q else None
    found = sorted((int(n), t) for n, t in CANDIDATE.findall(req.prompt))
    req.candidates = [t.replace("<\\/candidate", "</candidate") for _, t in found]


# ---- the server in a child process ------------------------------------------------------------

class FakeGeminiProcess:
    """The default (well-formed) fake in a child process; rules cannot be scripted across processes."""

    def __init__(self, *, api_key: str | None = "fake-key", latency_s: float = 0.0):
        self.api_key, self.latency_s = api_key, latency_s
        self._proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> Self:
        cmd = [sys.executable, __file__, "--latency", str(self.latency_s)]
        if self.api_key is not None:
            cmd += ["--api-key", self.api_key]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.url = self._proc.stdout.readline().strip()
        if not self.url.startswith("http://"):
            self.stop()
            raise RuntimeError(f"the fake Gemini server did not start (said {self.url!r})")
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stdin.close()  # the child exits when its stdin closes
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc.stdout.close()
            self._proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def requests(self) -> list[dict]:
        """The recorded requests, as dicts (t, path, status, key_sent, key_ok, candidates)."""
        with urllib.request.urlopen(self.url + "/_fake/requests", timeout=30) as r:
            return json.loads(r.read())["requests"]

    def arrivals(self) -> list[float]:
        return [r["t"] for r in self.requests]

    def reset(self) -> None:
        urllib.request.urlopen(urllib.request.Request(self.url + "/_fake/reset", data=b"{}", method="POST"),
                               timeout=30).close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Run the fake Gemini server until stdin closes.")
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--api-key", default=None)
    args = ap.parse_args(argv)
    fake = FakeGemini(api_key=args.api_key, latency_s=args.latency).start()
    print(fake.url, flush=True)
    try:
        sys.stdin.read()
    except KeyboardInterrupt:
        pass
    fake.stop()


if __name__ == "__main__":
    main()
