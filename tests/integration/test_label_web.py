"""`rlhf label --by human`: the labeling page in a real headless Chromium, its API's guards, and the judgment log.

The browser tests type, click and drag as a person would (Selenium, Debian's chromium and chromium-driver;
tests/browser_setup.py says when they may be installed) and check what the log holds afterwards.
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from rlhf.errors import UserError
from rlhf.feedback.judgment_log import JudgmentLog, check_labeler, stats_lines
from rlhf.feedback.label_web import default_log_path, publish_human, samples_file, start_server
from rlhf.store.entry import Entry, now_iso
from rlhf.store.registry import Registry
from tests.browser_setup import CHROMEDRIVER, CHROMIUM, browser_problem

pytestmark = pytest.mark.slow

SCRIPT = "<script>window.pwned=1</script>"
IMG = '<img src=x onerror="window.pwned=2">'
PROMPTS = [
    ("What is 2+3?", ["5", "six", "2+3"]),
    ("<b>Say something</b> & more", [SCRIPT, IMG, "a plain answer"]),
    ("Name a colour.", ["red", "blue", "green", "a sound"]),
    ("Count to three.", ["1 2 3", "one two", "3 2 1"]),
    ("Greet me.", ["hello", "hi there", "go away"]),
]
TOTAL = len(PROMPTS)
ENTER, BACKSPACE = "\ue007", "\ue003"  # selenium's Keys.ENTER and Keys.BACKSPACE (selenium is imported only where a browser runs)


@pytest.fixture
def samples(tmp_path: Path) -> Path:
    """A samples.jsonl as `rlhf sample` writes it (no manifest: read_samples takes the file as it is)."""
    path = tmp_path / "samples.jsonl"
    rows = [{"prompt": prompt, "prompt_ids": [1, 2], "shard": 0, "seed": i, "rank": 0,
             "responses": [{"text": text, "ids": [3], "logprobs": [-0.5], "ended": True} for text in texts]}
            for i, (prompt, texts) in enumerate(PROMPTS)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def server(samples: Path, tmp_path: Path):
    """Start the page's server in this process: (url with the token, token, log path); stopped at teardown."""
    stops = []

    def start(log: Path = tmp_path / "judgments.jsonl") -> tuple[str, str, Path]:
        url, stop = start_server(samples, log)
        stops.append(stop)
        return url, re.search(r"token=([^&]+)", url).group(1), log

    yield start
    for stop in stops:
        stop()


@pytest.fixture(scope="session")
def browser_ready() -> None:
    if importlib.util.find_spec("selenium") is None:
        pytest.skip("selenium is not installed: pip install -e '.[dev]'")
    problem = browser_problem(os.environ, root=os.geteuid() == 0)
    if problem:
        pytest.skip(problem)


@pytest.fixture
def new_driver(browser_ready):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    drivers = []

    def start():
        options = webdriver.ChromeOptions()
        for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
            options.add_argument(flag)
        options.binary_location = str(CHROMIUM)
        driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
        drivers.append(driver)
        return driver

    yield start
    for driver in drivers:
        driver.quit()


# --- driving the page --------------------------------------------------------------------------------


def open_page(driver, url: str, name: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.get(url)
    field = driver.find_element(By.ID, "labeler")
    field.clear()
    field.send_keys(name, Keys.ENTER)


def press(driver, *keys: str) -> None:
    """Keys typed at the page (its body has the focus), one after another, as a person types them."""
    from selenium.webdriver.common.action_chains import ActionChains

    for key in keys:
        ActionChains(driver).send_keys(key).perform()


def wait_for(driver, index: int | None) -> None:
    """Until the page shows prompt `index` (None: "all labeled") and no request is in flight."""
    from selenium.webdriver.support.ui import WebDriverWait

    want = ("done", "") if index is None else ("ready", str(index))

    def shown(d) -> bool:
        return d.execute_script("const c = document.getElementById('card'); "
                                "return [c.dataset.state, c.dataset.index, document.body.dataset.busy || '']") == [*want, ""]

    WebDriverWait(driver, 15, poll_frequency=0.05).until(shown)


def text_of(driver, selector: str) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, selector)]


