"""W0's SVD cached on disk by content; the truncated top-k of W0 + ΔW against the exact SVD; the one-pass analysis."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_analysis.analysis import base_svd as bs
from lora_analysis.analysis.against_base import analyse_against_base
from lora_analysis.analysis.amplification import amplification_frame
from lora_analysis.analysis.intruders import intruder_dimensions, intruders_frame, max_cosines
from lora_analysis.weights import ModuleUpdate

torch.set_num_threads(1)


def _update(seed, out_f=160, in_f=120, r=4, strength=1.0, name="m"):
    """W0 with a decaying spectrum and a LoRA update whose strength decides how many intruders appear."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out_f, in_f, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_f, in_f, generator=g, dtype=torch.float64))
    w0 = (u * torch.arange(1, in_f + 1, dtype=torch.float64) ** -0.5) @ v.T
    a = torch.randn(r, in_f, generator=g, dtype=torch.float64) / in_f**0.5
    b = strength * torch.randn(out_f, r, generator=g, dtype=torch.float64) / out_f**0.5
    return ModuleUpdate(name, w0=w0, lora_A=a, lora_B=b, scaling=2.0)


def test_truncated_top_k_gives_the_exact_intruder_counts_on_seeded_matrices(monkeypatch):
    monkeypatch.setattr(bs, "TRUNCATE_MIN", 0)        # small test matrices take the truncated path too
    counts = []
    for seed in range(4):
        for strength in (0.1, 0.3, 3.0):
            u = _update(seed, strength=strength)
            top = bs.top_left_singular(u, 10, device="cpu")
            assert top.method == "truncated"           # the fast path really ran
            fast = intruder_dimensions(u, 10, 0.5, device="cpu")
            exact = intruder_dimensions(u, 10, 0.5, method="exact", device="cpu")
            np.testing.assert_allclose(fast.max_cos, exact.max_cos, atol=1e-6)
            assert fast.count == exact.count
            counts.append(exact.count)
    assert min(counts) < max(counts)                   # the cases differ: agreeing on all-zero would prove little


def test_iteration_that_does_not_converge_falls_back_to_the_exact_svd(monkeypatch):
    u = _update(0)
    assert bs.top_left_singular(u, 10, device="cpu").method == "exact"     # small: the dense SVD is faster
    monkeypatch.setattr(bs, "TRUNCATE_MIN", 0)
    top = bs.top_left_singular(u, 10, device="cpu", max_iter=1)
    exact = bs.exact_top_left_singular(u.w0 + u.scaling * u.lora_B @ u.lora_A, 10, device="cpu")
    assert top.method == "exact" and torch.equal(top.U, exact.U)
    with pytest.raises(ValueError, match="method='fast'"):
        intruder_dimensions(u, method="fast")


def test_the_top_k_of_an_adapter_is_cached_and_a_changed_adapter_misses_it(tmp_path, monkeypatch):
    monkeypatch.setattr(bs, "TRUNCATE_MIN", 0)
    u = _update(1, strength=0.3)
    first = bs.top_left_singular(u, 10, device="cpu", cache=True, directory=tmp_path)
    assert first.method == "truncated" and len(list(tmp_path.glob("topk-*.safetensors"))) == 1

    def no_iteration(*args, **kwargs):
        raise AssertionError("iterated although the answer was cached")
    with monkeypatch.context() as m:
        m.setattr(bs, "_iterate", no_iteration)
        again = bs.top_left_singular(u, 10, device="cpu", cache=True, directory=tmp_path)
    assert torch.equal(again.U, first.U) and torch.equal(again.S, first.S) and again.method == "truncated"
    changed = ModuleUpdate("m", w0=u.w0, lora_A=u.lora_A, lora_B=u.lora_B * 1.5, scaling=u.scaling)
    other = bs.top_left_singular(changed, 10, device="cpu", cache=True, directory=tmp_path)
    assert not torch.equal(other.S, first.S) and len(list(tmp_path.glob("topk-*.safetensors"))) == 2


def test_a_wide_w0_gets_the_same_svd_through_its_transpose():
    w0 = torch.randn(30, 70, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = bs.base_svd(w0, cache=False, device="cpu")
    ref = torch.linalg.svd(w0, full_matrices=False)
    assert got.U.shape == (30, 30)
    torch.testing.assert_close(got.S, ref.S)
    torch.testing.assert_close((got.U.T @ ref.U).abs(), torch.eye(30, dtype=torch.float64))   # same vectors, ± sign


def test_base_svd_is_cached_by_content(tmp_path):
    w0 = torch.randn(40, 30, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    first = bs.base_svd(w0, cache=True, directory=tmp_path, device="cpu")
    files = list(tmp_path.glob("*.safetensors"))
    assert not first.cached and len(files) == 1
    again = bs.base_svd(w0.clone(), cache=True, directory=tmp_path, device="cpu")   # same bytes, another tensor
    assert again.cached and torch.equal(again.U, first.U) and torch.equal(again.S, first.S)
    exact = torch.linalg.svdvals(w0.double())
    torch.testing.assert_close(first.S, exact)
    changed = w0.clone()
    changed[0, 0] += 1
    assert not bs.base_svd(changed, cache=True, directory=tmp_path, device="cpu").cached
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    files[0].write_bytes(b"damaged")                   # a broken entry is recomputed, not trusted
    assert not bs.base_svd(w0, cache=True, directory=tmp_path, device="cpu").cached
    assert bs.base_svd(w0, cache=True, directory=tmp_path, device="cpu").cached
    # small matrices are not cached by default; the default folder is under the home folder
    assert not bs.base_svd(w0, directory=tmp_path / "small", device="cpu").cached
    assert not (tmp_path / "small").exists()


def test_default_cache_lives_in_the_home_folder(lora_home):
    assert bs.cache_dir() == lora_home / "cache" / "base_svd"


def test_one_pass_analysis_matches_the_separate_frames_and_a_float64_ratio(tmp_path, monkeypatch):
    monkeypatch.setattr(bs, "cache_dir", lambda: tmp_path)
    updates = [_update(s, strength=st, name=f"m{s}") for s, st in ((0, 0.1), (1, 3.0))]
    seen = []
    result = analyse_against_base(iter(updates), k=10, epsilon=0.5, device="cpu",
                                  progress=lambda done, name: seen.append((done, name)))
    assert seen == [(1, "m0"), (2, "m1")]
    intr = intruders_frame(updates, 10, 0.5, device="cpu")
    amp = amplification_frame(updates, device="cpu")
    assert result.intruders["intruders"].tolist() == intr["intruders"].tolist()
    np.testing.assert_allclose(result.amplification["amplification"], amp["amplification"], rtol=1e-10)
    for row, u in zip(result.norms.itertuples(), updates):
        dense = u.scaling * u.lora_B @ u.lora_A
        assert row.relative == pytest.approx(float(dense.norm() / u.w0.norm()), rel=1e-10)
    assert result.intruders["intruders"].tolist()[0] < result.intruders["intruders"].tolist()[1]


def test_max_cosines_against_all_of_w0():
    left = torch.eye(4, dtype=torch.float64)
    ft = torch.tensor([[0.6], [0.8], [0.0], [0.0]], dtype=torch.float64)
    assert max_cosines(left, ft).tolist() == [0.8]
