"""A real browser for the tests: Debian's headless Chromium, every request it makes to anywhere
but 127.0.0.1 sent to a recording proxy on 127.0.0.1 that answers none of them."""

from __future__ import annotations

import contextlib
import http.server
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_SECONDS = 90


# Chromium's own services (updates, time, accounts), which it calls whatever the page: the
# proxy refuses them too, but they say nothing about the page.
BROWSER_SERVICES = re.compile(
    r"^(CONNECT |\w+ https?://)[\w.-]*(google\.com|googleapis\.com|gvt1\.com)\b"
)


@dataclass
class Recorder:
    """The requests the browser tried to send off the machine."""

    port: int = 0
    requests: list[str] = field(default_factory=list)

    def from_pages(self) -> list[str]:
        """Return the requests that pages made, Chromium's own service calls left out."""
        return [r for r in self.requests if not BROWSER_SERVICES.match(r)]


class _Refuse(http.server.BaseHTTPRequestHandler):
    recorder: Recorder

    def _refuse(self) -> None:
        self.recorder.requests.append(f"{self.command} {self.path}")
        self.send_error(403, "tests allow no traffic off loopback")

    do_GET = do_POST = do_HEAD = do_CONNECT = _refuse  # noqa: N815  (http.server's names)

    def log_message(self, *args: object) -> None:  # quiet
        pass


@contextlib.contextmanager
def recording_proxy() -> Iterator[Recorder]:
    """Yield a Recorder whose proxy on 127.0.0.1 logs and refuses every request."""
    recorder = Recorder()
    handler = type("Refuse", (_Refuse,), {"recorder": recorder})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    recorder.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield recorder
    finally:
        server.shutdown()
        server.server_close()


def chromium(url: str, proxy_port: int, *extra: str, budget_ms: int = 5000) -> str:
    """Return the DOM of `url` after `budget_ms` of virtual time in headless Chromium, every
    request off 127.0.0.1 sent to the proxy at `proxy_port`."""
    assert CHROMIUM, "Debian's chromium is needed (.ci/run installs it)"
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",  # tests run as root
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                f"--user-data-dir={profile}",
                f"--proxy-server=127.0.0.1:{proxy_port}",
                f"--virtual-time-budget={budget_ms}",
                *extra,
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=BROWSER_SECONDS,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def file_url(path: Path) -> str:
    """Return the file:// URL of a path."""
    return path.resolve().as_uri()
