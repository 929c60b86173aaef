"""The HTTP service, through a real client against `unisrec-x serve` running in its own process.

The server runs with a token (from the environment, as documented) and small limits, so that
every guard is exercised on the real process.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import assert_close_f32
from tests.serving.conftest import HELD_OUT, SAME_FILAMENT, wait_until_healthy
from unisrec_x.cli import main
from unisrec_x.serving.recommender import Recommender
from unisrec_x.serving.service import TOKEN_ENV

TOKEN = "s3cret-token"
MAX_BODY_BYTES, MAX_ITEMS, MAX_TEXT_CHARS = 65536, 5, 3000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(held_out_checkpoint, real_root, shared_cache, tmp_path_factory) -> Path:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UNISREC_X_CACHE", str(shared_cache))
        return Recommender.from_checkpoint(held_out_checkpoint, str(real_root)).save(
            tmp_path_factory.mktemp("served") / "model")


@pytest.fixture(scope="module")
def server(model_dir):
    """Start the server, wait for /health, stop it afterwards (and show its log if it died)."""
    port = _free_port()
    log = model_dir.parent / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "unisrec_x.cli", "serve", "--ckpt", str(model_dir),
                                 "--port", str(port), "--max_wait_ms", "5", "--max_body_bytes", str(MAX_BODY_BYTES),
                                 "--max_items", str(MAX_ITEMS), "--max_text_chars", str(MAX_TEXT_CHARS)],
                                stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", TOKEN_ENV: TOKEN})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(proc, url, log, 60)
        with httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            yield client
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_health_reports_the_catalog(server, model_dir):
    body = server.get("/health").json()
    assert body["status"] == "ok"
    assert body["items"] == Recommender.from_checkpoint(model_dir).num_items


def test_recommend_answers_as_the_python_api(server, model_dir):
    expected = Recommender.from_checkpoint(model_dir).recommend([SAME_FILAMENT], k=7, exclude_seen=True)[0]
    response = server.post("/recommend", json={"history": SAME_FILAMENT, "k": 7, "exclude_seen": True})
    assert response.status_code == 200
    items = response.json()["items"]
    assert [i["item"] for i in items] == [r.item for r in expected]
    assert_close_f32([i["score"] for i in items], [r.score for r in expected])
    assert items[0]["text"] == expected[0].text


@pytest.mark.parametrize("body, status, says", [
    ({"history": ["2", "nope", "zilch"]}, 422, "2 unknown item"),
    ({"history": []}, 422, "history is empty"),
    ({"history": ["2"] * 1001}, 422, "at most 1000"),
    ({"history": ["2"], "k": 0}, 422, "k must be between 1 and"),
    ({"history": ["2"], "k": 5000}, 422, "k must be between 1 and"),
    ({"history": "2 4"}, 422, "history"),
    ({"k": 3}, 422, "history: Field required"),
])
def test_bad_requests_get_4xx_saying_why(server, body, status, says):
    response = server.post("/recommend", json=body)
    assert response.status_code == status
    assert says in response.json()["error"]
    if "unknown" in says:
        assert response.json()["items"] == ["nope", "zilch"]


def test_malformed_json_is_a_400(server):
    response = server.post("/recommend", content=b'{"history": ["2", ', headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "malformed JSON" in response.json()["error"]


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server, model_dir):
    local = Recommender.from_checkpoint(model_dir)
    histories = [[t] for t in local.item_tokens[:48]]
    expected = [[r.item for r in recs] for recs in local.recommend(histories, k=5)]
    batches_before = server.get("/health").json()["batches"]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda h: server.post("/recommend", json={"history": h, "k": 5}), histories))
    assert all(a.status_code == 200 for a in answers)
    assert [[i["item"] for i in a.json()["items"]] for a in answers] == expected
    batches = server.get("/health").json()["batches"] - batches_before
    assert batches < len(histories)  # some requests shared a forward pass


def test_items_added_over_http_are_recommended_at_once(server, held_out_text):
    assert server.post("/recommend", json={"history": [HELD_OUT]}).status_code == 422
    response = server.post("/items", json={"items": {HELD_OUT: held_out_text}})
    assert response.status_code == 201 and response.json()["added"] == [HELD_OUT]
    top = server.post("/recommend", json={"history": SAME_FILAMENT, "k": 5, "exclude_seen": True}).json()["items"]
    assert HELD_OUT in [entry["item"] for entry in top]  # of 4,386
    again = server.post("/items", json={"items": {HELD_OUT: held_out_text}})
    assert again.status_code == 409 and again.json()["items"] == [HELD_OUT]
    assert server.post("/items", json={"items": {}}).status_code == 422


def test_binds_to_loopback_by_default():
    from unisrec_x.serving.commands import serve_parser

    assert serve_parser().parse_args(["--ckpt", "model"]).host == "127.0.0.1"


def _items(server) -> int:
    return server.get("/health").json()["items"]


def test_adding_items_needs_the_token_while_recommend_and_health_stay_open(server):
    url, before = str(server.base_url), _items(server)
    body = {"items": {"TOKEN-TEST": "a listing nobody is allowed to add"}}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        response = httpx.post(f"{url}/items", json=body, headers=headers)
        assert response.status_code == 401 and "token" in response.json()["error"]
        assert response.headers["www-authenticate"] == "Bearer"
    assert _items(server) == before
    assert httpx.post(f"{url}/recommend", json={"history": ["2"]}).status_code == 200
    assert httpx.get(f"{url}/health").status_code == 200


def test_oversized_bodies_get_413_before_parsing_declared_or_chunked(server):
    before = _items(server)
    big = {"items": {"BIG": "x" * MAX_BODY_BYTES}}
    response = server.post("/items", json=big)  # Content-Length says it all
    assert response.status_code == 413 and f"over {MAX_BODY_BYTES} bytes" in response.json()["error"]

    def chunks():  # no Content-Length: the bytes are counted as they arrive
        yield b'{"items": {"BIG": "'
        for _ in range(MAX_BODY_BYTES // 8192 + 1):
            yield b"x" * 8192
        yield b'"}}'

    response = server.post("/items", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert response.status_code == 413 and "bytes" in response.json()["error"]
    assert _items(server) == before


def test_too_many_items_or_too_long_texts_are_refused_and_nothing_is_added(server):
    before = _items(server)
    many = server.post("/items", json={"items": {f"MANY-{i}": "a text" for i in range(MAX_ITEMS + 1)}})
    assert many.status_code == 413 and f"at most {MAX_ITEMS}" in many.json()["error"]
    long = server.post("/items", json={"items": {"OK-1": "fine", "LONG-1": "y" * (MAX_TEXT_CHARS + 1)}})
    assert long.status_code == 422 and long.json()["items"] == ["LONG-1"]
    assert f"over {MAX_TEXT_CHARS} characters" in long.json()["error"]
    assert _items(server) == before


@pytest.mark.parametrize("raw_id", [r"EVIL\ud800", "", "  ", r"tab\there", r"new\nline", r"car\rriage"])
def test_invalid_ids_get_422_and_leave_the_catalog_as_it_was(server, raw_id):
    before = _items(server)
    body = ('{"items": {"%s": "a perfectly good text"}}' % raw_id).encode()  # raw JSON, escapes as sent
    response = server.post("/items", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422 and "invalid item id" in response.json()["error"]
    assert _items(server) == before
    assert server.post("/recommend", json={"history": SAME_FILAMENT, "k": 50}).status_code == 200


def test_lone_surrogate_in_a_history_is_a_422(server):
    response = server.post("/recommend", content=b'{"history": ["2", "EVIL\\ud800"]}',
                           headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert "not valid UTF-8" in response.json()["error"] and response.json()["items"] == ["EVIL\\ud800"]


def test_concurrent_adds_of_one_new_id_add_it_once(server, held_out_text):
    before = _items(server)
    body = {"items": {"TWIN-OF-590": held_out_text}}
    with ThreadPoolExecutor(4) as pool:
        statuses = sorted(pool.map(lambda _: server.post("/items", json=body).status_code, range(4)))
    assert statuses == [201, 409, 409, 409]
    assert _items(server) == before + 1
    top = server.post("/recommend", json={"history": ["TWIN-OF-590"], "k": 10}).json()["items"]
    assert [i["item"] for i in top].count("TWIN-OF-590") == 1  # its own nearest item, listed once


@pytest.mark.parametrize("method, path, body, status, says", [
    ("POST", "/recommend", b"[" * 20000 + b"]" * 20000, 400, "nested too deeply"),
    ("GET", "/no-such-page", None, 404, "Not Found"),
    ("GET", "/recommend", None, 405, "Method Not Allowed"),
])
def test_every_error_answer_has_the_error_shape(server, method, path, body, status, says):
    response = server.request(method, path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    assert says in response.json()["error"] and "detail" not in response.json()


@pytest.mark.parametrize("flags, says", [
    (["--port", "99999"], "--port must be between 1 and 65535, got 99999"),
    (["--threads", "-1"], "--threads must be at least 1, got -1"),
    (["--max_items", "0"], "--max_items must be at least 1, got 0"),
    (["--max_wait_ms", "nan"], "--max_wait_ms must be a finite number"),
    (["--body_timeout_s", "0"], "--body_timeout_s must be a finite number of seconds above 0, got 0.0"),
    (["--body_timeout_s", "inf"], "--body_timeout_s must be a finite number of seconds above 0"),
    (["--max_connections", "0"], "--max_connections must be at least 1, got 0"),
    (["--host", "0.0.0.0"], "--host 0.0.0.0 is reachable from other machines: set --token"),
])
def test_serve_refuses_bad_settings_in_one_line_before_loading(flags, says, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(SystemExit) as done:
        main(["serve", "--ckpt", str(tmp_path / "never-read.ckpt"), *flags])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.7"])
def test_a_token_lets_serve_bind_beyond_loopback(host, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    with pytest.raises(SystemExit) as done:  # past the host check, it stops at the missing checkpoint
        main(["serve", "--ckpt", str(tmp_path / "none.ckpt"), "--host", host])
    assert done.value.code == 2 and "none.ckpt" in capsys.readouterr().err


def test_a_server_fault_answers_500_in_the_error_shape_and_changes_nothing(monkeypatch):
    from starlette.testclient import TestClient

    from tests.serving.test_recommender import _tiny
    from unisrec_x.serving.service import create_app

    rec = _tiny()

    def broken_encoder():
        raise RuntimeError("the encoder fell over")

    monkeypatch.setattr(rec, "text_encoder", broken_encoder)
    client = TestClient(create_app(rec), raise_server_exceptions=False)
    response = client.post("/items", json={"items": {"new": "a text"}})
    assert response.status_code == 500
    assert response.json() == {"error": "internal error (RuntimeError); the server log has the details"}
    assert rec.num_items == 5


def _tiny_app(**settings):
    """The service around a five-item model (items a..e) whose text encoder is a stand-in: no model to load."""
    from tests.serving.test_recommender import VectorPerText, _tiny
    from unisrec_x.serving.service import create_app

    rec = _tiny()
    encoder = VectorPerText()
    rec.text_encoder = lambda: encoder
    return rec, create_app(rec, **settings)


@pytest.mark.parametrize("behind", ["root_path", "mount"])
def test_the_token_guards_items_behind_a_root_path_or_a_mount_prefix(behind):
    """``uvicorn --root-path /rec`` and ``mount("/rec", app)`` both put the prefix into scope["path"];
    a check of the path string let ``POST /rec/items`` through without a token."""
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.testclient import TestClient

    rec, app = _tiny_app(token=TOKEN)
    if behind == "root_path":
        client = TestClient(app, root_path="/rec")
    else:
        client = TestClient(Starlette(routes=[Mount("/rec", app)], lifespan=lambda _: app.router.lifespan_context(app)))
    body = {"items": {"new": "a new listing"}}
    with client:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            refused = client.post("/rec/items", json=body, headers=headers)
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
            assert "token" in refused.json()["error"] and rec.num_items == 5
        added = client.post("/rec/items", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert added.status_code == 201 and rec.num_items == 6
        assert client.post("/rec/recommend", json={"history": ["a"], "k": 2}).status_code == 200
        assert client.get("/rec/health").status_code == 200


@pytest.mark.parametrize("content, content_type", [
    (b'{"items": {"new": ', "application/json"),  # malformed
    (b'{"items": {"new": "' + b"x" * 70_000 + b'"}}', "application/json"),  # over max_body_bytes
    (b'{"items": ["new"]}', "application/json"),  # wrong type
    (b"items=new", "application/x-www-form-urlencoded"),  # not JSON
])
def test_items_without_the_token_get_401_whatever_the_body(content, content_type):
    from starlette.testclient import TestClient

    rec, app = _tiny_app(token=TOKEN, max_body_bytes=65536)
    response = TestClient(app).post("/items", content=content, headers={"content-type": content_type})
    assert response.status_code == 401 and "token" in response.json()["error"]
    assert rec.num_items == 5


def test_items_without_the_token_are_refused_before_the_body_is_read():
    import asyncio

    _, app = _tiny_app(token=TOKEN, max_body_bytes=1024)
    reads, sent = [], []

    async def endless_body():
        reads.append(1)
        return {"type": "http.request", "body": b"[" * 4096, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/items", "raw_path": b"/items", "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"transfer-encoding", b"chunked")],
             "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 50000)}
    asyncio.run(app(scope, endless_body, send))
    assert reads == [] and sent[0]["status"] == 401
    assert (b"connection", b"close") in sent[0]["headers"]  # the unread rest is not left to trickle in


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a socket timeout fails the test)."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def test_a_body_sent_too_slowly_gets_408_and_its_connection_closed(caplog):
    """A few clients trickle a byte of body every 0.25 s against a real uvicorn with serve's limits and
    a body timeout of 2 s: each gets 408 at 2 s (total time, so trickling never extends it) and is
    disconnected; others are answered meanwhile, and one that hangs up mid-body logs no error.
    (200 trickling connections all stayed open past 40 s.)"""
    import json
    import select
    import threading

    import uvicorn

    from unisrec_x.serving.commands import serve_parser, uvicorn_options

    _, app = _tiny_app(body_timeout_s=2.0)
    port = _free_port()
    options = uvicorn_options(serve_parser().parse_args(["--ckpt", "unused", "--port", str(port)]))
    server = uvicorn.Server(uvicorn.Config(app, **options, log_config=None, log_level=None))  # no logging changed
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    slow: list[socket.socket] = []
    try:
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.1)
        assert server.started
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{")
            slow.append(sock)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as quitter:
            quitter.sendall(b"POST /items HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{")
        start, answers, answered_after = time.monotonic(), {}, []
        while len(answers) < len(slow) and time.monotonic() - start < 6:
            waiting = [sock for sock in slow if sock not in answers]
            if time.monotonic() - start < 1.5:  # trickle, then stop well before the deadline: a byte sent
                for sock in waiting:           # after the server closed would be answered by a reset
                    sock.sendall(b" ")
            for sock in select.select(waiting, [], [], 0.25)[0]:
                answers[sock] = _read_until_closed(sock)
                answered_after.append(time.monotonic() - start)
        assert len(answers) == len(slow)
        assert all(1.9 < after < 3.2 for after in answered_after), answered_after  # 2 s since the last byte: 3.5 s
        for raw in answers.values():
            head, _, body = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower()
            assert "not received within 2 s" in json.loads(body)["error"]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            health = client.get("/health")
            assert health.status_code == 200 and "connection" not in health.headers  # kept alive
            assert client.post("/recommend", json={"history": ["a"], "k": 2}).status_code == 200
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    finally:
        for sock in slow:
            sock.close()
        server.should_exit = True
        thread.join(10)


@pytest.mark.parametrize("body, says", [
    ({"history": ["a"], "k": "3"}, 'k: Input should be a valid integer (got "3")'),
    ({"history": ["a"], "k": True}, "k: Input should be a valid integer (got true)"),
    ({"history": ["a"], "k": 2.0}, "k: Input should be a valid integer (got 2.0)"),
    ({"history": ["a"], "k": 2, "exclude_seen": "yes"}, 'exclude_seen: Input should be a valid boolean (got "yes")'),
    ({"history": ["a"], "k": 2, "exclude_seen": 1}, "exclude_seen: Input should be a valid boolean (got 1)"),
    ({"history": ["a", 2], "k": 2}, "history.1: Input should be a valid string (got 2)"),
])
def test_request_fields_are_strict_json_types(body, says):
    """``"k": "3"``, ``true``, ``2.0`` and ``"exclude_seen": "yes"`` were coerced while integer ids were refused."""
    from starlette.testclient import TestClient

    _, app = _tiny_app()
    with TestClient(app) as client:
        response = client.post("/recommend", json=body)
        assert response.status_code == 422 and says in response.json()["error"]
        assert client.post("/recommend", json={"history": ["a"], "k": 3, "exclude_seen": True}).status_code == 200


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"])
def test_no_generated_api_pages(path):
    """Unknown paths are 404, and the API is described in the README, not advertised on an open port."""
    from starlette.testclient import TestClient

    _, app = _tiny_app()
    response = TestClient(app).get(path)
    assert response.status_code == 404 and response.json() == {"error": "Not Found"}


@pytest.mark.parametrize("path, content, as_json", [
    ("/recommend", b'{"history": ["a"], "k": 2}', [200, 200]),
    ("/items", b'{"items": {"new": "a text"}}', [201, 409]),  # added, then already there
])
def test_a_body_that_is_not_declared_json_gets_415_saying_what_to_send(path, content, as_json):
    """A text/plain or form body got a 422 that never said to send JSON."""
    from starlette.testclient import TestClient

    rec, app = _tiny_app(token=TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(app, headers=auth) as client:
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            response = client.post(path, content=content, headers={"content-type": content_type})
            assert response.status_code == 415 and rec.num_items == 5
            assert "Content-Type: application/json" in response.json()["error"]
        statuses = [client.post(path, content=content, headers={"content-type": content_type} if content_type else {})
                    .status_code for content_type in ("application/json; charset=utf-8", None)]  # declared or not
        assert statuses == as_json
