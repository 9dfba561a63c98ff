"""`rlhf label --by human`: a local web page where people rank each prompt's K sampled responses.

The judgments go to an append-only JSONL log (`JudgmentLog`; by default `<registry>/labels/<samples id>.jsonl`),
one line per rank, skip or undo, so a labeler can stop and resume at any time and several can label at
once; `ranked_lists` turns the log into the ranked lists `rlhf rm` trains on (`publish_human` makes them
a `prefs` entry, `stats` measures how often the labelers agree).

The page is served by Flask on 127.0.0.1 with a random token: every API call must carry it in the
`X-Rlhf-Token` header, and POSTs must be JSON from the page's own origin, so neither another site
open in the same browser nor another user of the machine can read or write judgments. Model text is
untrusted: the page inserts it with `textContent` only, under a nonce-based Content-Security-Policy.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from importlib import resources
from itertools import combinations
from pathlib import Path
from typing import Any

from rlhf.errors import UserError
from rlhf.fileio import atomic_write_text, fsync_dir
from rlhf.labelers import rank, read_samples
from rlhf.registry import Registry
from rlhf.registry_entry import DATASET_FILES, Entry, is_reference, now_iso
from rlhf.start_record import write_start_record

LABELER_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
TOKEN_HEADER = "X-Rlhf-Token"
KINDS = ("rank", "skip", "undo")
LOOPBACK = ("127.0.0.1", "::1", "localhost")
ANY_INTERFACE = ("0.0.0.0", "::", "")
LOG_SNAPSHOT = "judgments.jsonl"
"""The log as it was at publish, kept in the prefs entry's folder beside its train.jsonl."""


class Conflict(UserError):
    """A judgment that the log's state refuses (a prompt already labeled, nothing to undo): HTTP 409."""


def check_labeler(name: object) -> str:
    """`name` if it is a usable labeler name (it is shown on pages and written to logs), else one line naming it."""
    if isinstance(name, str) and LABELER_RE.fullmatch(name):
        return name
    shown = repr(name[:80] + "..." if len(name) > 80 else name) if isinstance(name, str) else f"a {type(name).__name__}"
    raise UserError(f"labeler name {shown} is not usable: give 1-64 letters, digits, '.', '_' or '-' (e.g. --labeler alice)")


def judgment_ranks(order: object, ties: object, k: int, unacceptable: bool) -> tuple[list[int], list[int]]:
    """(order, ranks) of a submitted judgment: `order` a permutation of range(k) best first (or empty when
    all are unacceptable), `ties[i]` true where place i ties with the place before it."""
    if not isinstance(order, list) or not all(type(i) is int for i in order):
        raise UserError("order must be a list of response indices, best first")
    if unacceptable and not order:
        return [], []
    if sorted(order) != list(range(k)):
        raise UserError(f"order {order} is not a ranking of all {k} responses (each of 0..{k - 1} once)")
    ties = [False] * k if ties is None or unacceptable else ties
    if not isinstance(ties, list) or len(ties) != k or not all(isinstance(t, bool) for t in ties):
        raise UserError(f"ties must be {k} true/false values, one per place of the order")
    if unacceptable:
        return order, [0] * k  # all unacceptable: every response tied, whatever order was given
    ranks: list[int] = []
    for place, tied in enumerate(ties):
        ranks.append(ranks[-1] if tied and place else place)
    return order, ranks


@dataclass
class LabelerState:
    """One labeler's effective judgments, replayed from the log."""

    labeler: str
    stack: list[dict] = field(default_factory=list)
    """Rank and skip records not undone, oldest first: `undo` takes the last."""
    total: int | None = None

    @property
    def effective(self) -> dict[int, dict]:
        """Each judged prompt's effective record (a later one of the same prompt wins)."""
        return {r["prompt_index"]: r for r in self.stack if self.total is None or r["prompt_index"] < self.total}

    @property
    def done(self) -> set[int]:
        return set(self.effective)

    @property
    def skipped(self) -> int:
        return sum(r["kind"] == "skip" for r in self.effective.values())

    @property
    def next_index(self) -> int | None:
        """The lowest prompt this labeler has neither ranked nor skipped; None when all are done."""
        done = self.done
        candidates = range(self.total) if self.total is not None else range(len(done) + 1)
        return next((i for i in candidates if i not in done), None)

    def progress(self) -> dict[str, int | None]:
        return {"done": len(self.done), "skipped": self.skipped, "total": self.total}


