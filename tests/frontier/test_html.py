"""report.html: one self-contained page, checked as data and in a real headless Chromium driven over the
DevTools protocol: the frontier renders (screenshot not blank), one table row per trial, clicking a point
or a row selects the trial, headers sort, no console error, and no request leaves the file."""
from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import queue
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detsweep import frontier
from detsweep.frontier import html as report_html
from detsweep.results import ResultsStore, rows_to_table
from detsweep.storage import write_parquet_atomic

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt-get install "
                                                              "chromium); the browser checks of report.html need one")
RELIABILITY = {"bin_edges": [0.0, 0.5, 1.0], "count": [30, 10], "accuracy": [0.2, 0.7], "confidence": [0.3, 0.6]}


def _png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _row(tid: str, regime: str, ap: float, params: int, ece: float, seed: int = 0, **kw) -> dict:
    return {"sweep": "demo", "trial_id": tid, "status": "ok", "model": "detr_r50", "regime": regime, "seed": seed,
            "lora_rank": 8 if regime == "lora_only" else None, "ap": ap, "ap50": ap * 1.6, "trainable_params": params,
            "peak_rss_mb": 1000.0 + params / 1e5, "ece": ece, "reliability": json.dumps(RELIABILITY), **kw}


@pytest.fixture
def sweep_dir(tmp_path) -> Path:
    """A finished sweep folder: 6 ok trials (two configs with two seeds each), a failed one, the history,
    and checkpoint folders holding prediction images and a reliability diagram."""
    rows = [_row("full-s0", "full", 0.41, 41_000_000, 0.10), _row("full-s1", "full", 0.39, 41_000_000, 0.11, seed=1),
            _row("lora-s0", "lora_only", 0.30, 200_000, 0.12), _row("lora-s1", "lora_only", 0.33, 200_000, 0.13, seed=1),
            _row("partial", "partial", 0.35, 15_000_000, 0.08), _row("lr-high", "full", 0.20, 41_000_000, 0.2, lr=1e-3),
            {"sweep": "demo", "trial_id": "oom", "status": "error", "regime": "full",
             "error": "torch.OutOfMemoryError: CUDA out of memory <at step 3>"}]
    for row in rows[:2]:
        folder = tmp_path / f"train-{row['trial_id']}" / "checkpoint_000001"
        (folder / "predictions").mkdir(parents=True)
        for i, color in enumerate([(200, 30, 30), (30, 200, 30)]):
            (folder / "predictions" / f"pred_{i:03d}.png").write_bytes(_png(color))
        (folder / "reliability.png").write_bytes(_png((30, 30, 200)))
        row["checkpoint_path"] = str(folder)
    write_parquet_atomic(rows_to_table(rows), str(tmp_path / "results.parquet"))
    ResultsStore(str(tmp_path)).upsert_history(
        [{"trial_id": r["trial_id"], "epoch": e, "loss": 3.0 - e, "loss_ce": 1.0 - e / 4, "loss_ce_0": 9.0,
          "ap": r["ap"] * (e + 1) / 3, "lr": 1e-4 if e < 2 else 1e-5} for r in rows[:6] for e in range(3)])
    assert frontier.main([str(tmp_path / "results.parquet"), "--no-plots"]) == 0
    return tmp_path


def _data(page: str) -> dict:
    payload = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S).group(1)
    return json.loads(payload.replace("<\\/", "</"))


def test_report_html_is_self_contained_and_holds_every_trial(sweep_dir):
    page = (sweep_dir / "report.html").read_text()
    # Nothing to fetch: no external script, and no src or href in the markup but inline data (the images the
    # script adds are data URIs: the browser test below records every request).
    markup = re.sub(r"<script[^>]*>.*?</script>", "", page, flags=re.S)
    assert not re.findall(r'''(?:src|href)\s*=\s*["'](?!data:)''', markup) and "<script src" not in page
    assert "Plotly" in page and len(page) > 1_000_000 and page.count("<script") == 3
    data = _data(page)
    assert [t["trial_id"] for t in data["trials"]] == ["full-s0", "full-s1", "lora-s0", "lora-s1", "partial",
                                                       "lr-high", "oom"]
    oom = data["trials"][-1]
    assert oom["status"] == "error" and oom["reason"].startswith("torch.OutOfMemoryError") and oom["pareto_rank"] is None
    assert data["pairs"] == [["ap", "trainable_params"], ["ap", "peak_rss_mb"], ["ap", "ece"],
                             ["trainable_params", "peak_rss_mb"], ["trainable_params", "ece"], ["peak_rss_mb", "ece"]]
    assert "regime: full" in data["trials"][0]["hover"] and "<b>ap</b>: 0.41" in data["trials"][0]["hover"]
    assert data["history"]["full-s0"]["epoch"] == [0, 1, 2]
    assert set(data["history"]["full-s0"]) == {"epoch", "loss", "loss_ce", "ap", "lr"}  # no per-layer loss_ce_0
    images = data["images"]["full-s0"]
    assert len(images["predictions"]) == 2 and all(s.startswith("data:image/png;base64,") for s in images["predictions"])
    assert images["reliability"].startswith("data:image/png;base64,") and "lora-s0" not in data["images"]
    reps = {r["config_id"]: r for r in data["replicates"]}
    assert reps["full-s0"]["n"] == 2 and reps["full-s0"]["trial_ids"] == ["full-s0", "full-s1"]
    assert reps["full-s0"]["label"] == "full" and reps["partial"]["label"] == "partial"  # as the PNGs label them
    assert reps["full-s0"]["below"]["ap"] > 0 and reps["partial"]["below"]["ap"] == 0  # one seed: no CI
    assert any(r["not_separable"] for r in data["replicates"])
    assert data["selected"] == "full-s0"  # the best on the headline objective


