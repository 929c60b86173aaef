"""HTTP service: POST /recommend, POST /items, GET /health (FastAPI on uvicorn).

Concurrent requests are answered together: each request is validated on its own (so one
bad request never fails another), then queued; a single worker takes whatever is waiting
(up to ``max_batch``, waiting at most ``max_wait_ms`` for company) and answers it with one
forward pass in a worker thread, so the event loop keeps accepting connections meanwhile.

``POST /items`` changes what every user is recommended, so with a token it needs
``Authorization: Bearer <token>``; ``/recommend`` and ``/health`` stay open. Every body is
capped in bytes before it is parsed, and ``/items`` in items and characters per text. Every
error answer reads ``{"error": message, ...}``.
"""

from __future__ import annotations

import asyncio
import hmac
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from unisrec_x.serving.recommender import KnownItemsError, Recommender, RequestError, shown

MAX_HISTORY = 1000  # request-size guard; the model itself reads the last max_seq_len items
MAX_K = 1000
MAX_BODY_BYTES = 1 << 20  # any request
MAX_ITEMS = 1000  # per POST /items; each text is encoded, so this bounds the work of one request
MAX_TEXT_CHARS = 10_000  # per item text (the encoder reads at most max_tokens of it anyway)
TOKEN_ENV = "UNISREC_X_SERVE_TOKEN"  # where `unisrec-x serve` reads the token for POST /items


class RecommendRequest(BaseModel):
    history: list[str] = Field(description="item ids, oldest first")
    k: int = Field(10, description="how many items to return")
    exclude_seen: bool = Field(False, description="never return an item of the history")


class ScoredItem(BaseModel):
    item: str
    score: float
    text: str
    alias: str = ""


class RecommendResponse(BaseModel):
    items: list[ScoredItem]


class AddItemsRequest(BaseModel):
    items: dict[str, str] = Field(description="new item id -> its text")


@dataclass
class _Pending:
    history: list[int]  # internal ids, the whole history
    k: int
    exclude_seen: bool
    done: asyncio.Future = field(repr=False)


class MicroBatcher:
    """Collects concurrent requests into one ``Recommender.top_k`` call."""

    def __init__(self, recommender: Recommender, max_batch: int = 64, max_wait_ms: float = 2.0) -> None:
        self.recommender, self.max_batch, self.max_wait = recommender, max_batch, max_wait_ms / 1000
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.batches = 0  # forward passes so far; requests / batches is the batching achieved

    async def submit(self, history: list[int], k: int, exclude_seen: bool) -> tuple[list[float], list[int]]:
        pending = _Pending(history, k, exclude_seen, asyncio.get_running_loop().create_future())
        await self.queue.put(pending)
        return await pending.done

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get_nowait())
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                    except asyncio.TimeoutError:
                        break
            try:
                results = await loop.run_in_executor(None, self._answer, batch)
            except Exception as err:  # noqa: BLE001 - every waiting request must hear about it
                for pending in batch:
                    if not pending.done.done():
                        pending.done.set_exception(err)
                continue
            for pending, result in zip(batch, results):
                if not pending.done.done():
                    pending.done.set_result(result)

    def _answer(self, batch: list[_Pending]) -> list[tuple[list[float], list[int]]]:
        self.batches += 1
        rec = self.recommender
        item_seq, seq_len = rec.pad([p.history[-rec.max_history:] for p in batch])
        exclude = rec.pad([p.history if p.exclude_seen else [] for p in batch])[0]
        scores, ids = rec.top_k(item_seq, seq_len, max(p.k for p in batch), exclude)
        return [(s[:p.k].tolist(), i[:p.k].tolist()) for p, s, i in zip(batch, scores, ids)]


def _error(status: int, message: str, headers: dict[str, str] | None = None, **extra: list) -> JSONResponse:
    """The one error shape; a lone surrogate from the request is escaped, so the answer always encodes."""
    content = {"error": shown(message), **{key: [shown(str(v)) for v in values] for key, values in extra.items()}}
    return JSONResponse(status_code=status, content=content, headers=headers)


class BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` gets 413 before anything parses it.

    Checked on the declared Content-Length and again on the bytes as they arrive (a chunked
    body declares none); the body is then handed on whole, so it is held at most once.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _error(413, f"request body is over {self.max_bytes} bytes")(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self.too_large(scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self.too_large(scope, receive, send)
        whole: list[Message] = [{"type": "http.request", "body": bytes(body), "more_body": False}]

        async def replay() -> Message:
            return whole.pop() if whole else await receive()

        await self.app(scope, replay, send)


class TokenGuard:
    """ASGI middleware: ``POST /items`` needs ``Authorization: Bearer <token>`` (401 before the body is read)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app, self.expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].rstrip("/") == "/items":
            given = dict(scope["headers"]).get(b"authorization", b"")  # raw bytes, as sent
            if not hmac.compare_digest(given, self.expected):  # constant time: no guessing byte by byte
                message = "missing or wrong token: send 'Authorization: Bearer <token>'"
                return await _error(401, message, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(recommender: Recommender, max_batch: int = 64, max_wait_ms: float = 2.0, token: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, max_items: int = MAX_ITEMS,
               max_text_chars: int = MAX_TEXT_CHARS) -> FastAPI:
    """The ASGI app around one ``Recommender``; run it with uvicorn (``unisrec-x serve``).

    Args:
        recommender: the model to serve.
        max_batch: requests answered by one forward pass.
        max_wait_ms: how long a request waits for others to share its pass.
        token: when set, ``POST /items`` needs ``Authorization: Bearer <token>``; ``None`` leaves it open.
        max_body_bytes: larger request bodies get 413.
        max_items: a ``POST /items`` with more items gets 413.
        max_text_chars: a ``POST /items`` with a longer text gets 422 naming the items.
    """
    batcher = MicroBatcher(recommender, max_batch, max_wait_ms)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker = asyncio.create_task(batcher.run())
        yield
        worker.cancel()

    app = FastAPI(title="unisrec-x", lifespan=lifespan)
    app.state.batcher = batcher
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if token:
        app.add_middleware(TokenGuard, token=token)  # added last, so it runs first

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        """FastAPI's and Starlette's own errors (404, 405, an unparsable body) in the same shape."""
        message = str(exc.detail)
        if isinstance(exc.__cause__, RecursionError):  # e.g. [[[[...]]]] 100,000 deep
            message = "malformed JSON body: nested too deeply"
        return _error(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal error ({type(exc).__name__}); the server log has the details")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            return _error(400, "malformed JSON body", details=[str(p.get("ctx", {}).get("error", "")) for p in problems])
        where = "; ".join(f"{'.'.join(str(x) for x in p['loc'][1:]) or 'body'}: {p['msg']}" for p in problems)
        return _error(422, f"invalid request: {where}")

    @app.exception_handler(RequestError)
    async def unanswerable(request: Request, exc: RequestError) -> JSONResponse:
        status = 409 if isinstance(exc, KnownItemsError) else 422
        return _error(status, str(exc), items=exc.items) if exc.items else _error(status, str(exc))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "items": recommender.num_items, "max_history": recommender.max_history,
                "batches": batcher.batches}

    @app.post("/recommend", response_model=RecommendResponse)
    async def recommend(body: RecommendRequest) -> RecommendResponse:
        if not body.history:
            raise RequestError("history is empty: at least one item is needed")
        if len(body.history) > MAX_HISTORY:
            raise RequestError(f"history has {len(body.history)} items; at most {MAX_HISTORY} are accepted "
                               f"(the model reads the last {recommender.max_history})")
        if not 1 <= body.k <= min(MAX_K, recommender.num_items):
            raise RequestError(f"k must be between 1 and {min(MAX_K, recommender.num_items)}, got {body.k}")
        history = recommender.history_ids([body.history])[0]
        scores, ids = await batcher.submit(history, body.k, body.exclude_seen)
        return RecommendResponse(items=[ScoredItem(**recommender.describe(i, s)._asdict())
                                        for s, i in zip(scores, ids) if s == s])

    @app.post("/items", status_code=201)
    async def add_items(body: AddItemsRequest) -> dict:
        if len(body.items) > max_items:
            raise HTTPException(413, f"{len(body.items)} items in one request; at most {max_items} are accepted")
        long = [t for t, text in body.items.items() if len(text) > max_text_chars]
        if long:
            raise RequestError(f"{len(long)} item text(s) over {max_text_chars} characters: "
                               f"{', '.join(long[:20])}", long)
        added = await asyncio.get_running_loop().run_in_executor(None, recommender.add_items, body.items)
        return {"added": added, "items": recommender.num_items}

    return app
