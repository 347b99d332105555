"""Headless Chromium (Debian's `chromium`) driven over the DevTools protocol: open a page, collect its errors and requests.

No browser download and no heavy dependency: the system `chromium`, and `websocket-client` (which Jupyter already needs).
"""
import base64
import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
MISSING = f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium)"
# Quiet and offline: no sync, updates, field trials or other background connections on a closed network.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--no-default-browser-check",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
         "--disable-default-apps", "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
         "--remote-debugging-port=0"]


@dataclass
class Page:
    "What one page did while it loaded: console errors, exceptions, log errors, requests, failed loads, a DOM summary."
    url: str
    console_errors: list = field(default_factory=list)
    exceptions: list = field(default_factory=list)
    log_errors: list = field(default_factory=list)
    requests: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    dom: dict = field(default_factory=dict)
    screenshot: Path | None = None

    @property
    def problems(self) -> list[str]:
        "Every console error, uncaught exception, error log entry, failed load and request for anything but the page itself."
        foreign = [u for u in self.requests if u != self.url and not u.startswith(("data:", "about:"))]
        return ([f"console.{t}: {m}" for t, m in self.console_errors] + [f"exception: {m}" for m in self.exceptions]
                + [f"log error: {m}" for m in self.log_errors] + [f"request for {u}" for u in foreign]
                + [f"failed load: {m}" for m in self.failed])


# The rendered page as the reader sees it: headings, section ids, visible text, SVG plots, tables, images.
DOM_SUMMARY = """(() => {
  const shown = el => { const r = el.getBoundingClientRect(); return r.width > 0 && r.height > 0 &&
                        getComputedStyle(el).visibility !== 'hidden'; };
  const texts = sel => [...document.querySelectorAll(sel)].filter(shown).map(e => e.textContent.trim());
  return {title: document.title, ready: document.readyState, h1: texts('h1'), h2: texts('h2'), h3: texts('h3'),
          ids: [...document.querySelectorAll('[id]')].filter(shown).map(e => e.id),
          svgs: [...document.querySelectorAll('svg')].filter(shown).length,
          svg_rects: document.querySelectorAll('svg rect').length,
          tables: [...document.querySelectorAll('table')].filter(shown).length,
          table_rows: document.querySelectorAll('tr').length,
          cells: document.querySelectorAll('.jp-Cell').length, code_cells: document.querySelectorAll('.jp-CodeCell').length,
          images: [...document.images].map(i => ({loaded: i.complete && i.naturalWidth > 0, src: i.src.slice(0, 40)})),
          scripts: document.scripts.length,
          text: document.body ? document.body.innerText : '',
          width: document.documentElement.scrollWidth, height: document.documentElement.scrollHeight};
})()"""


