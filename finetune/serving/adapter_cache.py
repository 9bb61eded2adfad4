"""The per-request adapters a server keeps loaded: an LRU cache keyed by the adapter's source, as
vLLM's LRU adapter manager keeps LoRA adapters beside one base model.

A request's `lora_weights` is downloaded and extracted into the server's work folder on the request's
own thread (the engine keeps decoding other requests meanwhile), then handed to the server to load
into the model. Requests for an adapter that another request is loading wait for that load instead of
starting their own. An adapter counts its users (queued or running requests) and is never evicted
while it has one; when a request ends, the least recently used idle adapters over ADAPTER_CACHE_SIZE
leave, with their files. Distinct adapters in use at once (loaded or loading) are bounded by
MAX_ADAPTERS_IN_USE: each holds memory and a download.

The model side (attaching, merging, deleting an adapter from the model) is the server's
(server.py); this module only decides what is loaded and what leaves."""

from __future__ import annotations

import hashlib
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path

from ..data import prompts
from ..engine.requests import GenerationError
from ..formats.archives import Limits
from ..formats.weights_sources import DownloadStopped, materialize
from ..settings import ADAPTERS_IN_USE_ENV, ServeSettings
from .compute_thread import POLL_S

# An adapter is megabytes (a few GB for r=64 on all layers of a 70B); a request gets tighter
# limits than the operator's COG_WEIGHTS.
REQUEST_LIMITS = Limits(
    max_files=64,
    max_total_bytes=4 * 2**30,
    max_file_bytes=4 * 2**30,
    max_download_bytes=4 * 2**30,
    deadline_s=ServeSettings.download_deadline_s,  # LORA_DOWNLOAD_DEADLINE_S changes it
)


@dataclass(eq=False)
class LoadedAdapter:
    name: str
    folder: Path
    template: prompts.PromptTemplate | None
    users: int = 0  # queued or running requests; an adapter in use is never evicted


# Loads an extracted folder into the model under a name (the server's compute thread):
# (folder, name, source) -> the loaded adapter; raises, having removed the folder, if refused.
Loader = Callable[[Path, str, str], LoadedAdapter]


def normalise_source(source: str) -> str:
    """One spelling per adapter source: surrounding spaces dropped, a URL's scheme and host in lower
    case (the rest of a URL is case-sensitive), a local path made absolute."""
    source = source.strip()
    scheme, sep, rest = source.partition("://")
    if sep and scheme.lower() in ("http", "https"):
        host, slash, path = rest.partition("/")
        return f"{scheme.lower()}://{host.lower()}{slash}{path}"
    if source.startswith("data:"):
        return source
    return str(Path(source).expanduser().resolve())


def adapter_key(source: str) -> str:
    """The cache key (and PEFT adapter name) of a normalised source: its whole SHA-256, so that no two
    sources can share one by chance or by design."""
    return "a" + hashlib.sha256(source.encode()).hexdigest()


def remove_files(workdir: Path, folder: Path) -> None:
    """Remove an adapter's files if they are a download under `workdir` (never an operator's folder)."""
    if workdir in folder.parents:
        # The top folder materialize() created under workdir (an archive may nest one more level).
        shutil.rmtree(workdir / folder.relative_to(workdir).parts[0], ignore_errors=True)


class AdapterCache:
    """Per-request adapters by source: `acquire` on a request's thread, `release` when it ends."""

    def __init__(self, workdir: Path, settings: ServeSettings, load: Loader) -> None:
        self.workdir = workdir
        self.capacity = settings.adapter_cache_size
        self.in_use_limit = settings.adapters_in_use
        self.limits = replace(REQUEST_LIMITS, deadline_s=settings.download_deadline_s)
        # COG_WEIGHTS is the operator's choice; a per-request path would let any caller probe the
        # server's disk, so requests may only send URLs and data URIs unless the operator opts in.
        self.allow_local = settings.allow_local_lora_weights
        self._load = load
        self.loaded: OrderedDict[str, LoadedAdapter] = OrderedDict()  # least recently used first
        self._loading: dict[str, Future[LoadedAdapter]] = {}
        self._lock = threading.Lock()  # loaded, _loading and users, shared by request threads

    def acquire(self, source: str, cancel: threading.Event) -> LoadedAdapter:
        """The adapter at `source`, loaded and counted as in use. `cancel` stops its download, or
        this request's wait for another request's download of the same adapter."""
        source = normalise_source(source)
        key = adapter_key(source)
        while True:
            with self._lock:
                if key in self.loaded:
                    self.loaded.move_to_end(key)
                    self.loaded[key].users += 1
                    return self.loaded[key]
                pending = self._loading.get(key)
                if pending is None:
                    self._check_room()
                    self._loading[key] = mine = Future()
            if pending is None:
                return self._fetch(source, key, cancel, mine)
            # Another request is loading the same adapter: take it from the cache once loaded. If that
            # request was cancelled, its download stopped, and this one starts its own.
            while not pending.done():
                if cancel.is_set():
                    raise DownloadStopped("the request was cancelled while its adapter was loading")
                futures.wait([pending], timeout=POLL_S)
            if not isinstance(pending.exception(), DownloadStopped):
                pending.result()  # that load failed: the same source fails this request too

    def _check_room(self) -> None:
        in_use = sum(a.users > 0 for a in self.loaded.values()) + len(self._loading)
        if in_use >= self.in_use_limit:
            raise GenerationError(
                f"the server is serving {in_use} different lora_weights adapters at once, its "
                f"limit ({ADAPTERS_IN_USE_ENV}={self.in_use_limit}); retry when a request ends"
            )

    def _fetch(
        self, source: str, key: str, cancel: threading.Event, mine: Future[LoadedAdapter]
    ) -> LoadedAdapter:
        """Download, extract and load an adapter no one else is loading; waiters learn how it went."""
        try:
            folder = materialize(
                source, self.workdir, self.limits, allow_local=self.allow_local, cancel=cancel
            )
            loaded = self._load(folder, key, source)
        except BaseException as exc:
            with self._lock:
                del self._loading[key]
            mine.set_exception(exc)
            raise
        with self._lock:
            loaded.users = 1
            self.loaded[key] = loaded
            del self._loading[key]
        mine.set_result(loaded)
        return loaded

    def release(self, adapter: LoadedAdapter) -> list[LoadedAdapter]:
        """A request that used `adapter` has ended: the idle adapters over capacity leave the cache,
        least recently used first. The caller unloads them from the model, then `discard`s them."""
        with self._lock:
            adapter.users -= 1
            evicted = []
            idle = [k for k, a in self.loaded.items() if a.users == 0]
            while len(self.loaded) > self.capacity and idle:
                evicted.append(self.loaded.pop(idle.pop(0)))
        return evicted

    def discard(self, adapter: LoadedAdapter) -> None:
        """An evicted adapter's files go once the model no longer holds it."""
        remove_files(self.workdir, adapter.folder)
