"""The per-request adapter cache alone (finetune/serving/adapter_cache.py), without a model: the loader
records what it is asked to load, so the tests see what the cache downloads, keeps and evicts."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from finetune.cog.cogtools import data_uri
from finetune.engine.requests import GenerationError
from finetune.formats.archives import pack_dir
from finetune.formats.weights_sources import WeightsSourceError
from finetune.serving.adapter_cache import AdapterCache, LoadedAdapter, adapter_key, normalise_source
from finetune.settings import ServeSettings


class Loads:
    """A loader that records each (folder, name) it is given, as the server's would attach them."""

    def __init__(self) -> None:
        self.calls: list[tuple[Path, str]] = []

    def __call__(self, folder: Path, name: str, source: str) -> LoadedAdapter:
        assert name == adapter_key(normalise_source(source))
        self.calls.append((folder, name))
        return LoadedAdapter(name, folder, None)


def sources(tmp_path: Path, count: int) -> list[str]:
    """`count` different adapters as data URIs: each is extracted into the cache's work folder."""
    out = []
    for i in range(count):
        folder = tmp_path / f"adapter{i}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text(f'{{"r": {i + 1}}}')
        out.append(data_uri(pack_dir(folder, tmp_path / f"adapter{i}.tar")))
    return out


def cache_for(tmp_path: Path, **settings) -> tuple[AdapterCache, Loads]:
    workdir = tmp_path / "work"
    workdir.mkdir()
    loads = Loads()
    return AdapterCache(workdir, ServeSettings(**settings), loads), loads


def test_the_least_recently_used_idle_adapter_leaves_with_its_files(tmp_path):
    cache, loads = cache_for(tmp_path, adapter_cache_size=2)
    a, b, c = sources(tmp_path, 3)
    never = threading.Event()
    first = cache.acquire(a, never)
    assert cache.release(first) == []
    second = cache.acquire(b, never)
    assert cache.release(second) == []
    assert cache.acquire(a, never) is first  # cached: not loaded again, and now the most recent
    assert cache.release(first) == []
    third = cache.acquire(c, never)
    assert cache.release(third) == [second]  # b was used longest ago
    assert second.folder.parent == cache.workdir and second.folder.exists()
    cache.discard(second)
    assert not second.folder.exists() and first.folder.exists() and third.folder.exists()
    assert list(cache.loaded) == [first.name, third.name]
    assert [name for _, name in loads.calls] == [first.name, second.name, third.name]


def test_an_adapter_in_use_is_never_evicted(tmp_path):
    cache, loads = cache_for(tmp_path, adapter_cache_size=0)
    (a,) = sources(tmp_path, 1)
    never = threading.Event()
    held = cache.acquire(a, never)
    assert cache.acquire(a, never) is held and held.users == 2
    assert cache.release(held) == []  # one request still uses it
    assert cache.release(held) == [held] and not cache.loaded
    assert len(loads.calls) == 1


def test_distinct_adapters_in_use_are_bounded(tmp_path):
    cache, _ = cache_for(tmp_path, max_adapters_in_use=1)
    a, b = sources(tmp_path, 2)
    never = threading.Event()
    held = cache.acquire(a, never)
    with pytest.raises(GenerationError, match=r"serving 1 different lora_weights .*MAX_ADAPTERS_IN_USE=1"):
        cache.acquire(b, never)
    assert cache.acquire(a, never) is held  # the same adapter is no new one
    cache.release(held)
    cache.release(held)
    other = cache.acquire(b, never)  # free again
    assert other.name == adapter_key(normalise_source(b))


def test_local_paths_only_where_the_operator_allows_them(tmp_path):
    folder = tmp_path / "local"
    folder.mkdir()
    refusing, loads = cache_for(tmp_path)
    with pytest.raises(WeightsSourceError, match="local paths are not accepted"):
        refusing.acquire(str(folder), threading.Event())
    assert loads.calls == [] and not refusing.loaded
    workdir = tmp_path / "other-work"
    workdir.mkdir()
    allowing = AdapterCache(
        workdir, ServeSettings(allow_local_lora_weights=True, adapter_cache_size=0), Loads()
    )
    loaded = allowing.acquire(str(folder), threading.Event())
    assert loaded.folder == folder.resolve()
    (evicted,) = allowing.release(loaded)
    allowing.discard(evicted)
    assert folder.exists()  # an operator's folder is never removed


def test_a_failed_load_fails_its_request_and_the_next_one_tries_again(tmp_path):
    (a,) = sources(tmp_path, 1)
    loads = Loads()
    calls = []

    def fails_once(folder: Path, name: str, source: str) -> LoadedAdapter:
        calls.append(name)
        if len(calls) == 1:
            raise RuntimeError("refused")
        return loads(folder, name, source)

    cache = AdapterCache(tmp_path, ServeSettings(), fails_once)
    with pytest.raises(RuntimeError, match="refused"):
        cache.acquire(a, threading.Event())
    assert not cache.loaded
    assert cache.acquire(a, threading.Event()).users == 1
    assert len(calls) == 2 and list(cache.loaded) == [calls[1]]