def test_no_html_flag_and_a_sweep_without_history_or_checkpoints(tmp_path):
    write_parquet_atomic(rows_to_table([_row("only", "full", 0.3, 10, 0.1)]), str(tmp_path / "results.parquet"))
    assert frontier.main([str(tmp_path / "results.parquet"), "--no-plots", "--no-html"]) == 0
    assert not (tmp_path / "report.html").exists() and (tmp_path / "report.md").exists()
    assert frontier.main([str(tmp_path / "results.parquet"), "--no-plots"]) == 0
    data = _data((tmp_path / "report.html").read_text())
    assert data["history"] == {} and data["images"] == {} and data["replicates"] is None


class Chromium:
    """Headless Chromium over the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON messages ended
    by NUL, commands on the browser's fd 3, replies and events on its fd 4); no websocket, no extra package."""

    def __init__(self, profile: Path) -> None:
        to_browser, to_us = os.pipe(), os.pipe()  # close-on-exec: only the dup2'd copies reach the browser
        self._w, self._r = to_browser[1], to_us[0]
        # Copies above 3 and 4 first, so that neither dup2 below overwrites the other's source.
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_browser[0], to_us[1])]
        args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={profile}", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-features=Translate,OptimizationHints,MediaRouter", "--hide-scrollbars", "about:blank"]
        # posix_spawn, not subprocess: Popen closes every descriptor but its pass_fds after preexec_fn, fds 3 and 4 too.
        self.pid = os.posix_spawn(CHROMIUM, args, os.environ, file_actions=[
            (os.POSIX_SPAWN_DUP2, ends[0], 3), (os.POSIX_SPAWN_DUP2, ends[1], 4),
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0), (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)])
        for fd in (*ends, to_browser[0], to_us[1]):
            os.close(fd)
        self.events: list[dict] = []
        self._replies: dict[int, queue.Queue] = {}
        self._next = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buffer = b""
        while chunk := os.read(self._r, 1 << 16):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                if "id" in message:
                    self._replies[message["id"]].put(message)
                else:
                    self.events.append(message)

    def send(self, method: str, session: str | None = None, timeout: float = 60, **params) -> dict:
        with self._lock:
            self._next += 1
            call = {"id": self._next, "method": method, "params": params}
            self._replies[call["id"]] = queue.Queue()
        if session:
            call["sessionId"] = session
        os.write(self._w, json.dumps(call).encode() + b"\0")
        reply = self._replies[call["id"]].get(timeout=timeout)
        assert "error" not in reply, (method, reply["error"])
        return reply["result"]

    def evaluate(self, session: str, expression: str):
        result = self.send("Runtime.evaluate", session, expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except Exception:  # already gone, or hung: ended below
            pass
        for _ in range(100):
            if os.waitpid(self.pid, os.WNOHANG)[0]:
                break
            time.sleep(0.1)
        else:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self._w)


def _open(browser: Chromium, url: str) -> str:
    target = browser.send("Target.createTarget", url="about:blank")["targetId"]
    session = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    for domain in ("Runtime", "Log", "Network", "Page"):
        browser.send(f"{domain}.enable", session)
    browser.send("Emulation.setDeviceMetricsOverride", session, width=1400, height=1500, deviceScaleFactor=1,
                 mobile=False)
    browser.send("Page.navigate", session, url=url)
    deadline = time.time() + 60
    while browser.evaluate(session, "document.body && document.body.dataset.ready") != "yes":
        assert time.time() < deadline, "report.html did not finish drawing within 60 s"
        time.sleep(0.2)
    return session


def _click(browser: Chromium, session: str, x: float, y: float) -> None:
    for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
        browser.send("Input.dispatchMouseEvent", session, type=kind, x=x, y=y, button="left", clickCount=1)
        time.sleep(0.1)