def effective(log: Path, labeler: str) -> dict[int, dict]:
    return JudgmentLog(log).state(labeler, TOTAL).effective


def card(driver, index: int):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f".response[data-index='{index}']")


def line(driver, index: int):
    """Response `index`'s line in the order list beside the cards."""
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f"#order li[data-index='{index}']")


def drag(driver, source, target, *, below: bool = False, release: bool = True) -> None:
    """A mouse drag: press on `source`, move onto the upper (or lower) half of `target`, and let go (unless not `release`)."""
    from selenium.webdriver.common.action_chains import ActionChains

    offset = target.size["height"] // 4  # from the target's centre: well inside the half that is meant
    chain = ActionChains(driver).click_and_hold(source).move_to_element_with_offset(target, 0, offset if below else -offset)
    (chain.release() if release else chain).perform()


def drag_feedback(driver) -> dict[str, list[str]]:
    """What the page shows mid-drag: the marked elements (a response's index, or the order list's id) per class."""
    return driver.execute_script(
        "const marked = (c) => [...document.getElementsByClassName(c)].map((e) => e.dataset.index || e.id); "
        "return {body: [document.body.dataset.dragging || ''], dragging: marked('dragging'), before: marked('drop-before'), "
        "after: marked('drop-after'), end: marked('drop-end')}")


NO_DRAG = {"body": [""], "dragging": [], "before": [], "after": [], "end": []}


def record_posts(driver) -> None:
    """From now on the page's POSTs are also kept in window.posts as (path, JSON body). Wraps fetch once per page:
    open_page's driver.get of a URL that differs at most after its `#` does not load the page again."""
    driver.execute_script("window.posts = []; if (window.unwatchedFetch) return; window.unwatchedFetch = window.fetch; "
                          "window.fetch = (path, options) => { if (options.body) window.posts.push([path, JSON.parse(options.body)]); "
                          "return window.unwatchedFetch(path, options); };")


def judge_posts(driver) -> list[dict]:
    """The judgments the page sent since record_posts, without the labeler's name."""
    return [{k: v for k, v in body.items() if k != "labeler"} for path, body in driver.execute_script("return window.posts")
            if path == "/api/judge"]


# --- the page --------------------------------------------------------------------------------------


