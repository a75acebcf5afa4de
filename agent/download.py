"""Downloading a bundle over HTTP(S): resumable, bounded in bytes and in time.

:class:`DownloaderInterface` is the seam OTA downloads through, in the style of
python-tuf's ``FetcherInterface``: one abstract method, :meth:`DownloaderInterface._fetch`,
and a public :meth:`~DownloaderInterface.fetch` that checks the URL and the size bound and
turns any unexpected I/O failure into :class:`TransientDownloadError`, so OTA sees only the
two errors it knows how to act on. :class:`HttpDownloader` is the real one; tests plug in
in-memory ones.

Never imports the rest of the agent (it is used by OTA and by the benchmark runner alike).

Public API: :class:`DownloaderInterface`, :class:`HttpDownloader`, :class:`DownloadError`,
:class:`TransientDownloadError`.
"""

from __future__ import annotations

import abc
import http.client
import logging
import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from .errors import AgentError

__all__ = ["DownloaderInterface", "HttpDownloader", "DownloadError", "TransientDownloadError", "Progress", "OnAttempt"]

log = logging.getLogger("lepton_edge.agent.ota")

_CHUNK = 64 * 1024
_MAX_REDIRECTS = 3

Progress = Callable[[int, int], None]
OnAttempt = Callable[[int], None]


class DownloaderInterface(abc.ABC):
    """Fetch ``url`` into ``dest`` until it holds exactly ``size`` bytes (one abstract method)."""

    @abc.abstractmethod
    def _fetch(self, url: str, dest: Path, size: int, *, token: str | None,
               progress: Progress | None, on_attempt: OnAttempt | None) -> int:
        """Do the transfer; return the bytes moved over the network. May raise anything."""

    def fetch(self, url: str, dest: Path, size: int, *, token: str | None = None,
              progress: Progress | None = None, on_attempt: OnAttempt | None = None) -> int:
        """Download until ``dest`` holds exactly ``size`` bytes; returns the bytes transferred over the network.

        Raises only :class:`DownloadError` (final) or :class:`TransientDownloadError` (may pass);
        OTA cancels a download by raising a :class:`DownloadError` from ``progress``/``on_attempt``.
        """
        _check_url(url)
        if size <= 0:
            raise DownloadError(f"a download needs a positive size, not {size}")
        try:
            return self._fetch(url, dest, size, token=token, progress=progress, on_attempt=on_attempt)
        except DownloadError:
            raise
        except OSError as e:
            raise TransientDownloadError(f"cannot write the download to {dest}: {e.strerror or e}") from None


class DownloadError(AgentError):
    """The bundle cannot be downloaded as the command describes it (final: retrying won't help)."""


class TransientDownloadError(DownloadError):
    """The download failed for a reason that may pass (network, timeout, server error)."""


class _RangeRefused(TransientDownloadError):
    """HTTP 416: the partial file does not fit the server's file (it changed, or the part is bad)."""


# ---------------------------------------------------------------------------------------------
# downloading


