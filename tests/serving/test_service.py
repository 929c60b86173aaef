"""The HTTP service, through a real client against `unisrec-x serve` running in its own process.

The server runs with a token (from the environment, as documented) and small limits, so that
every guard is exercised on the real process.
"""

from __future__ import annotations

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
from tests.serving.conftest import HELD_OUT, SAME_FILAMENT
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
        for _ in range(600):
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            pytest.fail(f"server did not come up:\n{log.read_text()}")
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