def test_keyboard_only_labeling_ties_skip_unacceptable_undo(new_driver, server):
    url, _, log = server()
    driver = new_driver()
    open_page(driver, url, "alice")
    wait_for(driver, 0)
    assert text_of(driver, "#progress") == ["0 of 5 labeled"]
    press(driver, "1", ENTER)  # Enter before every response is ordered: refused on the page, nothing sent
    assert "Order all 3 responses first" in text_of(driver, "#status")[0]
    press(driver, BACKSPACE, "2", "1", "3")  # Backspace takes the 1 back out
    assert text_of(driver, "#order li") == ["Response 2", "Response 1", "Response 3"]
    assert not log.exists()
    press(driver, ENTER)
    wait_for(driver, 1)
    assert effective(log, "alice")[0]["order"] == [1, 0, 2] and effective(log, "alice")[0]["ranks"] == [0, 1, 2]

    # Hostile model text is shown as text: no element made of it, no script run.
    assert text_of(driver, "#prompt") == [PROMPTS[1][0]]
    assert text_of(driver, ".response .text") == PROMPTS[1][1]
    assert driver.execute_script("return document.querySelectorAll('#card img, #card script, #card b').length") == 0
    assert driver.execute_script("return window.pwned") is None
    press(driver, "3", "1", "t")
    assert text_of(driver, "#order li") == ["Response 3", "Response 1 (tied with the one above)"]
    press(driver, "2", ENTER)
    wait_for(driver, 2)
    assert effective(log, "alice")[1]["order"] == [2, 0, 1] and effective(log, "alice")[1]["ranks"] == [0, 0, 2]
    assert driver.execute_script("return window.pwned") is None

    press(driver, "4", "3", "2", "1", ENTER)
    wait_for(driver, 3)
    press(driver, "s")
    wait_for(driver, 4)
    assert text_of(driver, "#progress") == ["4 of 5 labeled (1 skipped)"]
    press(driver, "x")
    wait_for(driver, None)
    assert "All prompts are labeled" in text_of(driver, "#status")[0]
    assert text_of(driver, "#progress") == ["5 of 5 labeled (1 skipped)"]
    assert effective(log, "alice")[4]["unacceptable"] is True and effective(log, "alice")[3]["kind"] == "skip"

    press(driver, "u")  # undoes "all unacceptable": prompt 5 again, no longer counted
    wait_for(driver, 4)
    assert 4 not in effective(log, "alice") and text_of(driver, "#progress") == ["4 of 5 labeled (1 skipped)"]
    press(driver, "u")  # and then the skip
    wait_for(driver, 3)
    assert set(effective(log, "alice")) == {0, 1, 2}
    press(driver, "1", "2", "3", ENTER)
    wait_for(driver, 4)
    press(driver, "2", "1", "3", ENTER)
    wait_for(driver, None)

    records = JudgmentLog(log).read()
    assert [r["kind"] for r in records] == ["rank", "rank", "rank", "skip", "rank", "undo", "undo", "rank", "rank"]
    assert records[5]["undoes"] == records[4]["id"] and records[6]["undoes"] == records[3]["id"]
    state = effective(log, "alice")
    assert {i: state[i]["order"] for i in state} == {0: [1, 0, 2], 1: [2, 0, 1], 2: [3, 2, 1, 0], 3: [0, 1, 2], 4: [1, 0, 2]}
    assert JudgmentLog(log).stats(TOTAL)["labelers"] == {"alice": {"ranked": 5, "unacceptable": 0, "skipped": 0, "undone": 2}}


