"""`rlhf label --by human`: a local web page where people rank each prompt's K sampled responses.

Judgments go to an append-only JSONL log (rlhf.feedback.judgment_log's `JudgmentLog`; by default `<registry>/labels/<samples id>.jsonl`),
one line per rank, skip or undo, so a labeler can stop and resume at any time and several can label at
once; `ranked_lists` turns the log into the ranked lists `rlhf rm` trains on (`publish_human` makes them
a `prefs` entry, `stats` measures how often the labelers agree).

The page is served by Flask on 127.0.0.1 with a random token: every API call must carry it in the
`X-Rlhf-Token` header, and POSTs must be JSON from the page's own origin, so neither another site
open in the same browser nor another user of the machine can read or write judgments. Model text is
untrusted: the page inserts it with `textContent` only, under a nonce-based Content-Security-Policy.
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
import shutil
import threading
from collections.abc import Callable
from importlib import resources
from itertools import combinations
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from rlhf.errors import UserError
from rlhf.feedback.judgment_log import Conflict, JudgmentLog, LabelerState, check_labeler, judgment_ranks, samples_digest, summary_line
from rlhf.feedback.labelers import read_samples

if TYPE_CHECKING:
    from flask import Flask, Response
    from flask.typing import ResponseReturnValue
    from werkzeug.serving import WSGIRequestHandler
from rlhf.store.entry import DATASET_FILES, Entry, is_reference, now_iso
from rlhf.store.fileio import atomic_write_text
from rlhf.store.registry import Registry
from rlhf.store.start_record import write_start_record

TOKEN_HEADER = "X-Rlhf-Token"
LOOPBACK = ("127.0.0.1", "::1", "localhost")
ANY_INTERFACE = ("0.0.0.0", "::", "")
LOG_SNAPSHOT = "judgments.jsonl"
"""The log as it was at publish, kept in the prefs entry's folder beside its train.jsonl."""


# --- the web app -----------------------------------------------------------------------------------


def page_html() -> str:
    return resources.files("rlhf.feedback").joinpath("label_web_page.html").read_text(encoding="utf-8")


def make_app(samples_rows: list[dict], log: JudgmentLog, token: str, *, origins: set[str] | None = None) -> Flask:
    """The Flask app: the page at `/` and the JSON API under `/api/`, every API call checked against `token`.

    `origins` are the server's own (`http://127.0.0.1:8765`); a request naming another Host is refused
    (DNS rebinding) and a POST whose Origin is not one of them too. None: the request's own host."""
    from flask import Flask

    app = Flask(__name__, static_folder=None)
    app.config["RLHF_ORIGINS"] = set(origins or ())
    page = page_html()
    _guard(app, token)
    api = _Api(samples_rows, log)

    @app.get("/")
    def index() -> ResponseReturnValue:
        from flask import g

        return page.replace("{{nonce}}", g.nonce), 200, {"Content-Type": "text/html; charset=utf-8"}

    app.get("/favicon.ico")(lambda: ("", 204))  # none: spare the browser's console a 404
    app.get("/api/next")(api.next)
    app.post("/api/judge")(api.judge)
    app.post("/api/skip")(api.skip)
    app.post("/api/undo")(api.undo)
    app.get("/api/stats")(api.stats)
    return app