class HttpDownloader(DownloaderInterface):
    """GET a file into ``dest`` (resuming what is there) with bounds on bytes and time.

    ``io_timeout_s`` bounds connecting and each read; ``deadline_s`` bounds the whole
    download, retries included. Connection failures are retried with a short backoff while
    progress is being made (``max_stalls`` failures in a row without a new byte end it).
    """

    def __init__(self, *, io_timeout_s: float = 30.0, deadline_s: float = 1800.0, max_stalls: int = 5,
                 ca_file: Path | None = None) -> None:
        self.io_timeout_s = io_timeout_s
        self.deadline_s = deadline_s
        self.max_stalls = max_stalls
        self._ssl = ssl.create_default_context()
        if ca_file:
            self._ssl.load_verify_locations(cafile=str(ca_file))

    def _fetch(self, url: str, dest: Path, size: int, *, token: str | None,
               progress: Progress | None, on_attempt: OnAttempt | None) -> int:
        deadline = time.monotonic() + self.deadline_s
        transferred = [0]  # bytes over the network, failed attempts included
        stalls = 0
        while True:
            have = dest.stat().st_size if dest.exists() else 0
            if have > size:
                dest.unlink()
                have = 0
            if have == size:
                return transferred[0]
            if on_attempt:
                on_attempt(have)
            before = have
            try:
                self._attempt(url, dest, have, size, token, deadline, progress, transferred)
            except TransientDownloadError as e:
                now_have = dest.stat().st_size if dest.exists() else 0
                stalls = 0 if now_have > before else stalls + 1
                if stalls >= self.max_stalls:
                    raise TransientDownloadError(f"{e} ({stalls} attempts without progress)") from None
                pause = min(2.0 ** stalls * 0.25, 5.0)
                if time.monotonic() + pause >= deadline:
                    raise TransientDownloadError(f"{e}; the {self.deadline_s:.0f}s download deadline has passed") from None
                log.info("download interrupted at %d of %d bytes (%s); resuming", now_have, size, e)
                time.sleep(pause)

    def _attempt(self, url: str, dest: Path, have: int, size: int, token: str | None, deadline: float,
                 progress: Callable[[int, int], None] | None, transferred: list[int]) -> None:
        headers = {"User-Agent": "lepton-edge-agent", "Accept-Encoding": "identity"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if have:
            headers["Range"] = f"bytes={have}-"
        conn, resp = self._open(url, headers, deadline)
        try:
            try:
                start = self._start_offset(resp, have, size)
            except _RangeRefused:
                dest.unlink(missing_ok=True)
                raise
            if start == 0 and have:
                log.info("server ignored the Range request; downloading from the start")
            length = resp.getheader("Content-Length")
            if length is not None and length.isdigit() and start + int(length) > size:
                raise DownloadError(f"the server offers {start + int(length)} bytes; the command says {size}")
            with open(dest, "r+b" if start else "wb") as f:
                f.seek(start)
                f.truncate()
                pos = start
                while pos < size:
                    if time.monotonic() > deadline:
                        raise TransientDownloadError(f"download deadline of {self.deadline_s:.0f}s passed")
                    try:
                        chunk = resp.read(min(_CHUNK, size - pos))
                    except (OSError, http.client.HTTPException) as e:
                        raise TransientDownloadError(f"connection lost after {pos} of {size} bytes: {e}") from None
                    if not chunk:
                        raise TransientDownloadError(f"connection closed after {pos} of {size} bytes")
                    f.write(chunk)
                    pos += len(chunk)
                    transferred[0] += len(chunk)
                    if progress:
                        progress(pos, size)
                f.flush()
                os.fsync(f.fileno())
            # Whatever the server still has for us beyond the announced size is refused unread
            # (the connection is closed, not drained).
        finally:
            conn.close()

    def _start_offset(self, resp: http.client.HTTPResponse, have: int, size: int) -> int:
        if resp.status == 200:
            return 0
        if resp.status == 206:
            first, total = _content_range(resp.getheader("Content-Range", ""))
            if first != have:
                raise TransientDownloadError(f"server resumed at byte {first}, not at {have}")
            if total is not None and total != size:
                raise DownloadError(f"the server's file is {total} bytes; the command says {size}")
            return have
        if resp.status == 416:
            raise _RangeRefused("server refused the resume range; the partial file was discarded")
        if 500 <= resp.status < 600 or resp.status in (408, 429):
            raise TransientDownloadError(f"server answered HTTP {resp.status} {resp.reason}")
        raise DownloadError(f"server answered HTTP {resp.status} {resp.reason}")

    def _open(self, url: str, headers: dict[str, str], deadline: float) -> tuple[http.client.HTTPConnection, Any]:
        first_host = urlsplit(url).netloc
        for _ in range(_MAX_REDIRECTS + 1):
            parts = _check_url(url)
            timeout = max(0.1, min(self.io_timeout_s, deadline - time.monotonic()))
            if parts.scheme == "https":
                conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                    parts.hostname, parts.port, timeout=timeout, context=self._ssl)
            else:
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            try:
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                raise TransientDownloadError(f"cannot fetch {_redact(url)}: {e}") from None
            if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                target = urljoin(url, resp.getheader("Location"))
                conn.close()
                if parts.scheme == "https" and urlsplit(target).scheme != "https":
                    raise DownloadError(f"{_redact(url)} redirects from https to plain http; refused")
                if urlsplit(target).netloc != first_host:
                    headers = {k: v for k, v in headers.items() if k != "Authorization"}
                url = target
                continue
            return conn, resp
        raise DownloadError(f"more than {_MAX_REDIRECTS} redirects from {_redact(url)}")


def _check_url(url: str):
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DownloadError(f"download URL must be http(s)://host/..., got {_redact(url)!r}")
    try:
        parts.port
    except ValueError:
        raise DownloadError(f"download URL has a bad port: {_redact(url)!r}") from None
    return parts


def _redact(url: str) -> str:
    # Never put a query string (it may hold a token) into events or logs.
    return url.split("?", 1)[0][:200]


def _content_range(value: str) -> tuple[int | None, int | None]:
    """``bytes first-last/total`` → (first, total); (None, None) when unparsable."""
    try:
        unit, _, rest = value.strip().partition(" ")
        span, _, total = rest.partition("/")
        first = int(span.split("-", 1)[0])
        return (first, None if total.strip() == "*" else int(total)) if unit == "bytes" else (None, None)
    except ValueError:
        return None, None
