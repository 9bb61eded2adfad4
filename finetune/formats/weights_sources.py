"""Turning a weights string into a local folder: a folder, a local archive, an http(s) URL of an
archive, or a base64 data: URI.

`COG_WEIGHTS` and the `lora_weights` input are raw strings that strangers may fill in. Downloads
are bounded in bytes, in time without new bytes and in time in all (a watchdog thread shuts a
socket that drips), can be cancelled, and land in a private work folder; the archive they bring
is extracted by `archives.safe_extract`. Every message that names a source shows it through
`redact`, so signed URLs' tokens and data: payloads are never echoed.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import requests
import urllib3

from ..errors import UserError
from .archives import ACCEPTED_ARCHIVES, DEFAULT_LIMITS, Limits, content_root, format_bytes, safe_extract

ACCEPTED_SOURCES = (
    f"a local folder, a local archive ({ACCEPTED_ARCHIVES}), an http:// or https:// URL of such an "
    "archive, or a base64 data: URI (data:application/x-tar;base64,...)"
)

_CHUNK = 1 << 20  # bytes of a download written at a time
_B64_CHUNK = 4 << 20  # a multiple of 4, so every chunk decodes on its own
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):")  # two letters or more: "C:" is a drive, not a scheme
_MEDIA_TYPE = re.compile(r"[\w.+-]{1,60}/[\w.+-]{1,60}")
_SHOWN_CHARS = 200  # how much of a source a message may show
_SHOWN_SCHEME_CHARS = 16  # real schemes are short; a long "scheme" may be a pasted secret


class WeightsSourceError(UserError, ValueError):
    """A weights string cannot be turned into a local folder; the message lists the accepted forms."""


class DownloadStopped(WeightsSourceError):
    """The download was cancelled by its caller."""


def materialize(
    source: str,
    workdir: Path,
    limits: Limits = DEFAULT_LIMITS,
    *,
    allow_local: bool = True,
    cancel: threading.Event | None = None,
) -> Path:
    """Turn a weights string (`COG_WEIGHTS`, a `lora_weights` input) into a local folder.

    A local folder is returned as is; a local archive, a downloaded http(s) URL or a base64 data:
    URI is extracted into a new folder under `workdir`. A URL's extraction is reused by later calls
    with the same URL (keyed by its sha256), so repeated requests do not download again.
    `allow_local=False` refuses local paths, for inputs that strangers fill in. Setting `cancel`
    stops a download within a moment (DownloadStopped), as does `limits.deadline_s`.
    """
    text = source.strip()
    workdir = Path(workdir)
    if not text:
        raise WeightsSourceError(f"no weights given; pass {ACCEPTED_SOURCES}")
    match = _SCHEME.match(text)
    scheme = match.group(1).lower() if match else ""
    if scheme in ("http", "https"):
        return _from_url(text, workdir, limits, cancel or threading.Event())
    if scheme == "data":
        return _from_data_uri(text, workdir, limits)
    if scheme:
        shown = f"'{scheme}:'" if len(scheme) <= _SHOWN_SCHEME_CHARS else "unknown"
        raise WeightsSourceError(
            f"weights from {shown} sources are not supported; pass {ACCEPTED_SOURCES} "
            "(write a local path that contains ':' as ./path)"
        )
    if not allow_local:
        raise WeightsSourceError(
            "local paths are not accepted here; pass an http(s):// URL or a base64 data: URI"
        )
    path = Path(text)
    if path.is_dir():
        return path
    if path.is_file():
        return _extract_fresh(path, workdir, limits)
    problem = "is neither a folder nor a regular file" if path.exists() else "does not exist"
    raise WeightsSourceError(f"weights path {redact(text)!r} {problem}; pass {ACCEPTED_SOURCES}")


def _extract_fresh(archive: Path, workdir: Path, limits: Limits) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    dest = Path(tempfile.mkdtemp(prefix="weights-", dir=workdir))
    try:
        return safe_extract(archive, dest, limits)
    except BaseException:
        dest.rmdir()  # still the empty folder made above: safe_extract leaves dest untouched on failure
        raise


def _from_url(url: str, workdir: Path, limits: Limits, cancel: threading.Event) -> Path:
    cached = workdir / f"url-{hashlib.sha256(url.encode()).hexdigest()}"
    if cached.is_dir():  # complete: safe_extract only ever renames a finished folder into place
        return content_root(cached)
    workdir.mkdir(parents=True, exist_ok=True)
    archive = _download(url, workdir, limits, cancel)
    try:
        return safe_extract(archive, cached, limits)
    except FileExistsError:  # a concurrent call for the same URL finished first
        return content_root(cached)
    finally:
        archive.unlink(missing_ok=True)


class _Watchdog:
    """Ends a download that runs past its deadline or is cancelled. A blocked read cannot see a flag,
    and a server that drips one byte a minute never trips the read timeout, so a thread shuts the
    socket (urllib3's HTTPResponse.shutdown), which makes the read return at once."""

    def __init__(self, deadline: float, cancel: threading.Event) -> None:
        self.deadline = deadline
        self.cancel = cancel
        self.reason: str | None = None
        self._resp: urllib3.response.HTTPResponse | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="download-watchdog", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._done.wait(0.05):
            if self.cancel.is_set():
                self.reason = "cancelled"
            elif time.monotonic() > self.deadline:
                self.reason = "deadline"
            else:
                continue
            resp = self._resp
            if resp is not None:
                with contextlib.suppress(Exception):  # already closed or released: nothing to stop
                    resp.shutdown()
            return

    def watch(self, resp: urllib3.response.HTTPResponse) -> None:
        self._resp = resp
        if self.reason is not None:  # fired while the headers were on their way
            with contextlib.suppress(Exception):
                resp.shutdown()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def _download(url: str, workdir: Path, limits: Limits, cancel: threading.Event) -> Path:
    shown = redact(url)
    started = time.monotonic()
    deadline = started + limits.deadline_s
    watchdog = _Watchdog(deadline, cancel)
    try:
        return _fetch(url, shown, workdir, limits, watchdog)
    except BaseException as e:
        # What the shut socket raised is only the symptom; say why the download ended.
        if watchdog.reason == "cancelled":
            raise DownloadStopped(f"downloading {shown} was cancelled") from None
        if watchdog.reason == "deadline" or time.monotonic() > deadline:
            raise WeightsSourceError(
                f"downloading {shown} took longer than {limits.deadline_s:g} s in all; "
                "host the file somewhere faster or use a smaller archive"
            ) from None
        raise e
    finally:
        watchdog.stop()


def _fetch(url: str, shown: str, workdir: Path, limits: Limits, watchdog: _Watchdog) -> Path:
    cap = limits.max_download_bytes
    too_big = f"{shown} is larger than the download limit of {format_bytes(cap)}; use a smaller archive"
    fd, tmp_name = tempfile.mkstemp(prefix=".download-", suffix=".part", dir=workdir)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with requests.get(
                    url,
                    stream=True,
                    # The headers' wait is bounded by the read timeout, and by the deadline.
                    timeout=(limits.timeout_s, min(limits.timeout_s, limits.deadline_s)),
                    # Identity keeps Content-Length equal to the bytes we will store.
                    headers={"Accept-Encoding": "identity"},
                ) as resp:
                    watchdog.watch(resp.raw)
                    if resp.status_code != 200:
                        phrase = http.client.responses.get(resp.status_code, "")
                        raise WeightsSourceError(
                            f"downloading {shown} failed with HTTP {resp.status_code} {phrase}".rstrip()
                            + "; check that the URL is right and publicly readable"
                        )
                    declared = resp.headers.get("Content-Length", "")
                    if declared.isdigit() and int(declared) > cap:
                        raise WeightsSourceError(too_big)
                    size = 0
                    for chunk in resp.iter_content(_CHUNK):
                        if watchdog.reason is not None:
                            raise WeightsSourceError("download stopped")  # replaced in _download
                        size += len(chunk)
                        if size > cap:
                            raise WeightsSourceError(too_big)
                        out.write(chunk)
            # `from None` throughout: requests' messages repeat the full URL, secrets included.
            except requests.RequestException as e:
                if _timed_out(e):
                    raise WeightsSourceError(
                        f"downloading {shown} timed out (nothing received for {limits.timeout_s:g} s); "
                        "check that the host is reachable, or host the file somewhere faster"
                    ) from None
                raise WeightsSourceError(
                    f"could not download {shown} ({type(e).__name__}); check the URL"
                ) from None
        if watchdog.reason is not None:  # the shut socket can look like a clean end of the body
            raise WeightsSourceError("download stopped")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _timed_out(e: requests.RequestException) -> bool:
    # A stall before the headers raises requests.Timeout; a stall in the body raises a plain
    # ConnectionError wrapping urllib3's ReadTimeoutError.
    return isinstance(e, requests.Timeout) or any(
        isinstance(a, urllib3.exceptions.ReadTimeoutError) for a in e.args
    )


def redact(source: str) -> str:
    """A weights source as a message or a log may show it. A URL loses its user info, query and
    fragment, which may hold passwords, tokens or signatures (a removed query or fragment is marked
    "?..." or "#..."); a data: URI is shown as its media type and size, never its payload; anything
    else, such as a local path, is kept. All are cut to 200 characters. Never raises, whatever the
    string, so any error path may use it."""
    text = source.strip()
    match = _SCHEME.match(text)
    scheme = match.group(1).lower() if match else ""
    if scheme == "data":
        return _redact_data_uri(text)
    if scheme:
        return _shorten(_redact_url(text, scheme))
    return _shorten(source)


def _redact_url(url: str, scheme: str) -> str:
    hidden = f"{scheme}://..." if url[len(scheme) + 1 :].startswith("//") else f"{scheme}:..."
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed "[" of an IPv6 host
        return hidden
    host = parts.netloc.rpartition("@")[2]
    # A password holding an unencoded "/", "?" or "#" ends the host part early: pieces of it then
    # parse as host and path, and its "@" comes later. Any "@" after the host part may be that one,
    # so only the scheme is shown then (signed URLs encode theirs as %40).
    if "@" in parts.path + parts.query + parts.fragment:
        return hidden
    shown = urlunsplit((parts.scheme, host, parts.path, "", ""))
    return shown + ("?..." if parts.query else "") + ("#..." if parts.fragment else "")


def _redact_data_uri(uri: str) -> str:
    header, comma, payload = uri[len("data:") :].partition(",")
    if not comma:  # no header: what follows "data:" may be the payload itself
        header, payload = "", header
    params = [p.strip() for p in header.split(";")]
    media = params[0] if _MEDIA_TYPE.fullmatch(params[0]) else ""
    encoded = len(params) > 1 and params[-1].lower() == "base64"
    chars = len(payload) - sum(map(payload.count, " \t\r\n"))  # encoders often wrap base64 lines
    size = max(0, chars // 4 * 3 - payload.rstrip()[-2:].count("=")) if encoded else chars
    return f"data:{media}{';base64' if encoded else ''},... ({format_bytes(size)})"


def _shorten(text: str) -> str:
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _from_data_uri(uri: str, workdir: Path, limits: Limits) -> Path:
    header, comma, payload = uri[len("data:") :].partition(",")
    if not comma or header.rsplit(";", 1)[-1].strip().lower() != "base64":
        raise WeightsSourceError("data: URIs must be base64-encoded, e.g. data:application/x-tar;base64,...")
    payload = "".join(payload.split())  # encoders often wrap base64 lines
    size = len(payload) // 4 * 3 - payload[-2:].count("=")
    cap = limits.max_download_bytes
    if size > cap:
        raise WeightsSourceError(
            f"the data: URI holds {format_bytes(size)}, more than the limit of {format_bytes(cap)}; "
            "pass a URL to the archive instead"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".data-uri-", suffix=".archive", dir=workdir)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                for start in range(0, len(payload), _B64_CHUNK):
                    out.write(base64.b64decode(payload[start : start + _B64_CHUNK], validate=True))
            except ValueError:  # binascii.Error, or non-ASCII text
                raise WeightsSourceError(
                    "the data: URI is not valid base64; encode the archive again"
                ) from None
        return _extract_fresh(tmp, workdir, limits)
    finally:
        tmp.unlink(missing_ok=True)