class JudgmentLog:
    """The append-only JSONL log of the judgments of one samples file.

    An append is one `os.write` of one line to the file opened with O_APPEND, under an exclusive
    `flock`, then `fsync`: concurrent labelers (threads or processes on this machine) never interleave
    or lose lines, and a judgment acknowledged to the page survives a kill. The check that makes an
    append valid (the prompt not yet judged, an undo's target) is made under the same lock.
    A line cut by a crash is skipped when read and set apart by a newline before the next append.
    """

    def __init__(self, path: Path | str, samples_sha256: str | None = None) -> None:
        self.path = Path(path)
        self.samples_sha256 = samples_sha256
        self.damaged = 0
        """Lines of the last read that were not a judgment (a cut last line, a hand edit)."""

    # --- reading -------------------------------------------------------------------------------

    def read(self) -> list[dict]:
        """The log's judgments in order; lines that are not one are skipped (counted in `damaged`)."""
        return self.snapshot()[1]

    def snapshot(self) -> tuple[bytes, list[dict]]:
        """The log's bytes and the judgments they hold, from one read."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return b"", []
        return data, self._parse(data)

    def _parse(self, data: bytes) -> list[dict]:
        records, damaged = [], 0
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if _valid_record(record):
                self._check_samples(record)
                records.append(record)
            else:
                damaged += 1
        self.damaged = damaged
        return records

    def _check_samples(self, record: dict) -> None:
        theirs = record.get("samples")
        if self.samples_sha256 and theirs and theirs != self.samples_sha256:
            raise UserError(f"{self.path} holds judgments of another samples file (SHA-256 {theirs[:12]}..., this one is "
                            f"{self.samples_sha256[:12]}...); give each samples file its own log")

    def state(self, labeler: str, total: int | None = None) -> LabelerState:
        """`labeler`'s effective judgments over `total` prompts (the samples' row count)."""
        return _replay(self.read(), total).get(labeler) or LabelerState(labeler, total=total)

    def states(self, total: int | None = None) -> dict[str, LabelerState]:
        return _replay(self.read(), total)

    # --- appending -----------------------------------------------------------------------------

    def judge(self, labeler: str, prompt_index: int, order: list[int], ranks: list[int], *, unacceptable: bool = False,
              total: int | None = None) -> dict:
        """Append a ranking of one prompt (order best first; equal ranks are ties); Conflict if already judged."""
        record = {"kind": "rank", "prompt_index": prompt_index, "order": list(order), "ranks": list(ranks),
                  "unacceptable": bool(unacceptable)}
        return self._append_new(labeler, record, total)

    def skip(self, labeler: str, prompt_index: int, *, total: int | None = None) -> dict:
        return self._append_new(labeler, {"kind": "skip", "prompt_index": prompt_index}, total)

    def undo(self, labeler: str) -> tuple[dict, dict]:
        """Cancel `labeler`'s latest rank or skip not yet undone: (the undo record, the record it cancels)."""
        check_labeler(labeler)
        undone: list[dict] = []

        def make(records: list[dict]) -> dict:
            stack = _replay(records, None).get(labeler)
            if not stack or not stack.stack:
                raise Conflict(f"{labeler} has no judgment left to undo")
            undone.append(stack.stack[-1])
            return {"labeler": labeler, "kind": "undo", "undoes": stack.stack[-1]["id"]}

        return self._append(make), undone[0]

    def _append_new(self, labeler: str, record: dict, total: int | None) -> dict:
        check_labeler(labeler)
        index = record["prompt_index"]

        def make(records: list[dict]) -> dict:
            state = _replay(records, total).get(labeler)
            if state and index in state.done:
                raise Conflict(f"prompt {index} is already judged by {labeler}; undo that judgment first (u)")
            return {"labeler": labeler, **record}

        return self._append(make)

    def _append(self, make: Callable[[list[dict]], dict]) -> dict:
        """Append the record `make` builds from the log's records, all under the exclusive lock."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = _read_fd(fd)
            record = {"id": uuid.uuid4().hex, **make(self._parse(data)), "time": now_iso()}
            if self.samples_sha256:
                record["samples"] = self.samples_sha256
            line = json.dumps(record, ensure_ascii=True) + "\n"
            # A line a crash cut off keeps no newline: start on a fresh line so this one stays whole.
            prefix = "\n" if data and not data.endswith(b"\n") else ""
            payload = (prefix + line).encode()
            if os.write(fd, payload) != len(payload):
                raise OSError(f"short write to {self.path} (disk full?)")
            os.fsync(fd)
        finally:
            os.close(fd)  # also releases the lock
        if created:
            fsync_dir(self.path.parent)
        return record

    # --- summaries -----------------------------------------------------------------------------

    def stats(self, total: int | None = None, records: list[dict] | None = None) -> dict[str, Any]:
        """Counts per labeler, and the agreement of each pair of labelers: over prompts both ranked, of the
        response pairs both ordered strictly, the fraction they ordered the same way."""
        records = self.read() if records is None else records
        states = _replay(records, total)
        labelers = {name: _counts(state, records) for name, state in sorted(states.items())}
        places = {name: _strict_places(state) for name, state in states.items()}
        pairs = [_pair_agreement(a, b, places[a], places[b]) for a, b in combinations(sorted(places), 2)]
        compared = sum(p["pairs"] for p in pairs)
        agreed = sum(p["agreed"] for p in pairs)
        return {"records": len(records), "damaged": self.damaged, "labelers": labelers, "agreement": pairs,
                "pairs": compared, "agreed": agreed, "fraction": agreed / compared if compared else None}

    def ranked_lists(self, samples_rows: list[dict], records: list[dict] | None = None) -> list[dict]:
        """One ranked list per prompt that someone ranked: the labelers' mean place (Borda; a tie shares the
        mean of its places) ordered best first, equal means tied. A prompt judged only "all unacceptable"
        gives a row with every response tied (no pair for the reward model)."""
        states = _replay(self.read() if records is None else records, len(samples_rows))
        effective = {name: state.effective for name, state in states.items()}
        rows = []
        for index, sample in enumerate(samples_rows):
            judged = {name: e[index] for name, e in effective.items() if e.get(index, {}).get("kind") == "rank"}
            if judged:
                rows.append(_aggregate(sample, judged))
        return rows


def _valid_record(record: object) -> bool:
    """Whether a parsed line is a judgment this module wrote (a hand-edited or foreign line is skipped)."""
    if not isinstance(record, dict) or record.get("kind") not in KINDS or not isinstance(record.get("id"), str):
        return False
    if not (isinstance(record.get("labeler"), str) and LABELER_RE.fullmatch(record["labeler"])):
        return False
    if record["kind"] == "undo":
        return isinstance(record.get("undoes"), str)
    if type(record.get("prompt_index")) is not int or record["prompt_index"] < 0:
        return False
    if record["kind"] == "skip":
        return True
    order, ranks = record.get("order"), record.get("ranks")
    return (isinstance(order, list) and isinstance(ranks, list) and len(order) == len(ranks)
            and isinstance(record.get("unacceptable"), bool) and all(type(v) is int for v in order + ranks))


def _replay(records: list[dict], total: int | None) -> dict[str, LabelerState]:
    """Each labeler's state: ranks and skips stack up, an undo takes out the record it names."""
    states: dict[str, LabelerState] = {}
    for record in records:
        state = states.setdefault(record["labeler"], LabelerState(record["labeler"], total=total))
        if record["kind"] != "undo":
            state.stack.append(record)
            continue
        for place in range(len(state.stack) - 1, -1, -1):
            if state.stack[place]["id"] == record["undoes"]:
                del state.stack[place]
                break
    return states


