"""The search page in headless Chromium (Debian's): type a query, submit, read the results, screenshot.

Chromium is driven over the DevTools protocol (websocket-client): keystrokes go to the query
box as a user's would, Enter submits the form, and the results are read from the rendered DOM.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from research_pipeline_tests.shared import (
    API_GROUP,
    HOSTILE_TITLE,
    HOSTILE_WORD,
    running_service,
)

pytestmark = [API_GROUP, pytest.mark.slow, pytest.mark.integration]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class DevTools:
    """One page target of a headless Chromium, spoken to over the DevTools websocket."""

    def __init__(self, ws_url: str):
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self._id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params):
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_event(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        for i, ev in enumerate(self.events):
            if ev.get("method") == method:
                return self.events.pop(i)
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv())
            if msg.get("method") == method:
                return msg
            self.events.append(msg)
        raise TimeoutError(method)

    def js(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_js(self, expression: str, expected, timeout: float = 10):
        """The value of `expression` once it equals `expected`, polled for at most `timeout` s
        (the last value seen otherwise): the browser applies some state (autofocus) in a
        rendering step after the load event."""
        deadline = time.monotonic() + timeout
        value = self.js(expression)
        while value != expected and time.monotonic() < deadline:
            time.sleep(0.05)
            value = self.js(expression)
        return value

    def key(self, key: str, code: str, vk: int, text: str | None = None) -> None:
        down = {"type": "keyDown", "key": key, "code": code, "windowsVirtualKeyCode": vk}
        if text:
            down["text"] = text
        self.call("Input.dispatchKeyEvent", **down)
        self.call("Input.dispatchKeyEvent", type="keyUp", key=key, code=code, windowsVirtualKeyCode=vk)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def chromium(tmp_path):
    if CHROMIUM is None:
        pytest.fail("Debian's chromium is not installed: apt-get install -y chromium")
    port = _free_port()
    proc = subprocess.Popen(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-extensions", "--disable-background-networking", f"--remote-debugging-port={port}",
         "--remote-allow-origins=*", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1000",
         "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "chromium exited at start"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as resp:
                    pages = [t for t in json.loads(resp.read()) if t["type"] == "page"]
                if pages:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "chromium's DevTools endpoint did not come up"
            time.sleep(0.2)
        tools = DevTools(pages[0]["webSocketDebuggerUrl"])
        yield tools
        tools.ws.close()
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_researcher_types_a_query_and_reads_the_results(deployment, chromium, tmp_path):
    settings, facts = deployment
    if facts["backend"] != "sqlite":
        pytest.skip("the page does not depend on the database backend")
    with running_service(settings) as svc:
        page = chromium
        page.call("Page.enable")
        # A headless window never has the OS focus; emulate a focused page, as a user's tab is.
        page.call("Emulation.setFocusEmulationEnabled", enabled=True)
        page.call("Page.navigate", url=f"http://127.0.0.1:{svc.port}/")
        page.wait_event("Page.loadEventFired")
        assert page.wait_js("document.activeElement.id", "q") == "q", "the query box has the focus"
        typed = f"{HOSTILE_WORD} confusion matrix"
        for ch in typed:
            page.key(ch, "Space" if ch == " " else f"Key{ch.upper()}", 32 if ch == " " else ord(ch.upper()), ch)
        assert page.js("document.getElementById('q').value") == typed
        page.key("Enter", "Enter", 13, "\r")
        page.wait_event("Page.loadEventFired")
        url = page.js("location.href")
        assert f"q={HOSTILE_WORD}+confusion+matrix" in url
        results = page.js(
            "[...document.querySelectorAll('li.paper')].map(li => ({id: li.dataset.docId,"
            " title: li.querySelector('.title').textContent, marks: [...li.querySelectorAll('mark')]"
            ".map(m => m.textContent.toLowerCase()), pdf: li.querySelector('a.pdf') && li.querySelector('a.pdf').href}))"
        )
        shot = base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"])
        out = Path(tmp_path / "search_page.png")
        out.write_bytes(shot)
        assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 10_000

        assert results and results[0]["id"] == facts["pycm"]
        assert HOSTILE_TITLE in results[0]["title"], "the hostile title is text on the page"
        assert {HOSTILE_WORD, "confusion", "matrix"} <= set(results[0]["marks"])
        assert "<img src=x onerror=alert(2)>" in page.js("document.querySelector('li.paper .snippet').textContent")
        assert page.js("document.querySelectorAll('script, img').length") == 0
        assert page.js("typeof window.__xss") == "undefined"
        assert results[0]["pdf"].endswith(f"/papers/{facts['pycm']}.pdf#page=1")
        status, _, body = svc.get(results[0]["pdf"].split(str(svc.port), 1)[1].split("#")[0])
        assert status == 200 and body[:5] == b"%PDF-"