def test_drag_orders_as_the_keys_do_and_mixes_with_keys_backspace_and_undo(new_driver, server):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    url, _, log = server()
    driver = new_driver()
    open_page(driver, url, "dana")
    wait_for(driver, 0)
    record_posts(driver)

    # Held over the upper half of card 1: card 3 fades and a line marks card 1's top edge; let go, 3 is above 1
    # (1, not yet ordered, joined the order first).
    drag(driver, card(driver, 2), card(driver, 0), release=False)
    assert drag_feedback(driver) == {**NO_DRAG, "body": ["1"], "dragging": ["2"], "before": ["0"]}
    assert text_of(driver, "#order li") == []  # nothing changes before the drop
    ActionChains(driver).release().perform()
    assert drag_feedback(driver) == NO_DRAG
    assert text_of(driver, "#order li") == ["Response 3", "Response 1"]
    drag(driver, card(driver, 1), line(driver, 2), below=True)  # onto the lower half of 3's line in the order
    assert text_of(driver, "#order li") == ["Response 3", "Response 2", "Response 1"]
    assert text_of(driver, ".response .place") == ["#3", "#2", "#1"]
    press(driver, ENTER)
    wait_for(driver, 1)
    assert effective(log, "dana")[0]["order"] == [2, 1, 0] and effective(log, "dana")[0]["ranks"] == [0, 1, 2]

    # Keys first (2 ties with 1), then 3 dragged above 1: the tie is kept, 2 still right below 1.
    press(driver, "1", "2", "t")
    drag(driver, card(driver, 2), card(driver, 0))
    assert text_of(driver, "#order li") == ["Response 3", "Response 1", "Response 2 (tied with the one above)"]
    drag(driver, line(driver, 0), line(driver, 1), below=True)  # 1 leaves the tie: 2 now ties with nothing, not with 3
    assert text_of(driver, "#order li") == ["Response 3", "Response 2", "Response 1"]
    press(driver, "t")  # t still ties the last with the one before it
    assert text_of(driver, "#order li") == ["Response 3", "Response 2", "Response 1 (tied with the one above)"]
    press(driver, ENTER)
    wait_for(driver, 2)
    assert effective(log, "dana")[1]["order"] == [2, 1, 0] and effective(log, "dana")[1]["ranks"] == [0, 1, 1]

    # Let go outside any response: nothing changes (nor does the click the browser may send the card after a drag).
    drag(driver, card(driver, 0), driver.find_element(By.ID, "prompt"))
    assert text_of(driver, "#order li") == [] and drag_feedback(driver) == NO_DRAG
    drag(driver, card(driver, 1), driver.find_element(By.ID, "order"), release=False)  # the empty order takes a drop
    assert drag_feedback(driver) == {**NO_DRAG, "body": ["1"], "dragging": ["1"], "end": ["order"]}
    ActionChains(driver).release().perform()
    assert text_of(driver, "#order li") == ["Response 2"]
    press(driver, "1", "3", "t")
    drag(driver, card(driver, 3), card(driver, 0), below=True)  # in between the tied 1 and 3: they are apart now
    assert text_of(driver, "#order li") == ["Response 2", "Response 1", "Response 4", "Response 3"]
    press(driver, BACKSPACE, BACKSPACE)  # Backspace takes out the last of the dragged order
    assert text_of(driver, "#order li") == ["Response 2", "Response 1"]
    card(driver, 3).click()  # a plain click after drags still picks
    press(driver, "3", ENTER)
    wait_for(driver, 3)
    assert effective(log, "dana")[2]["order"] == [1, 0, 3, 2] and effective(log, "dana")[2]["ranks"] == [0, 1, 2, 3]

    # u undoes the last submission, dragged or keyed alike; the prompt comes back unordered, to be dragged anew.
    press(driver, "u")
    wait_for(driver, 2)
    assert 2 not in effective(log, "dana") and text_of(driver, "#order li") == []
    drag(driver, card(driver, 3), card(driver, 0))
    press(driver, "2", "3", ENTER)
    wait_for(driver, 3)
    assert effective(log, "dana")[2]["order"] == [3, 0, 1, 2] and effective(log, "dana")[2]["ranks"] == [0, 1, 2, 3]
    assert [r["kind"] for r in JudgmentLog(log).read()] == ["rank", "rank", "rank", "undo", "rank"]
    dragged = judge_posts(driver)

    # The same three orders by keys alone send the same JSON and are stored the same.
    open_page(driver, url, "kim")
    wait_for(driver, 0)
    record_posts(driver)
    for index, keys in ((0, "321"), (1, "321t"), (2, "4123")):
        press(driver, *keys, ENTER)
        wait_for(driver, index + 1)
    assert judge_posts(driver) == [dragged[0], dragged[1], dragged[3]]
    assert dragged[1] == {"prompt_index": 1, "order": [2, 1, 0], "ties": [False, False, True], "unacceptable": False}
    assert dragged[3]["ties"] == [False] * 4
    kim, dana = ({i: (r["order"], r["ranks"]) for i, r in effective(log, name).items()} for name in ("kim", "dana"))
    assert kim == dana