def _guard(app: Flask, token: str) -> None:
    """The checks every request passes, and the headers every response carries."""
    from flask import g, jsonify, request

    expected = token.encode()

    @app.before_request
    def check() -> ResponseReturnValue | None:
        g.nonce = secrets.token_urlsafe(16)
        origins = app.config["RLHF_ORIGINS"]
        own = {o.split("://", 1)[1] for o in origins} or {request.host}
        if request.host not in own:
            return jsonify(error=f"this server answers only {' or '.join(sorted(own))}"), 403
        if not request.path.startswith("/api/"):
            return None
        given = request.headers.get(TOKEN_HEADER, "").encode()
        if not hmac.compare_digest(given, expected):
            return jsonify(error="missing or wrong token: open the link `rlhf label --by human` printed"), 403
        if request.method == "POST":
            origin = request.headers.get("Origin")
            if origin is not None and origin not in (origins or {request.host_url.rstrip("/")}):
                return jsonify(error=f"cross-origin request from {origin[:100]} refused"), 403
            if request.mimetype != "application/json":
                return jsonify(error="POST a JSON body (Content-Type: application/json)"), 415
        return None

    @app.after_request
    def headers(response: Response) -> Response:
        nonce = getattr(g, "nonce", "none")
        response.headers["Content-Security-Policy"] = (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
            "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.errorhandler(UserError)
    def refused(error: UserError) -> ResponseReturnValue:
        return jsonify(error=str(error)), 409 if isinstance(error, Conflict) else 400


class _Api:
    """The JSON routes, over the samples' rows and the log."""

    def __init__(self, rows: list[dict], log: JudgmentLog) -> None:
        self.rows, self.log, self.total = rows, log, len(rows)

    def prompt(self, index: int, state: LabelerState) -> dict:
        row = self.rows[index]
        return {"index": index, "prompt": row["prompt"], "responses": [r["text"] for r in row["responses"]], "progress": state.progress()}

    def next(self) -> Response:
        from flask import jsonify, request

        state = self.log.state(check_labeler(request.args.get("labeler", "")), self.total)
        index = state.next_index
        return jsonify({"done": True, "progress": state.progress()} if index is None else self.prompt(index, state))

    def judge(self) -> Response:
        from flask import jsonify

        body, labeler, index = self._body(with_prompt=True)
        unacceptable = body.get("unacceptable", False)
        if not isinstance(unacceptable, bool):
            raise UserError("unacceptable must be true or false")
        order, ranks = judgment_ranks(body.get("order"), body.get("ties"), len(self.rows[index]["responses"]), unacceptable)
        record = self.log.judge(labeler, index, order, ranks, unacceptable=unacceptable, total=self.total)
        return jsonify(recorded=record["id"], progress=self.log.state(labeler, self.total).progress())

    def skip(self) -> Response:
        from flask import jsonify

        _, labeler, index = self._body(with_prompt=True)
        record = self.log.skip(labeler, index, total=self.total)
        return jsonify(recorded=record["id"], progress=self.log.state(labeler, self.total).progress())

    def undo(self) -> Response:
        """Cancel the labeler's latest judgment and answer with that prompt, to be labeled again."""
        from flask import jsonify

        _, labeler, _ = self._body(with_prompt=False)
        record, undone = self.log.undo(labeler)
        index = undone["prompt_index"]
        shown = self.prompt(index, self.log.state(labeler, self.total)) if index < self.total else None
        return jsonify(undone={"id": record["undoes"], "kind": undone["kind"], "prompt_index": index}, next=shown)

    def stats(self) -> Response:
        from flask import jsonify

        return jsonify(self.log.stats(self.total))

    def _body(self, *, with_prompt: bool) -> tuple[dict, str, int]:
        from flask import request

        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise UserError("the body must be a JSON object")
        labeler = check_labeler(body.get("labeler"))
        index = body.get("prompt_index")
        if with_prompt and (type(index) is not int or not 0 <= index < self.total):
            raise UserError(f"prompt_index must be a whole number from 0 to {self.total - 1}, got {str(index)[:40]}")
        return body, labeler, index if with_prompt and isinstance(index, int) else -1


# --- serving ---------------------------------------------------------------------------------------


def _quiet_handler() -> type[WSGIRequestHandler]:
    from werkzeug.serving import WSGIRequestHandler

    class Quiet(WSGIRequestHandler):
        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            pass  # one line per request would bury the URL and the summary; errors are still logged

    return Quiet


def check_token(token: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{16,200}", token):
        raise UserError("the token must be 16-200 letters, digits, '_' or '-' (leave it out for a random one)")
    return token


def start_server(samples_path: Path | str, log_path: Path | str, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 labeler_hint: str | None = None) -> tuple[str, Callable[[], None]]:
    """Serve the page in a background thread: (the page's URL with the token, a function that stops the server)."""
    from werkzeug.serving import make_server

    samples_path = Path(samples_path)
    rows = read_samples(samples_path)
    log = JudgmentLog(log_path, samples_digest(samples_path))
    log.read()  # refuse a log of another samples file before serving
    token = check_token(token) if token else secrets.token_urlsafe(24)
    app = make_app(rows, log, token)
    try:
        server = make_server(host, port, app, threaded=True, request_handler=_quiet_handler())
    except OSError as error:
        raise UserError(f"cannot serve on {host}:{port}: {error.strerror or error}; choose another --port") from None
    bound = server.server_port
    shown = f"[{host}]" if ":" in host else host
    hosts = {f"{shown}:{bound}"} | ({f"localhost:{bound}"} if host in LOOPBACK else set())
    # Bound to every interface, the server cannot know the names it is reached by: the request's own host then.
    app.config["RLHF_ORIGINS"] = set() if host in ANY_INTERFACE else {f"http://{h}" for h in hosts}
    thread = threading.Thread(target=server.serve_forever, name="rlhf-label-web", daemon=True)
    thread.start()
    hint = f"&labeler={check_labeler(labeler_hint)}" if labeler_hint else ""

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)

    return f"http://{shown}:{bound}/#token={token}{hint}", stop


def serve(samples_path: Path | str, log_path: Path | str, *, labeler_hint: str | None = None, host: str = "127.0.0.1", port: int = 0,
          token: str | None = None, open_browser: bool = False) -> None:
    """Serve the labeling page until Ctrl-C, printing its URL (with the token) first."""
    import time

    if labeler_hint:
        check_labeler(labeler_hint)
    url, stop = start_server(samples_path, log_path, host=host, port=port, token=token, labeler_hint=labeler_hint)
    rows = len(read_samples(Path(samples_path)))
    print(f"labeling {rows} prompts of {samples_path}; judgments go to {log_path}")
    if host not in LOOPBACK:
        print(f"warning: serving on {host}: anyone who can reach it and has the link can label, over unencrypted HTTP")
    print(f"open {url}  (Ctrl-C stops; the link carries the access token: share it only with labelers)", flush=True)
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    _stop_on_sigterm()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop()
    print(summary_line(JudgmentLog(log_path).stats(rows)))


def _stop_on_sigterm() -> None:
    """`kill` stops the server as Ctrl-C does (with the summary); judgments are on disk either way."""
    import signal

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)