def _read_fd(fd: int) -> bytes:
    size, chunks, offset = os.fstat(fd).st_size, [], 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)




def _counts(state: LabelerState, records: list[dict]) -> dict[str, int]:
    effective = state.effective.values()
    return {"ranked": sum(r["kind"] == "rank" and not r["unacceptable"] for r in effective),
            "unacceptable": sum(r["kind"] == "rank" and r["unacceptable"] for r in effective),
            "skipped": sum(r["kind"] == "skip" for r in effective),
            "undone": sum(r["kind"] == "undo" and r["labeler"] == state.labeler for r in records)}


def _strict_places(state: LabelerState) -> dict[int, dict[int, int]]:
    """prompt -> {response index: rank} for each prompt the labeler ranked (not "all unacceptable")."""
    return {p: dict(zip(r["order"], r["ranks"])) for p, r in state.effective.items()
            if r["kind"] == "rank" and not r["unacceptable"] and r["order"]}


def _pair_agreement(a: str, b: str, first: dict[int, dict[int, int]], second: dict[int, dict[int, int]]) -> dict[str, Any]:
    prompts = pairs = agreed = 0
    for prompt in first.keys() & second.keys():
        x, y = first[prompt], second[prompt]
        prompts += 1
        for i, j in combinations(sorted(x.keys() & y.keys()), 2):
            if x[i] != x[j] and y[i] != y[j]:
                pairs += 1
                agreed += (x[i] < x[j]) == (y[i] < y[j])
    return {"labelers": [a, b], "prompts": prompts, "pairs": pairs, "agreed": agreed, "fraction": agreed / pairs if pairs else None}