@needs_chromium
def test_report_html_in_headless_chromium(sweep_dir, tmp_path):
    browser = Chromium(tmp_path / "profile")
    try:
        session = _open(browser, (sweep_dir / "report.html").as_uri())
        ev = lambda js: browser.evaluate(session, js)  # noqa: E731
        assert ev("document.querySelectorAll('#trials tbody tr').length") == 7  # one row per trial, failed too
        assert ev("document.querySelectorAll('#trials tbody tr.failed').length") == 1
        assert ev("document.querySelector('#trials tr.failed td.reason').textContent").startswith("torch.OutOfMemory")
        assert ev("document.querySelectorAll('#plots .plot .main-svg').length") >= 6  # six objective pairs drawn
        assert ev("document.querySelectorAll('#plot-0 .scatterlayer .point').length") >= 6
        assert ev("document.querySelectorAll('#plot-0 .errorbar').length") > 0  # seed replicates' CIs
        assert ev("document.getElementById('replicates').textContent").count("not separable") >= 1
        configs = ev("[...document.querySelectorAll('#replicates tr td:first-child')].map(td => td.textContent).join()")
        assert "full" in configs.split(",") and "full-s0" not in configs  # the config, not its first seed's trial
        assert ev("document.body.dataset.selected") == "full-s0"
        assert ev("document.querySelectorAll('#predictions img').length") == 2
        assert ev("document.querySelectorAll('#curve-0 .scatterlayer .trace').length") == 2  # loss, loss_ce

        png = base64.b64decode(browser.send("Page.captureScreenshot", session, format="png")["data"])
        (tmp_path / "report.png").write_bytes(png)
        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
        assert pixels.shape[:2] == (1500, 1400)
        assert (pixels.sum(-1) < 720).mean() > 0.03, "the screenshot is (nearly) blank"
        front_red = (abs(pixels - [214, 39, 40]).sum(-1) < 40).sum()  # plotly's #d62728 front markers
        assert front_red > 200, front_red

        # A real mouse click on a plotted point of the lora config selects that trial.
        x, y = ev("""(() => { const gd = document.getElementById('plot-0');
            const i = gd.data.findIndex(t => t.name === 'Pareto front');
            const k = gd.data[i].customdata.indexOf('lora-s1');
            const r = gd.querySelectorAll('.scatterlayer .trace')[i].querySelectorAll('.point')[k].getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2]; })()""")
        _click(browser, session, x, y)
        assert ev("document.body.dataset.selected") == "lora-s1"
        assert ev("document.querySelector('#trials tr.sel').dataset.trial") == "lora-s1"
        assert "no prediction images" in ev("document.getElementById('predictions').textContent")
        ev("document.querySelector('#trials tr[data-trial=\"oom\"]').click()")
        assert ev("document.getElementById('detail-title').textContent") == "Trial oom (error)"
        ev("document.querySelector('#trials th[data-col=\"ap\"]').click()")
        order = ev("[...document.querySelectorAll('#trials tbody tr')].map(r => r.dataset.trial)")
        assert order == ["lr-high", "lora-s0", "lora-s1", "partial", "full-s1", "full-s0", "oom"]  # nulls last
    finally:
        browser.close()

    methods = [e["method"] for e in browser.events]
    errors = [e["params"] for e in browser.events if e["method"] == "Runtime.exceptionThrown"
              or (e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
              or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    assert errors == [], errors
    assert "Network.requestWillBeSent" in methods  # the events were really recorded
    urls = [e["params"]["request"]["url"] for e in browser.events if e["method"] == "Network.requestWillBeSent"]
    assert [u for u in urls if not u.startswith(("file:", "data:"))] == [], "report.html made network requests"
    assert [e["params"] for e in browser.events if e["method"] == "Network.loadingFailed"] == []


def test_report_html_carries_the_sweeps_cost(tmp_path):
    """With prices in the sweep (a `cost_usd` per trial), the page's summary totals it and each trial shows it."""
    rows = [_row("a", "full", 0.4, 41_000_000, 0.1, cost_usd=0.75), _row("b", "lora_only", 0.3, 200_000, 0.1,
                                                                         cost_usd=0.25)]
    write_parquet_atomic(rows_to_table(rows), str(tmp_path / "results.parquet"))
    assert frontier.main([str(tmp_path / "results.parquet"), "--no-plots"]) == 0
    data = _data((tmp_path / "report.html").read_text())
    assert data["cost"] == {"total": 1.0, "mean": 0.5, "n": 2}
    assert {t["trial_id"]: t["cost_usd"] for t in data["trials"]} == {"a": 0.75, "b": 0.25}
