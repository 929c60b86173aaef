"""HTTP service: POST /recommend, POST /items, GET /health (FastAPI on uvicorn).

Concurrent requests are answered together: each request is validated on its own (so one
bad request never fails another), then queued; a single worker takes whatever is waiting
(up to ``max_batch``, waiting at most ``max_wait_ms`` for company) and answers it with one
forward pass in a worker thread, so the event loop keeps accepting connections meanwhile.

``POST /items`` changes what every user is recommended, so with a token it needs
``Authorization: Bearer <token>``, checked at the route (so no root path or mount prefix gets
around it) before any of the body is read. Every body must arrive within ``body_timeout_s`` and
is capped in bytes before it is parsed, and ``/items`` in items and characters per text.
Bodies are JSON (``Content-Type: application/json``) with strictly typed fields. Every error
answer reads ``{"error": message, ...}``.
"""

from __future__ import annotations

import asyncio
import email.message
import hmac
import json
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from unisrec_x.serving.recommender import KnownItemsError, Recommender, RequestError, shown

MAX_HISTORY = 1000  # request-size guard; the model itself reads the last max_seq_len items
MAX_K = 1000
MAX_BODY_BYTES = 1 << 20  # any request
BODY_TIMEOUT_S = 10.0  # to send the whole body once the headers are in; a trickling client gets 408
MAX_ITEMS = 1000  # per POST /items; each text is encoded, so this bounds the work of one request
MAX_TEXT_CHARS = 10_000  # per item text (the encoder reads at most max_tokens of it anyway)
TOKEN_ENV = "UNISREC_X_SERVE_TOKEN"  # where `unisrec-x serve` reads the token for POST /items


class RecommendRequest(BaseModel):
    model_config = ConfigDict(strict=True)  # "3", true and 2.0 are not a k, "yes" not a boolean: 422

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
    model_config = ConfigDict(strict=True)

    items: dict[str, str | dict[str, str]] = Field(description="new item id -> its text; for a model with knowledge "
                                                   "fields, field -> text (and \"text\")")


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


