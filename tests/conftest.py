"""Shared fixtures: a private LORA_ANALYSIS_HOME per test, so no test touches the real user folders."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def _shared_cache(tmp_path_factory):
    # pretrained bases are deterministic, so tests may share them; runs stay private to each test
    return tmp_path_factory.mktemp("lora-cache")


@pytest.fixture
def lora_home(tmp_path, monkeypatch, _shared_cache):
    """A fresh ``LORA_ANALYSIS_HOME`` (runs under ``<home>/runs``) whose ``cache`` is shared by the session."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "cache").symlink_to(_shared_cache, target_is_directory=True)
    monkeypatch.setenv("LORA_ANALYSIS_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home