# --- publishing ------------------------------------------------------------------------------------


def samples_file(registry: Registry, text: str) -> Path:
    """The samples file a `samples:<id>` reference or a path names."""
    return registry.dataset_file(text, key="data.samples") if is_reference(text) else Path(text)


def default_log_path(registry: Registry, samples_path: Path) -> Path:
    """Where a samples file's judgments go: `<registry>/labels/<samples entry id>.jsonl` (entry folders are never
    written after publishing), or beside a samples file that no entry holds."""
    holder = registry.entry_holding(samples_path)
    if holder is not None:
        return registry.root / "labels" / f"{holder.id}.jsonl"
    return samples_path.with_name(f"{samples_path.stem}.judgments.jsonl")


def publish_human(registry: Registry, samples: str | Path, log_path: Path | str, run_id: str | None = None) -> Entry:
    """The log's ranked lists as a `prefs` entry (train.jsonl, plus the log they were made from), parents: the samples' entry.

    Labelers may go on meanwhile: the lists, the metrics and the copy of the log all come from one read of it."""
    samples_path = samples_file(registry, str(samples))
    rows = read_samples(samples_path)
    log = JudgmentLog(log_path, samples_digest(samples_path))
    data, records = log.snapshot()
    ranked = log.ranked_lists(rows, records)
    if not ranked:
        raise UserError(f"{log_path} ranks none of the {len(rows)} prompts yet; label some first (rlhf label --by human)")
    run_id = run_id or registry.new_run_id("label")
    run_dir = registry.run_dir(run_id)
    if run_dir.exists():
        raise UserError(f"run {run_id} already exists ({run_dir}); publish under a new id (leave --run out)")
    try:
        final = run_dir / "final"
        final.mkdir(parents=True)
        atomic_write_text(final / LOG_SNAPSHOT, data.decode("utf-8", errors="replace"))
        atomic_write_text(final / DATASET_FILES["prefs"], "".join(json.dumps(row) + "\n" for row in ranked))
        entry = _entry(registry, samples_path, log, ranked, log.stats(len(rows), records), run_dir)
        # Sealed like every run's, so `rlhf registry rm --purge` knows the folder is this entry's own.
        write_start_record(run_dir, run_id=run_id, stage="label", registry=registry.root.resolve(), config=entry.config, sources={})
        return registry.publish(entry)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)  # a folder with no entry would pass for a label run that can resume
        raise


def _entry(registry: Registry, samples_path: Path, log: JudgmentLog, ranked: list[dict], stats: dict, run_dir: Path) -> Entry:
    holder = registry.entry_holding(samples_path)
    metrics = {**_pair_counts(ranked), "prompts": float(len(ranked)), "ranked_lists": float(len(ranked)),
               "labelers": float(len(stats["labelers"])), "judgments": float(stats["records"])}
    if stats["fraction"] is not None:
        metrics |= {"labeler_pairs": float(stats["pairs"]), "labeler_agreement": stats["fraction"]}
    config = {"by": "human", "data": {"samples": str(samples_path.resolve()), "include": None}, "log": str(log.path.resolve()),
              "labelers": sorted(stats["labelers"]), "samples_sha256": log.samples_sha256}
    return Entry(id=run_dir.name, stage="prefs", status="completed", created=now_iso(), path=str(run_dir / "final"),
                 run_dir=str(run_dir), config=config, parents=(holder.id,) if holder else (), metrics=metrics)


def _pair_counts(rows: list[dict]) -> dict[str, float]:
    pairs = tied = 0
    for row in rows:
        for a, b in combinations(row["ranks"], 2):
            pairs += 1
            tied += a == b
    return {"pairs": float(pairs), "tied_pairs": float(tied)}