def serve_in_process(samples: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """`serve` in its own interpreter, as `rlhf label --by human` runs it: the process and the URL it printed."""
    code = "import sys; from rlhf.feedback.label_web import serve; serve(sys.argv[1], sys.argv[2])"
    process = subprocess.Popen([sys.executable, "-c", code, str(samples), str(log)], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    for line in process.stdout:
        if line.startswith("open http://127.0.0.1:"):
            return process, line.split()[1]
        assert time.monotonic() < deadline, "the server printed no URL"
    raise AssertionError(f"the server exited ({process.wait()}) without printing its URL")


def test_closing_the_browser_and_killing_the_server_loses_nothing(new_driver, samples, tmp_path):
    from selenium.webdriver.common.by import By

    log = tmp_path / "judgments.jsonl"
    process, url = serve_in_process(samples, log)
    try:
        driver = new_driver()
        open_page(driver, url, "erin")
        wait_for(driver, 0)
        for index in (1, 0, 2):  # with the mouse this time
            driver.find_element(By.CSS_SELECTOR, f".response[data-index='{index}']").click()
        driver.find_element(By.ID, "submit").click()
        wait_for(driver, 1)
        press(driver, "s")
        wait_for(driver, 2)
        driver.quit()
    finally:
        process.kill()  # SIGKILL: what it acknowledged must already be on disk
        process.wait()
    assert {i: r["kind"] for i, r in effective(log, "erin").items()} == {0: "rank", 1: "skip"}

    process, url = serve_in_process(samples, log)
    try:
        driver = new_driver()
        open_page(driver, url, "erin")
        wait_for(driver, 2)  # resumes at the first prompt erin has not labeled
        assert text_of(driver, "#progress") == ["2 of 5 labeled (1 skipped)"]
        assert text_of(driver, "#prompt") == [PROMPTS[2][0]]
    finally:
        process.kill()
        process.wait()
    assert effective(log, "erin")[0]["order"] == [1, 0, 2] and len(JudgmentLog(log).read()) == 2


def post(url: str, token: str | None, path: str, body: object, *, origin: str | None = None,
         content_type: str = "application/json", host: str | None = None) -> tuple[int, dict]:
    """A POST as another program would send it: (status, JSON answer)."""
    data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    headers = {"Content-Type": content_type, **({"X-Rlhf-Token": token} if token else {}), **({"Origin": origin} if origin else {}),
               **({"Host": host} if host else {})}
    return _send(urllib.request.Request(base(url) + path, data=data, headers=headers, method="POST"))


def get(url: str, token: str | None, path: str, *, host: str | None = None) -> tuple[int, dict]:
    headers = {**({"X-Rlhf-Token": token} if token else {}), **({"Host": host} if host else {})}
    return _send(urllib.request.Request(base(url) + path, headers=headers))


def _send(request: urllib.request.Request) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def base(url: str) -> str:
    return url.split("/#", 1)[0]


def api_labeler(url: str, token: str, name: str, judgments: list[tuple[str, int, dict]], answers: list) -> None:
    """One labeler through the API, a judgment at a time while the browser labels too; each one then sent again."""
    for path, index, extra in judgments:
        answers.append((name, index, post(url, token, path, {"labeler": name, "prompt_index": index, **extra})[0]))
        time.sleep(0.15)
    path, index, extra = judgments[0]
    answers.append((name, "again", post(url, token, path, {"labeler": name, "prompt_index": index, **extra})[0]))


def test_three_labelers_at_once_each_judgment_stored_once_and_agreement(new_driver, server):
    url, token, log = server()
    carol = [("/api/judge", 0, {"order": [1, 0, 2], "ties": [False, False, False]}),
             ("/api/judge", 1, {"order": [2, 1, 0], "ties": [False, True, False]}),
             ("/api/judge", 2, {"order": [0, 1, 2, 3]}), ("/api/judge", 3, {"order": [0, 1, 2]}), ("/api/judge", 4, {"order": [2, 1, 0]})]
    dave = [("/api/judge", 0, {"order": [], "unacceptable": True})] + [("/api/skip", i, {}) for i in range(1, TOTAL)]
    answers: list = []
    threads = [threading.Thread(target=api_labeler, args=(url, token, name, judgments, answers))
               for name, judgments in (("carol", carol), ("dave", dave))]
    for thread in threads:
        thread.start()
    driver = new_driver()
    open_page(driver, url, "bob")
    for index, keys in ((0, "123"), (1, "321")):
        wait_for(driver, index)
        press(driver, *keys, ENTER)
    for index in (2, 3, 4):
        wait_for(driver, index)
        press(driver, "s")
    wait_for(driver, None)
    for thread in threads:
        thread.join()

    assert sorted(a[2] for a in answers) == [200] * 10 + [409, 409]  # a judgment sent twice is stored once
    records = JudgmentLog(log).read()
    assert sorted((r["labeler"], r["prompt_index"]) for r in records) == sorted((n, i) for n in ("bob", "carol", "dave") for i in range(5))
    stats = JudgmentLog(log).stats(TOTAL)
    # By hand: bob and carol both ranked prompts 0 and 1. Prompt 0: bob 0>1>2, carol 1>0>2: (0,1) disagree,
    # (0,2) and (1,2) agree. Prompt 1: bob 2>1>0, carol 2=1>0: (0,1) and (0,2) agree, (1,2) tied for carol.
    # dave judged prompt 0 all unacceptable and skipped the rest: no strict pair with anyone.
    assert stats["agreement"] == [
        {"labelers": ["bob", "carol"], "prompts": 2, "pairs": 5, "agreed": 4, "fraction": 0.8},
        {"labelers": ["bob", "dave"], "prompts": 0, "pairs": 0, "agreed": 0, "fraction": None},
        {"labelers": ["carol", "dave"], "prompts": 0, "pairs": 0, "agreed": 0, "fraction": None}]
    assert (stats["pairs"], stats["agreed"], stats["fraction"]) == (5, 4, 0.8)
    assert stats["labelers"]["dave"] == {"ranked": 0, "unacceptable": 1, "skipped": 4, "undone": 0}
    assert get(url, token, "/api/stats") == (200, json.loads(json.dumps(stats)))

    rows = JudgmentLog(log).ranked_lists([{"prompt": p, "responses": [{"text": t} for t in texts]} for p, texts in PROMPTS])
    assert [(r["sample_index"], r["ranks"], r["labelers"]) for r in rows[:2]] == [
        ([0, 1, 2], [0, 0, 2], ["bob", "carol", "dave"]),  # mean places 0.5, 0.5, 2 (dave's "unacceptable" gives no order)
        ([2, 1, 0], [0, 1, 2], ["bob", "carol"])]  # mean places 0.25, 0.75, 2 (dave skipped it)
    assert [r["responses"] for r in rows[:1]] == [["5", "six", "2+3"]] and len(rows) == 5


# --- the API's guards ------------------------------------------------------------------------------


def test_api_refuses_requests_without_the_token_cross_site_or_not_json(server):
    url, token, log = server()
    port = base(url).rsplit(":", 1)[1]
    judge = {"labeler": "mallory", "prompt_index": 0, "order": [0, 1, 2]}
    assert get(url, None, "/api/next?labeler=mallory")[0] == 403
    assert get(url, "x" * len(token), "/api/next?labeler=mallory")[0] == 403
    assert post(url, None, "/api/judge", judge)[0] == 403
    assert post(url, token, "/api/judge", judge, origin="http://evil.example")[0] == 403
    assert post(url, token, "/api/judge", judge, origin=f"http://localhost:{int(port) + 1}")[0] == 403
    assert post(url, token, "/api/judge", "labeler=mallory&prompt_index=0", content_type="application/x-www-form-urlencoded")[0] == 415
    assert post(url, token, "/api/judge", json.dumps(judge), content_type="text/plain")[0] == 415
    # DNS rebinding: a page of evil.example whose name now points here still sends its own Host.
    assert get(url, token, "/api/next?labeler=mallory", host=f"evil.example:{port}")[0] == 403
    assert not log.exists()

    for bad in ({**judge, "order": [0, 1]}, {**judge, "order": [0, 0, 1]}, {**judge, "prompt_index": 99}, {**judge, "prompt_index": True},
                {**judge, "labeler": "a/b"}, {**judge, "ties": [True]}, ["not", "an", "object"]):
        status, answer = post(url, token, "/api/judge", bad)
        assert status == 400 and "\n" not in answer["error"], (bad, answer)
    assert post(url, token, "/api/undo", {"labeler": "mallory"}) == (409, {"error": "mallory has no judgment left to undo"})
    assert post(url, token, "/api/judge", judge, origin=base(url))[0] == 200  # the page's own origin
    assert len(JudgmentLog(log).read()) == 1

    with urllib.request.urlopen(base(url) + "/", timeout=30) as response:
        html, headers = response.read().decode(), response.headers
    nonce = re.search(r"script-src 'nonce-([^']+)'", headers["Content-Security-Policy"]).group(1)
    assert f'<script nonce="{nonce}">' in html and "unsafe-inline" not in headers["Content-Security-Policy"]
    assert not re.search(r"\.(innerHTML|outerHTML)\b|insertAdjacentHTML|document\.write", html)  # text goes in as textContent only
    assert (headers["X-Frame-Options"], headers["X-Content-Type-Options"], headers["Referrer-Policy"]) == ("DENY", "nosniff", "no-referrer")
    # A cross-site preflight gets no CORS answer, so a browser never sends the request it asks for.
    preflight = urllib.request.Request(base(url) + "/api/judge", method="OPTIONS",
                                       headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(preflight, timeout=30)
    assert refused.value.code == 403 and "Access-Control-Allow-Origin" not in refused.value.headers


@pytest.mark.parametrize("name", ["a/b", "x\x1b[2J", "", "a" * 65, "bob smith", None])
def test_bad_labeler_names_are_refused_in_one_line(name, tmp_path):
    with pytest.raises(UserError) as error:
        check_labeler(name)
    message = str(error.value)
    assert "\n" not in message and "\x1b" not in message and "--labeler" in message
    assert (repr(name) if isinstance(name, str) else "NoneType") in message
    with pytest.raises(UserError):
        JudgmentLog(tmp_path / "log.jsonl").skip(name, 0)
    assert not (tmp_path / "log.jsonl").exists()
    assert check_labeler("a" * 64) == "a" * 64 and check_labeler("Dr.Who_2-b") == "Dr.Who_2-b"


# --- the log ---------------------------------------------------------------------------------------


def _append_many(path: str, labeler: str, count: int, results) -> None:
    from rlhf.feedback.judgment_log import Conflict

    log, stored = JudgmentLog(path), 0
    for index in range(count):
        try:
            log.judge(labeler, index, [0, 1, 2], [0, 1, 2])
            stored += 1
        except Conflict:
            pass
    results.put(stored)


def test_concurrent_appends_from_processes_are_all_stored_exactly_once(tmp_path):
    context = multiprocessing.get_context("fork")
    path, results = tmp_path / "log.jsonl", context.Queue()
    # Four labelers at once, 50 judgments each; then four processes of one labeler racing for the same 50 prompts.
    for names in (["w0", "w1", "w2", "w3"], ["same"] * 4):
        workers = [context.Process(target=_append_many, args=(str(path), name, 50, results)) for name in names]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)
            assert worker.exitcode == 0
    stored = sorted(results.get(timeout=10) for _ in range(8))
    assert stored[4:] == [50, 50, 50, 50] and sum(stored[:4]) == 50
    lines = path.read_text().splitlines()
    assert len(lines) == 250 and all(json.loads(line)["kind"] == "rank" for line in lines)
    records = JudgmentLog(path).read()
    assert len({r["id"] for r in records}) == 250
    for name in ("w0", "w1", "w2", "w3", "same"):
        assert sorted(r["prompt_index"] for r in records if r["labeler"] == name) == list(range(50))


def test_a_cut_last_line_is_ignored_and_the_next_append_stays_whole(tmp_path):
    path = tmp_path / "log.jsonl"
    log = JudgmentLog(path)
    log.judge("ann", 0, [1, 0], [0, 1])
    log.skip("ann", 1)
    with open(path, "ab") as f:
        f.write(b'{"id": "0123", "labeler": "ann", "kind": "ra')  # a write a crash cut short
    assert [r["kind"] for r in log.read()] == ["rank", "skip"] and log.damaged == 1
    assert log.state("ann", 5).next_index == 2
    log.judge("ann", 2, [0, 1], [0, 0])
    assert [r["prompt_index"] for r in log.read()] == [0, 1, 2] and log.damaged == 1
    assert json.loads(path.read_text().splitlines()[-1])["prompt_index"] == 2
    assert log.undo("ann")[1]["prompt_index"] == 2 and log.state("ann", 5).next_index == 2


def test_publish_human_makes_a_prefs_entry_and_refuses_another_samples_log(samples, tmp_path):
    registry = Registry(tmp_path / "home")
    assert default_log_path(registry, samples) == samples.with_name("samples.judgments.jsonl")  # a file no entry holds
    folder = tmp_path / "samples-entry"
    folder.mkdir()
    shutil.copyfile(samples, folder / "samples.jsonl")
    held = registry.publish(Entry(id="sample-1", stage="samples", status="completed", created=now_iso(), path=str(folder),
                                  run_dir=str(folder), config={}))
    path = samples_file(registry, "samples:latest")
    log = default_log_path(registry, path)
    assert path == folder / "samples.jsonl" and log == registry.root / "labels" / "sample-1.jsonl"
    with pytest.raises(UserError, match="ranks none of the 5 prompts"):
        publish_human(registry, "samples:latest", log)
    assert not (registry.root / "runs").exists() or not list((registry.root / "runs").iterdir())

    url, stop = start_server(path, log)
    try:
        token = re.search(r"token=([^&]+)", url).group(1)
        for labeler, order in (("ann", [2, 0, 1]), ("ben", [2, 1, 0])):
            assert post(url, token, "/api/judge", {"labeler": labeler, "prompt_index": 0, "order": order})[0] == 200
    finally:
        stop()
    entry = publish_human(registry, "samples:latest", log)
    assert registry.resolve("prefs:latest").id == entry.id and entry.parents == (held.id,) and entry.id.startswith("label-")
    rows = [json.loads(line) for line in (Path(entry.path) / "train.jsonl").read_text().splitlines()]
    # Places: ann 2,0,1; ben 2,1,0: means 0 (response 2), 1.5, 1.5: Borda points 2, 0.5, 0.5.
    assert rows == [{"prompt": PROMPTS[0][0], "responses": ["2+3", "5", "six"], "ranks": [0, 1, 1], "scores": [2.0, 0.5, 0.5],
                     "sample_index": [2, 0, 1], "labeler": "human", "labelers": ["ann", "ben"], "unacceptable": 0}]
    assert entry.metrics["labeler_agreement"] == 2 / 3 and entry.metrics["tied_pairs"] == 1 and entry.config["by"] == "human"
    assert (Path(entry.path) / "judgments.jsonl").read_bytes() == log.read_bytes()
    assert stats_lines(JudgmentLog(log).stats(TOTAL)) == [
        "2 judgments (ann 1 ranked, 0 skipped, ben 1 ranked, 0 skipped); agreement 0.667 over 3 pairs",
        "  ann ~ ben: 0.667 agreement over 3 pairs on 1 prompts both ranked"]

    other = tmp_path / "other.jsonl"
    other.write_text(samples.read_text().replace("What is 2+3?", "What is 2+4?"))
    with pytest.raises(UserError, match="holds judgments of another samples file"):
        start_server(other, log)
    with pytest.raises(UserError, match="holds judgments of another samples file"):
        publish_human(registry, other, log)