def _places(order: list[int], ranks: list[int]) -> dict[int, Fraction]:
    """Each response's place (0 = best); the responses of a tie share the mean of the places they span."""
    span = {r: ranks.count(r) for r in set(ranks)}
    return {i: r + Fraction(span[r] - 1, 2) for i, r in zip(order, ranks)}


def _aggregate(sample: dict, judged: dict[str, dict]) -> dict:
    texts = [r["text"] for r in sample["responses"]]
    k = len(texts)
    real = [r for r in judged.values() if not r["unacceptable"] and sorted(r["order"]) == list(range(k))]
    if real:
        places = [_places(r["order"], r["ranks"]) for r in real]
        scores = [float(k - 1 - sum(p[i] for p in places) / len(places)) for i in range(k)]  # Borda points, higher is better
    else:
        scores = [0.0] * k
    order, ranks = rank(scores, 1e-9)  # exact means (fractions): only equal ones tie
    return {"prompt": sample["prompt"], "responses": [texts[i] for i in order], "ranks": ranks, "scores": [scores[i] for i in order],
            "sample_index": order, "labeler": "human", "labelers": sorted(judged),
            "unacceptable": sum(r["unacceptable"] for r in judged.values())}


# --- the web app -----------------------------------------------------------------------------------


def page_html() -> str:
    return resources.files("rlhf").joinpath("label_web_page.html").read_text(encoding="utf-8")


def make_app(samples_rows: list[dict], log: JudgmentLog, token: str, *, origins: set[str] | None = None) -> Any:
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
    def index() -> Any:
        from flask import g

        return page.replace("{{nonce}}", g.nonce), 200, {"Content-Type": "text/html; charset=utf-8"}

    app.get("/favicon.ico")(lambda: ("", 204))  # none: spare the browser's console a 404
    app.get("/api/next")(api.next)
    app.post("/api/judge")(api.judge)
    app.post("/api/skip")(api.skip)
    app.post("/api/undo")(api.undo)
    app.get("/api/stats")(api.stats)
    return app


