"""``unisrec-x recommend | add-items | export | serve``: a trained model from the shell."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from unisrec_x.errors import DataError

log = logging.getLogger(__name__)


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"unisrec-x {prog}", description=description)
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint (.ckpt) or model directory")
    parser.add_argument("--data_root", default=None, help="data root for a checkpoint's dataset (default: "
                        "$UNISREC_X_DATA_ROOT or ../shared/data)")
    parser.add_argument("--journal", default=None, help="journal of the items `serve` added, replayed on load "
                        "(default: added-items.jsonl inside a model directory, CKPT.items.jsonl beside a checkpoint)")
    return parser


def _load(args: argparse.Namespace, record: bool = False):
    from unisrec_x.serving.recommender import Recommender

    return Recommender.from_checkpoint(args.ckpt, args.data_root, args.journal, record)


def _run(body, words: list[str]) -> int:
    """Bad input ends with one line naming the file or value, exit status 2, no traceback."""
    from unisrec_x.serving.recommender import RequestError

    try:
        body(words)
    except (DataError, RequestError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def recommend(words: list[str]) -> int:
    parser = _parser("recommend", "Print the top-k next items for one history.")
    parser.add_argument("--history", required=True, help='item ids, oldest first, separated by spaces: "ID ID ID"')
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--exclude_seen", action="store_true", help="never recommend an item of the history")

    def body(words: list[str]) -> None:
        args = parser.parse_args(words)
        rows = _load(args).recommend([args.history.split()], args.k, args.exclude_seen)[0]
        alias = any(rec.alias for rec in rows)
        print(f"{'rank':>4}  {'item':<14} " + (f"{'alias':<12} " if alias else "") + f"{'score':>8}  text")
        for rank, rec in enumerate(rows, 1):
            text = rec.text if len(rec.text) <= 90 else rec.text[:87] + "..."
            print(f"{rank:>4}  {rec.item:<14} " + (f"{rec.alias:<12} " if alias else "") + f"{rec.score:>8.4f}  {text}")

    return _run(body, words)


def add_items(words: list[str]) -> int:
    parser = _parser("add-items", "Add items from their text alone and write an updated model directory.")
    parser.add_argument("--items", required=True, help="RecBole atomic file with item_id and text fields "
                        "(.item or .text); for a model with knowledge fields, also a column per field (empty allowed)")
    parser.add_argument("--text_fields", nargs="+", default=None,
                        help="fields joined into the text (default: text, else title)")
    parser.add_argument("--out", required=True, help="model directory to write: a new or empty folder, or "
                        "(with --overwrite) a model directory written earlier, replaced atomically")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing unisrec-x model directory")

    def body(words: list[str]) -> None:
        from unisrec_x.data.atomic import read_atomic
        from unisrec_x.data.text import read_item_fields
        from unisrec_x.runtime.outputs import check_output_path
        from unisrec_x.serving.model_dir import MODEL_DIR

        args = parser.parse_args(words)
        path = Path(args.items)
        fields = args.text_fields
        if fields is None:
            header = read_atomic(path, required=["item_id"])
            fields = ["text"] if "text" in header.fields else ["title"]
        items = read_item_fields(path, fields)
        from unisrec_x.serving.journal import model_locks

        check_output_path(args.out, MODEL_DIR, args.overwrite)  # refuse before minutes of loading and encoding
        with model_locks(args.ckpt, args.out):  # read-modify-write: a second add-items or a server's append waits
            recommender = _load(args)
            added = recommender.add_items(with_knowledge(items, path, recommender.net.knowledge_fields))
            out = recommender.save(args.out, overwrite=args.overwrite)
        print(f"added {len(added)} items; {recommender.num_items} items in {out}")

    return _run(body, words)


def with_knowledge(items: dict[str, str], path: Path, fields: list[str]) -> dict[str, str | dict[str, str]]:
    """For a model with knowledge fields, each item as its fields' texts (columns of the same file) plus its
    ``text``; for any other model, ``items`` as they are."""
    if not fields:
        return items
    from unisrec_x.data.domain import item_file_fields
    from unisrec_x.data.text import read_field_texts

    named = item_file_fields(fields)  # the item-text field is the item's text itself, given as "text"
    columns = read_field_texts(path, named) if named else {}
    return {token: {"text": text, **{f: columns[f][token] for f in named}} for token, text in items.items()}


def export(words: list[str]) -> int:
    parser = _parser("export", "Write item_vectors.npy, item_ids.txt and a TorchScript query encoder.")
    parser.add_argument("--out", required=True, help="folder to write: a new or empty folder, or (with "
                        "--overwrite) an export written earlier, replaced atomically")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing unisrec-x export")

    def body(words: list[str]) -> None:
        from unisrec_x.runtime.outputs import check_output_path
        from unisrec_x.serving.export import EXPORT

        args = parser.parse_args(words)
        check_output_path(args.out, EXPORT, args.overwrite)
        out = _load(args).export(args.out, overwrite=args.overwrite)
        print(f"exported to {out}")

    return _run(body, words)


def serve_parser() -> argparse.ArgumentParser:
    from unisrec_x.serving.service import BODY_TIMEOUT_S, MAX_BODY_BYTES, MAX_ITEMS, MAX_TEXT_CHARS, TOKEN_ENV

    parser = _parser("serve", "Serve POST /recommend, POST /items and GET /health over HTTP.")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only; any other "
                        "needs a token)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max_batch", type=int, default=64, help="requests answered by one forward pass")
    parser.add_argument("--max_wait_ms", type=float, default=2.0, help="how long a request waits for others")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--token", default=None, help=f"POST /items then needs 'Authorization: Bearer TOKEN' "
                        f"(default: ${TOKEN_ENV}; prefer it, a flag shows in the process list)")
    parser.add_argument("--max_body_bytes", type=int, default=MAX_BODY_BYTES, help="larger request bodies get 413")
    parser.add_argument("--max_items", type=int, default=MAX_ITEMS, help="most items one POST /items may add")
    parser.add_argument("--max_text_chars", type=int, default=MAX_TEXT_CHARS, help="longest item text accepted")
    parser.add_argument("--body_timeout_s", type=float, default=BODY_TIMEOUT_S,
                        help="seconds a client has to send a request body once its headers are in (else 408)")
    parser.add_argument("--max_connections", type=int, default=MAX_CONNECTIONS,
                        help="open connections and requests in progress beyond which uvicorn answers 503")
    return parser


MAX_CONNECTIONS = 256  # uvicorn's own default is no limit
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this


def uvicorn_options(args: argparse.Namespace) -> dict:
    """uvicorn's settings for ``serve``: its defaults leave connections and requests unbounded."""
    return {"host": args.host, "port": args.port, "limit_concurrency": args.max_connections,
            "timeout_keep_alive": KEEP_ALIVE_S}


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _serve_settings(args: argparse.Namespace) -> str | None:
    """Check the serve flags before the model loads; returns the token (flag, else environment)."""
    import os

    from unisrec_x.serving.service import TOKEN_ENV

    if not 1 <= args.port <= 65535:
        raise DataError(f"--port must be between 1 and 65535, got {args.port}")
    for flag in ("threads", "max_batch", "max_body_bytes", "max_items", "max_text_chars", "max_connections"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise DataError(f"--{flag} must be at least 1, got {value}")
    if not 0 <= args.max_wait_ms < float("inf"):  # NaN too
        raise DataError(f"--max_wait_ms must be a finite number of 0 or more, got {args.max_wait_ms}")
    if not 0 < args.body_timeout_s < float("inf"):
        raise DataError(f"--body_timeout_s must be a finite number of seconds above 0, got {args.body_timeout_s}")
    if args.journal is not None and not Path(args.journal).absolute().parent.is_dir():
        raise DataError("--journal: its folder does not exist (name a file in an existing folder)", args.journal)
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if token is None and not _is_loopback(args.host):
        raise DataError(f"--host {args.host} is reachable from other machines: set --token (or ${TOKEN_ENV}) "
                        "so that only its holders can POST /items")
    return token


def serve(words: list[str]) -> int:
    parser = serve_parser()

    def body(words: list[str]) -> None:
        import os

        import torch
        import uvicorn

        from unisrec_x.serving.service import create_app

        args = parser.parse_args(words)
        token = _serve_settings(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        recommender = _load(args, record=True)
        journal = recommender.journal.path
        if os.access(journal if journal.exists() else journal.parent, os.W_OK):
            log.info("items added through POST /items are journaled in %s until add-items or save takes them in",
                     journal)
        else:
            log.warning("%s cannot be written, so POST /items will answer 503; pass --journal PATH to keep added "
                        "items elsewhere", journal)
        app = create_app(recommender, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, token=token,
                         max_body_bytes=args.max_body_bytes, max_items=args.max_items,
                         max_text_chars=args.max_text_chars, body_timeout_s=args.body_timeout_s)
        uvicorn.run(app, **uvicorn_options(args), log_level="warning")

    return _run(body, words)


COMMANDS = {"recommend": recommend, "add-items": add_items, "export": export, "serve": serve}
