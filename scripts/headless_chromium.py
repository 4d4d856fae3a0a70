"""Drive headless Chromium over the DevTools protocol on a pipe: no Python dependency.

`chromium --remote-debugging-pipe` reads protocol commands from file descriptor 3 and writes
replies and events to descriptor 4, each message one JSON object ended by a NUL byte (what
Puppeteer's pipe transport does). That is all the dashboard test and `dashboard_shot.py` need:
open a page, evaluate JavaScript in it, take a PNG screenshot.

    with HeadlessChromium() as browser:
        browser.open("http://127.0.0.1:8000/dashboard")
        rows = browser.evaluate("document.querySelectorAll('tr[data-request-id]').length")
        png = browser.screenshot()
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_chromium() -> str | None:
    """Path of a Chromium binary on PATH (Debian's package is `chromium`), or None."""
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


def _move_above_4(fd: int) -> int:
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 5)
    os.close(fd)
    return moved


class HeadlessChromium:
    def __init__(self, *, width: int = 1400, height: int = 900, timeout_s: float = 30.0) -> None:
        binary = find_chromium()
        if binary is None:
            raise RuntimeError("no chromium on PATH (Debian: apt-get install -y chromium)")
        self.timeout_s = timeout_s
        self._profile = tempfile.TemporaryDirectory(prefix="tfjax-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # Above fd 4, so that the redirections below cannot overwrite one with the other.
        to_browser_r, from_browser_w = (_move_above_4(fd) for fd in (to_browser_r, from_browser_w))

        # The browser must see its pipe ends as fds 3 and 4. A shell sets that up rather than a
        # preexec_fn, which would make subprocess fork the (multithreaded, JAX-running) caller.
        command = [
            "bash",  # dash cannot redirect from fds above 9
            "-c",
            f'exec "$0" "$@" 3<&{to_browser_r} 4>&{from_browser_w}',
            binary,
            "--headless",
            "--remote-debugging-pipe",
            "--no-sandbox",  # containers run as root
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={self._profile.name}",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        self._proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(to_browser_r, from_browser_w),
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._next_id = 0
        self._buffer = b""
        self._session: str | None = None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        attached = self.call("Target.attachToTarget", targetId=target, flatten=True)
        self._session = attached["sessionId"]  # from now on commands go to that page
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)  # fmt: skip

    def __enter__(self) -> HeadlessChromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        for fd in (self._to_browser, self._from_browser):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._profile.cleanup()

    # -- page commands -------------------------------------------------------------------

    def open(self, url: str) -> None:
        """Navigate and wait for the load event."""
        self.call("Page.navigate", url=url)
        self._wait_event("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page (promises are awaited)."""
        reply = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in reply:
            raise RuntimeError(f"JavaScript failed: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float, interval_s: float = 0.1) -> Any:
        """Poll `expression` until it is truthy; return its value (fail after `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        while not (value := self.evaluate(expression)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression!r} stayed falsy for {timeout_s} s")
            time.sleep(interval_s)
        return value

    def screenshot(self) -> bytes:
        """A PNG of the whole page."""
        height = self.evaluate("document.documentElement.scrollHeight")
        width = self.evaluate("document.documentElement.scrollWidth")
        clip = {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}
        reply = self.call("Page.captureScreenshot", format="png", clip=clip,
                          captureBeyondViewport=True)  # fmt: skip
        return base64.b64decode(reply["data"])

    # -- protocol ------------------------------------------------------------------------

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send a command (to the page once attached) and return its result."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if self._session is not None:
            message["sessionId"] = self._session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _wait_event(self, name: str) -> dict[str, Any]:
        while True:
            message = self._read()
            if message.get("method") == name:
                return message.get("params", {})

    def _read(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout_s
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._from_browser], [], [], max(0.0, left))
            if not ready:
                raise TimeoutError(f"chromium sent nothing for {self.timeout_s} s")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium exited (code {self._proc.poll()})")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)
