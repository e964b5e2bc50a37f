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


@pytest.fixture(scope="session", autouse=True)
def _one_thread_for_small_models():
    # the suite runs the small built-ins only: the library's own rule, applied once (fast on a busy machine)
    from lora_analysis.training.runtime import use_threads
    use_threads("mlp-digits")


@pytest.fixture(scope="session")
def small_sweep_home(tmp_path_factory, _shared_cache):
    """A LORA_ANALYSIS_HOME holding a small mlp-digits sweep (LoRA r=1 and r=8, full fine-tuning, 20 steps),
    made once for the session: tests read it and never write to it."""
    from lora_analysis.training import run_sweep, sweep_settings

    home = tmp_path_factory.mktemp("small-sweep-home")
    (home / "cache").symlink_to(_shared_cache, target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_ANALYSIS_HOME", str(home))
        result = run_sweep(sweep_settings(model="mlp-digits", ranks=[1, 8], alphas=[16], full_ft=True, steps=20,
                                          eval_every=10, pretrain_steps=30))
    assert all(r.status == "completed" for r in result.results)
    return home
