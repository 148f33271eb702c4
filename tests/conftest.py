"""Fixtures shared by the test modules."""
import urllib.request

import pytest

import minidiff.utils.data as D


def file_urls_only(url, *args, **kwargs):
    """urlopen for file:// mirrors; any other address fails the test (tests never reach the network)."""
    if not url.startswith("file://"):
        raise AssertionError(f"a test tried to reach the network: {url}")
    return urllib.request.urlopen(url, *args, **kwargs)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """The data finder without the user's cache, $MINIDIFF_DATA_DIR, /usr/share/datasets or the network."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("MINIDIFF_DATA_DIR", raising=False)
    monkeypatch.setattr(D, "SYSTEM_DATA_DIR", tmp_path / "usr-share-datasets")
    monkeypatch.setattr(D, "_urlopen", file_urls_only)
    return tmp_path
