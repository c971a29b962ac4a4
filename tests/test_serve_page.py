"""The page at `/` in headless Chromium against a live server: a document picked in the file input is uploaded into
a memory, listed, and a pass-key question over it is answered with streamed text, token counts and timings.
Skipped where Chromium (Debian's `chromium`) or the websockets client (Chrome DevTools Protocol) is absent."""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import subprocess
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
sync_client = pytest.importorskip("websockets.sync.client")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
if CHROMIUM is None:
    pytest.skip("no chromium on this machine (apt-get install chromium)", allow_module_level=True)

from test_serve import KEY, QUESTION, Server  # noqa: E402

from longllama.cli import SHIPPED_MODEL  # noqa: E402
from longllama.evals import passkey  # noqa: E402
from longllama.tokenizer import load_tokenizer  # noqa: E402


class Browser:
    """Headless Chromium driven through the DevTools protocol: `js(expression)` evaluates in the page."""

    def __init__(self, profile):
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert time.monotonic() < deadline and self.proc.poll() is None, "chromium did not start"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(t for t in targets if t["type"] == "page")
        self._open = contextlib.ExitStack()
        self.ws = self._open.enter_context(sync_client.connect(page["webSocketDebuggerUrl"], max_size=None))
        self._ids = itertools.count(1)

    def send(self, method: str, **params) -> dict:
        ident = next(self._ids)
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == ident:
                assert "error" not in message, message
                return message["result"]

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}")

    def close(self) -> None:
        self._open.close()
        self.proc.terminate()
        self.proc.wait(timeout=10)


def test_the_page_uploads_a_document_and_answers_over_it(tmp_path):
    tokenizer = load_tokenizer(SHIPPED_MODEL)
    prompt, key = passkey.passkey_prompt(passkey.n_garbage_for_tokens(tokenizer, 4096, seed=0), 5)
    document = prompt[: -len(QUESTION)]
    server = Server(tmp_path / "memories")
    browser = Browser(tmp_path / "profile")
    try:
        page = httpx.get(server.url + "/")
        assert page.status_code == 200 and "<script>" in page.text
        assert "http://" not in page.text and "https://" not in page.text  # no external assets
        browser.send("Page.navigate", url=server.url + "/")
        browser.wait("document.readyState === 'complete' && document.getElementById('model').textContent === 'small'")
        browser.js(
            f"""const key = document.getElementById("key"); key.value = {json.dumps(KEY)};
            key.dispatchEvent(new Event("change"));
            document.getElementById("template").value = "none";
            const files = new DataTransfer();
            files.items.add(new File([{json.dumps(document)}], "haystack.txt", {{type: "text/plain"}}));
            const input = document.getElementById("file"); input.files = files.files;
            input.dispatchEvent(new Event("change"));"""
        )
        status = browser.wait("/tokens in/.test(document.getElementById('status').textContent) && "
                              "document.getElementById('status').textContent")  # fmt: skip
        listed = server.http("GET", "/v1/memories").json()["data"]
        assert len(listed) == 1 and f"{listed[0]['tokens']} tokens" in status
        browser.wait("document.querySelectorAll('#memories li.current').length === 1")

        browser.js(
            f"""document.getElementById("question").value = {json.dumps(QUESTION)};
            document.getElementById("send").click();"""
        )
        browser.wait("document.querySelector('.a') && document.querySelector('.a').dataset.done === '1'")
        answer = browser.js("document.querySelector('.a').textContent")
        assert answer.strip().startswith(str(key)), (key, answer)
        stats = browser.js("document.getElementById('stats').textContent")
        assert f"({listed[0]['tokens']} from memory)" in stats and "tokens/s" in stats, stats
    finally:
        browser.close()
        server.stop()