class Chromium:
    "One headless Chromium with a fresh profile; `open(path)` loads a file in a new tab and reports what happened."

    def __init__(self, binary: str = CHROMIUM, timeout: float = 60.0, window: tuple[int, int] = (1280, 1024)):
        import websocket  # websocket-client
        if not Path(binary).exists(): raise FileNotFoundError(MISSING)
        self.timeout, self._id, self._events = timeout, 0, []
        self.root = Path(tempfile.mkdtemp(prefix="mlkit-chromium-"))
        self.profile = self.root / "profile"  # fresh and empty: no state from an earlier run
        self.log = open(self.root / "chromium.log", "wb")
        self.proc = subprocess.Popen([binary, *FLAGS, f"--window-size={window[0]},{window[1]}",
                                      f"--user-data-dir={self.profile}", "about:blank"],
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            port_file, deadline = self.profile / "DevToolsActivePort", time.monotonic() + timeout
            while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"chromium did not start (exit {self.proc.poll()}):\n{self.output()[-3000:]}")
                time.sleep(0.05)
            port, path = port_file.read_text().splitlines()[:2]
            self.ws = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=timeout, suppress_origin=True)
            self.version = self.send("Browser.getVersion")["product"]
        except BaseException:
            self.close()
            raise

    def output(self) -> str:
        "What chromium wrote to stdout and stderr."
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def _recv(self, deadline: float) -> dict:
        self.ws.settimeout(max(0.01, deadline - time.monotonic()))
        return json.loads(self.ws.recv())

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        "Call a DevTools method (on a page's `session`) and return its result; events that arrive meanwhile are kept."
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session: msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        deadline = time.monotonic() + self.timeout
        while True:
            m = self._recv(deadline)
            if m.get("id") == self._id:
                if "error" in m: raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self._events.append(m)

    def wait_for(self, method: str, session: str, timeout: float | None = None) -> dict:
        "Wait for the event `method` of `session` (events seen before count)."
        deadline = time.monotonic() + (timeout or self.timeout)
        seen = 0
        while True:
            for m in self._events[seen:]:
                if m.get("method") == method and m.get("sessionId") == session: return m["params"]
            seen = len(self._events)
            if time.monotonic() > deadline: raise TimeoutError(f"no {method} within {timeout or self.timeout} s")
            try: self._events.append(self._recv(deadline))
            except Exception as e:  # websocket timeout
                if time.monotonic() > deadline: raise TimeoutError(f"no {method} within {timeout or self.timeout} s") from e

    def _drain(self, seconds: float):
        "Keep the events that arrive within `seconds` (late console messages, late requests)."
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try: self._events.append(self._recv(deadline))
            except Exception: break

    def open(self, path: Path | str, screenshot: Path | None = None, before: str | None = None, settle: float = 0.5) -> Page:
        "Load `path` in a new tab; collect errors, requests and the rendered DOM (after running the JS `before`, as a reader"
        "clicking would) and a full-page PNG into `screenshot`."
        url = Path(path).resolve().as_uri()
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"): self.send(f"{domain}.enable", session=s)
        start = len(self._events)
        nav = self.send("Page.navigate", {"url": url}, session=s)
        page = Page(url)
        if nav.get("errorText"): page.failed.append(f"{url}: {nav['errorText']}")
        else:
            self.wait_for("Page.loadEventFired", s)
            if before: self.send("Runtime.evaluate", {"expression": before}, session=s)
            self._drain(settle)
        page.dom = self.send("Runtime.evaluate", {"expression": DOM_SUMMARY, "returnByValue": True}, session=s)["result"]["value"]
        if screenshot:
            clip = {"x": 0, "y": 0, "width": page.dom["width"], "height": min(page.dom["height"], 16000), "scale": 1}
            png = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}, session=s)["data"]
            Path(screenshot).write_bytes(base64.b64decode(png))
            page.screenshot = Path(screenshot)
        urls = {}  # requestId -> url
        for m in self._events[start:]:
            if m.get("sessionId") != s: continue
            p, kind = m.get("params", {}), m.get("method")
            if kind == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
                page.console_errors.append((p["type"], " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"])))
            elif kind == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                page.exceptions.append(d.get("exception", {}).get("description") or d.get("text"))
            elif kind == "Log.entryAdded" and p["entry"]["level"] == "error":
                page.log_errors.append(f"{p['entry']['text']} ({p['entry'].get('url', '')})")
            elif kind == "Network.requestWillBeSent":
                urls[p["requestId"]] = p["request"]["url"]
                page.requests.append(p["request"]["url"])
            elif kind == "Network.loadingFailed":
                why = p["errorText"] + (f" (blocked: {p['blockedReason']})" if p.get("blockedReason") else "")
                page.failed.append(f"{p.get('type', 'request')} {urls.get(p['requestId'], '?')[:200]}: {why}")
        self.send("Target.closeTarget", {"targetId": target})
        return page

    def close(self):
        "Stop chromium and remove its profile."
        try:
            if getattr(self, "ws", None):
                try: self.send("Browser.close")
                except Exception: pass
                self.ws.close()
        finally:
            try: self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.log.close()
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self): return self

    def __exit__(self, *exc): self.close()