class BodyGuard:
    """ASGI middleware: a body over ``max_bytes`` gets 413, one not received within ``timeout_s`` 408.

    Enforced as the app reads the body (through ``receive``), not before, so that a route can
    refuse a request on its headers alone (401 on ``POST /items``) without reading any of it.
    The declared Content-Length is checked on the first read, a chunked body is counted as it
    arrives. The clock starts when the headers are in: a client trickling a byte at a time
    cannot hold a connection for longer. An answer sent before the whole body arrived closes
    the connection, so nobody waits for the rest of it.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        received, complete = 0, declared in ("", "0") and "transfer-encoding" not in headers  # no body at all

        async def guarded_receive() -> Message:
            nonlocal received, complete
            if complete:  # after the body only a disconnect can come, and may take its time
                return await receive()
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise HTTPException(413, f"request body is over {self.max_bytes} bytes")
            try:
                message = await asyncio.wait_for(receive(), deadline - loop.time())
            except asyncio.TimeoutError:
                raise HTTPException(408, f"request body not received within {self.timeout_s:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, f"request body is over {self.max_bytes} bytes")
                complete = not message.get("more_body", False)
            return message

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not complete:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, guarded_receive, closing_send)
        except ClientDisconnect:  # gone before its body was in: nobody to answer, nothing to log
            pass


def token_required(token: str | None):
    """A route dependency: with a token, the request needs ``Authorization: Bearer <token>`` (else 401).

    Checked by the route it guards, not by matching the path, which holds any root path or
    mount prefix (``/rec/items``). It reads only headers, and the route's body is parsed by a
    later dependency (``json_body``), so nothing of the body is read or parsed before it.
    """
    expected = f"Bearer {token}".encode() if token else None

    async def check_token(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode("latin-1")  # the bytes as sent
        if not hmac.compare_digest(given, expected):  # constant time: no guessing byte by byte
            raise HTTPException(401, "missing or wrong token: send 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})

    return check_token


def _is_json(content_type: str) -> bool:
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def json_body(model: type[BaseModel]):
    """A dependency that reads and validates the JSON body of a route, in place of a body parameter.

    FastAPI reads and parses a body parameter before any dependency runs; read here, it comes
    after the route's own dependencies (the token). Errors read as FastAPI's would (400 for
    malformed JSON, 422 naming the fields), plus 415 for a body declared as something else than
    JSON (a body without a Content-Type is read as JSON).
    """

    async def parsed(request: Request) -> BaseModel:
        content_type = request.headers.get("content-type")
        if content_type and not _is_json(content_type):
            raise HTTPException(415, f"the body must be JSON, sent with 'Content-Type: application/json' "
                                     f"(got {content_type!r})")
        raw = await request.body()
        if not raw:
            missing = {"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}
            raise RequestValidationError([missing])
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as err:
            raise RequestValidationError([{"type": "json_invalid", "loc": ("body", err.pos), "msg": "JSON decode error",
                                           "input": {}, "ctx": {"error": err.msg}}]) from err
        except UnicodeDecodeError as err:
            raise HTTPException(400, "malformed JSON body: not UTF-8") from err
        except RecursionError as err:  # e.g. [[[[...]]]] 100,000 deep
            raise HTTPException(400, "malformed JSON body: nested too deeply") from err
        try:
            return model.model_validate(data)
        except ValidationError as err:
            problems = [{**p, "loc": ("body", *p["loc"])} for p in err.errors(include_url=False)]
            raise RequestValidationError(problems) from err

    return parsed


def _got(problem: dict) -> str:
    """What was sent, after a wrong-type message: ``"3"`` for ``k`` looks like an integer until shown quoted."""
    if not problem.get("type", "").endswith("_type"):
        return ""
    try:
        sent = json.dumps(problem.get("input"))
    except (TypeError, ValueError):
        return ""
    return f" (got {sent if len(sent) <= 40 else sent[:37] + '...'})"


def create_app(recommender: Recommender, max_batch: int = 64, max_wait_ms: float = 2.0, token: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, max_items: int = MAX_ITEMS,
               max_text_chars: int = MAX_TEXT_CHARS, body_timeout_s: float = BODY_TIMEOUT_S) -> FastAPI:
    """The ASGI app around one ``Recommender``; run it with uvicorn (``unisrec-x serve``).

    Args:
        recommender: the model to serve.
        max_batch: requests answered by one forward pass.
        max_wait_ms: how long a request waits for others to share its pass.
        token: when set, ``POST /items`` needs ``Authorization: Bearer <token>``; ``None`` leaves it open.
        max_body_bytes: larger request bodies get 413.
        max_items: a ``POST /items`` with more items gets 413.
        max_text_chars: a ``POST /items`` with a longer text gets 422 naming the items.
        body_timeout_s: a body not received this long after the headers gets 408.
    """
    batcher = MicroBatcher(recommender, max_batch, max_wait_ms)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker = asyncio.create_task(batcher.run())
        yield
        worker.cancel()

    # no /docs, /redoc, /openapi.json: unknown paths are 404, and the README documents the API
    app = FastAPI(title="unisrec-x", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    app.add_middleware(BodyGuard, max_bytes=max_body_bytes, timeout_s=body_timeout_s)

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
        where = "; ".join(f"{'.'.join(str(x) for x in p['loc'][1:]) or 'body'}: {p['msg']}{_got(p)}"
                          for p in problems[:10])
        more = f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
        return _error(422, f"invalid request: {where}{more}")

    @app.exception_handler(RequestError)
    async def unanswerable(request: Request, exc: RequestError) -> JSONResponse:
        status = 409 if isinstance(exc, KnownItemsError) else 422
        return _error(status, str(exc), items=exc.items) if exc.items else _error(status, str(exc))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "items": recommender.num_items, "max_history": recommender.max_history,
                "batches": batcher.batches}

    @app.post("/recommend", response_model=RecommendResponse)
    async def recommend(body: RecommendRequest = Depends(json_body(RecommendRequest))) -> RecommendResponse:
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

    @app.post("/items", status_code=201, dependencies=[Depends(token_required(token))])  # before the body
    async def add_items(body: AddItemsRequest = Depends(json_body(AddItemsRequest))) -> dict:
        if len(body.items) > max_items:
            raise HTTPException(413, f"{len(body.items)} items in one request; at most {max_items} are accepted")
        long = [t for t, text in body.items.items()
                if (len(text) if isinstance(text, str) else sum(map(len, text.values()))) > max_text_chars]
        if long:
            raise RequestError(f"{len(long)} item text(s) over {max_text_chars} characters: "
                               f"{', '.join(long[:20])}", long)
        from unisrec_x.serving.journal import JournalUnavailable

        try:  # 201 only once the items are journaled and fsync'd (serve): they survive a crash
            added = await asyncio.get_running_loop().run_in_executor(None, recommender.add_items, body.items)
        except JournalUnavailable as err:  # model locked by add-items, rewritten, or the disk refused: none added
            raise HTTPException(err.status, str(err)) from None
        return {"added": added, "items": recommender.num_items}

    return app
