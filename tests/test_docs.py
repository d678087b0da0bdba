"""/docs and /redoc work offline: Swagger UI and ReDoc come from the installed fastapi-offline package.

The browser test starts a real server and opens /docs in Debian's headless Chromium with every
non-loopback host unresolvable, driven over the Chrome DevTools Protocol on a pipe
(--remote-debugging-pipe: JSON messages ending in NUL on fds 3 and 4, so no websocket library and
no browser download). It waits for the operations list, checks that the browser asked for nothing
but the server, and saves a full-page screenshot in the test's tmp_path.
"""

import base64
import fcntl
import json
import os
import re
import select
import subprocess
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.http.app import create_app
from service.settings import Settings
from tests.server import free_port, serve

CHROMIUM = Path("/usr/bin/chromium")
SEARCH = "/collections/{name}/points/search"
EXPECTED = {SEARCH, "/collections/{name}", "/collections/{name}/points/recommend", "/healthz"}


def asset_urls(html: str) -> list[str]:
    """Every URL the page loads: src/href attributes and the spec url of either page."""
    return re.findall(r'(?:src|href|spec-url)="([^"]+)"', html) + re.findall(r"url: '([^']+)'", html)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_use_local_assets(tmp_path, page):
    with TestClient(create_app(Settings(data_dir=tmp_path, demo=False, api_key=None))) as client:
        html = client.get(page)
        assert html.status_code == 200 and "text/html" in html.headers["content-type"]
        urls = asset_urls(html.text)
        assert "/openapi.json" in urls
        assert any(u.endswith(".js") for u in urls), urls
        assert not re.search(r"https?://|//cdn|jsdelivr|unpkg|fonts\.googleapis", html.text), html.text
        for url in urls:
            assert url.startswith("/") and not url.startswith("//"), url
            r = client.get(url)
            assert r.status_code == 200 and r.content, url
            if url.endswith(".js"):
                assert len(r.content) > 100_000 and "javascript" in r.headers["content-type"], url


class Chromium:
    """Headless Chromium driven over the DevTools Protocol on a pipe."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-extensions", "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
             "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
             "--window-size=1280,1000", "--remote-debugging-pipe"]

    def __init__(self, profile: Path):
        to_r, self.to_w = os.pipe()  # we write commands, Chromium reads fd 3
        self.from_r, from_w = os.pipe()  # Chromium writes fd 4, we read

        def fds():  # in the child: the pipes on fds 3 and 4, inheritable (the pipes may be 3 or 4 already)
            r, w = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_r, from_w))
            os.dup2(r, 3)
            os.dup2(w, 4)

        self.proc = subprocess.Popen(
            [str(CHROMIUM), *self.FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=fds, close_fds=False, env={**os.environ, "TZ": "UTC"})
        os.close(to_r)
        os.close(from_w)
        self.buf, self.next_id, self.events = b"", 0, []
        self.session = None

    def send(self, method: str, params: dict | None = None, timeout: float = 30, session: bool = True) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self.to_w, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            while b"\0" in self.buf:
                raw, self.buf = self.buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self.next_id:
                    if "error" in reply:
                        raise AssertionError(f"{method}: {reply['error']}")
                    return reply["result"]
                if "method" in reply:
                    self.events.append(reply)
            left = deadline - time.time()
            if left <= 0 or not select.select([self.from_r], [], [], left)[0]:
                raise AssertionError(f"Chromium did not answer {method} in {timeout} s")
            chunk = os.read(self.from_r, 1 << 20)
            if not chunk:
                raise AssertionError(f"Chromium exited (code {self.proc.poll()}) during {method}")
            self.buf += chunk

    def open_page(self):
        page = next(t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True})["sessionId"]
        self.send("Network.enable")
        self.send("Page.enable")

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        """Poll a JS expression until it is truthy; returns its value."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout} s waiting for {expression}")

    def screenshot(self, path: Path):
        """A full-page PNG."""
        size = self.send("Page.getLayoutMetrics")["cssContentSize"]
        width, height = int(size["width"]), min(int(size["height"]) + 1, 16_000)
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"]))

    def close(self):
        try:
            self.send("Browser.close", timeout=5, session=False)
        except AssertionError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.to_w)
        os.close(self.from_r)


def requests(browser: Chromium) -> list[str]:
    return [e["params"]["request"]["url"] for e in browser.events if e["method"] == "Network.requestWillBeSent"]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                    "(scripts/install.sh installs it when run as root with apt-get)")
def test_swagger_ui_renders_offline_in_chromium(tmp_path):
    port = free_port()
    proc = serve(tmp_path / "data", port, "--no-demo")
    browser = None
    try:
        browser = Chromium(tmp_path / "profile")
        browser.open_page()
        base = f"http://127.0.0.1:{port}"
        started = time.perf_counter()
        browser.send("Page.navigate", {"url": f"{base}/docs"})
        shot = tmp_path / "docs.png"
        try:
            paths = browser.wait_for(
                "(() => { const p = [...document.querySelectorAll('#swagger-ui .opblock-summary-path')]"
                "  .map(e => e.getAttribute('data-path')); return p.length ? p : null })()")
        except AssertionError as e:
            browser.screenshot(shot)
            raise AssertionError(f"{e}; requests: {requests(browser)}; screenshot: {shot}") from None
        rendered = time.perf_counter() - started
        # the spec has been rendered, not just fetched: the operations carry their methods and summaries
        text = browser.evaluate("document.querySelector('#swagger-ui').innerText").replace("\u200b", "")
        browser.screenshot(shot)
        print(f"\n/docs rendered {len(paths)} operations in {rendered:.2f} s; screenshot: {shot}")

        assert EXPECTED <= set(paths), paths
        assert SEARCH in text and "QINCo Search" in text and "POST" in text
        assert browser.evaluate("document.querySelectorAll('.opblock-post').length") >= 5
        requested = requests(browser)
        assert f"{base}/openapi.json" in requested
        assert f"{base}/static-offline-docs/swagger-ui-bundle.js" in requested
        outside = [u for u in requested if not u.startswith((f"{base}/", "data:", "blob:", "about:"))]
        assert not outside, f"the page asked for something beyond the server: {outside}"
        failed = [e["params"] for e in browser.events if e["method"] == "Network.loadingFailed"]
        assert not failed, failed
        assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        if browser is not None:
            browser.close()
        proc.terminate()
        proc.wait(30)
