"""Headless Chromium driven over the Chrome DevTools Protocol (the `websockets` client we
already have): enough to load a page, click (in the DOM or with the real mouse), read the
DOM, see what the page asked the network for, and take a screenshot."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import tempfile
from typing import Any

import httpx
import websockets

from gql_service.cli.embedded_redis import free_port

from .service import wait_until

# Without the background-networking flags Chromium keeps dialling out, which this closed
# network refuses; --no-sandbox because the tests may run as root.
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1280,900",
)  # fmt: skip


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError("no Chromium: ./scripts/test installs Debian's chromium package when run as root")


class Browser:
    def __init__(self) -> None:
        self.port = free_port()
        self.profile = tempfile.mkdtemp(prefix="gqls-chromium-")
        self.process = subprocess.Popen(
            [chromium_binary(), *FLAGS, f"--user-data-dir={self.profile}", f"--remote-debugging-port={self.port}",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self._ids = itertools.count(1)
        self.ws: Any = None
        # Every event Chromium sent (after `send("Network.enable")`, its requests too).
        self.events: list[dict[str, Any]] = []

    async def __aenter__(self) -> Browser:
        def page_target() -> bool:
            try:
                targets = httpx.get(f"http://127.0.0.1:{self.port}/json/list", timeout=1).json()
            except httpx.HTTPError:
                return False
            self._target = next((t for t in targets if t["type"] == "page"), None)
            return self._target is not None

        await asyncio.to_thread(wait_until, page_target, timeout_s=30, what="Chromium's DevTools")
        self.ws = await websockets.connect(self._target["webSocketDebuggerUrl"], max_size=None)
        await self.send("Page.enable")
        await self.send("Runtime.enable")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.ws is not None:
            await self.ws.close()
        self.process.terminate()
        self.process.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        await self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(await self.ws.recv())
            if "method" in message:
                self.events.append(message)
            elif message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return dict(message.get("result", {}))

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.until("document.readyState === 'complete'")

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    async def until(self, expression: str, timeout_s: float = 20.0) -> Any:
        """Wait for a condition in the page (the page's state is only observable by asking)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not (value := await self.evaluate(expression)):
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"page never satisfied: {expression}")
            await asyncio.sleep(0.05)
        return value

    async def click(self, selector: str, text: str | None = None) -> None:
        """A real mouse click in the middle of the element (the first matching `selector`,
        with exactly `text` when given): menus that open on pointer events open. Like a
        user, it waits until nothing covers the element (a tooltip over a menu item)."""
        find = (
            f"[...document.querySelectorAll({json.dumps(selector)})]"
            f".find(e => {json.dumps(text)} === null || e.textContent.trim() === {json.dumps(text)})"
        )
        center = (
            f"(() => {{ const e = {find}, r = e?.getBoundingClientRect();"
            " return r && r.width ? {x: r.x + r.width / 2, y: r.y + r.height / 2} : null; })()"
        )
        box = await self.until(center)
        await self.send("Input.dispatchMouseEvent", type="mouseMoved", x=box["x"], y=box["y"])
        box = await self.until(
            f"(() => {{ const e = {find}, c = {center}; if (!c) return null;"
            " const top = document.elementFromPoint(c.x, c.y); return top && e.contains(top) ? c : null; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=box["x"], y=box["y"], button="left", clickCount=1)

    def requested_urls(self) -> list[str]:
        """Every URL the page asked for, websockets included (needs Network.enable)."""
        kinds = {"Network.requestWillBeSent": "request", "Network.webSocketCreated": None}
        urls = []
        for event in self.events:
            if event["method"] in kinds:
                params = event["params"]
                urls.append(params["request"]["url"] if kinds[event["method"]] else params["url"])
        return urls

    async def screenshot(self) -> bytes:
        return base64.b64decode((await self.send("Page.captureScreenshot", format="png"))["data"])