def _guard(app: Any, token: str) -> None:
    """The checks every request passes, and the headers every response carries."""
    from flask import g, jsonify, request

    expected = token.encode()

    @app.before_request
    def check() -> Any:
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
    def headers(response: Any) -> Any:
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
    def refused(error: UserError) -> Any:
        return jsonify(error=str(error)), 409 if isinstance(error, Conflict) else 400


class _Api:
    """The JSON routes, over the samples' rows and the log."""

    def __init__(self, rows: list[dict], log: JudgmentLog) -> None:
        self.rows, self.log, self.total = rows, log, len(rows)

    def prompt(self, index: int, state: LabelerState) -> dict:
        row = self.rows[index]
        return {"index": index, "prompt": row["prompt"], "responses": [r["text"] for r in row["responses"]], "progress": state.progress()}

    def next(self) -> Any:
        from flask import jsonify, request

        state = self.log.state(check_labeler(request.args.get("labeler", "")), self.total)
        index = state.next_index
        return jsonify({"done": True, "progress": state.progress()} if index is None else self.prompt(index, state))

    def judge(self) -> Any:
        from flask import jsonify

        body, labeler, index = self._body(with_prompt=True)
        unacceptable = body.get("unacceptable", False)
        if not isinstance(unacceptable, bool):
            raise UserError("unacceptable must be true or false")
        order, ranks = judgment_ranks(body.get("order"), body.get("ties"), len(self.rows[index]["responses"]), unacceptable)
        record = self.log.judge(labeler, index, order, ranks, unacceptable=unacceptable, total=self.total)
        return jsonify(recorded=record["id"], progress=self.log.state(labeler, self.total).progress())

    def skip(self) -> Any:
        from flask import jsonify

        _, labeler, index = self._body(with_prompt=True)
        record = self.log.skip(labeler, index, total=self.total)
        return jsonify(recorded=record["id"], progress=self.log.state(labeler, self.total).progress())

    def undo(self) -> Any:
        """Cancel the labeler's latest judgment and answer with that prompt, to be labeled again."""
        from flask import jsonify

        _, labeler, _ = self._body(with_prompt=False)
        record, undone = self.log.undo(labeler)
        index = undone["prompt_index"]
        shown = self.prompt(index, self.log.state(labeler, self.total)) if index < self.total else None
        return jsonify(undone={"id": record["undoes"], "kind": undone["kind"], "prompt_index": index}, next=shown)

    def stats(self) -> Any:
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
        return body, labeler, index if with_prompt else -1


# --- serving ---------------------------------------------------------------------------------------


def samples_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _quiet_handler() -> Any:
    from werkzeug.serving import WSGIRequestHandler

    class Quiet(WSGIRequestHandler):
        def log_request(self, code: Any = "-", size: Any = "-") -> None:
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

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def stats_lines(stats: dict) -> list[str]:
    """`rlhf label --by human --stats`: the summary, then each pair of labelers' agreement."""
    lines = [summary_line(stats)]
    for pair in stats["agreement"]:
        share = f"{pair['fraction']:.3f}" if pair["fraction"] is not None else "n/a"
        a, b = pair["labelers"]
        lines.append(f"  {a} ~ {b}: {share} agreement over {pair['pairs']} pairs on {pair['prompts']} prompts both ranked")
    return lines


def summary_line(stats: dict) -> str:
    people = ", ".join(f"{name} {c['ranked']} ranked, {c['skipped']} skipped" for name, c in stats["labelers"].items()) or "none yet"
    agreement = f"; agreement {stats['fraction']:.3f} over {stats['pairs']} pairs" if stats["fraction"] is not None else ""
    return f"{stats['records']} judgments ({people}){agreement}"


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
