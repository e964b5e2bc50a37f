"""φ subspace similarity (LoRA paper Eq. 4): identities, symmetry, the random baseline max(i, j)/d."""

import numpy as np
import pytest
import torch

from lora_analysis.analysis.similarity import (a_similarity, adapter_similarity, base_overlap, lora_a_subspace,
                                               random_baseline, similarity_matrix, similarity_summary_frame,
                                               subspace_similarity, update_similarity)
from lora_analysis.weights import ModuleUpdate


def _orthonormal(d, r, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, r)))
    return q


def test_identical_subspaces_give_one():
    u = _orthonormal(50, 8, 0)
    phi = similarity_matrix(u, u)
    assert phi.shape == (8, 8)
    np.testing.assert_allclose(np.diagonal(phi), 1.0, atol=1e-12)
    # the smaller top subspace lies inside the larger one: φ(i, j) = 1 for every i, j
    np.testing.assert_allclose(phi, 1.0, atol=1e-12)


def test_orthogonal_subspaces_give_zero():
    q = _orthonormal(30, 10, 1)
    assert similarity_matrix(q[:, :4], q[:, 4:]).max() < 1e-12


def test_phi_is_symmetric_under_swapping_the_subspaces():
    u1, u2 = _orthonormal(40, 6, 2), _orthonormal(40, 9, 3)
    np.testing.assert_allclose(similarity_matrix(u1, u2), similarity_matrix(u2, u1).T, atol=1e-14)


def test_one_shared_direction():
    # U1 = [e1, e2, e3], U2 = [e1, e4]: φ(1,1) = 1, φ(3,2) = 1/2 (one shared direction over min(3,2))
    eye = np.eye(10)
    u1, u2 = eye[:, [0, 1, 2]], eye[:, [0, 3]]
    assert subspace_similarity(u1, u2, 1, 1) == pytest.approx(1.0)
    assert subspace_similarity(u1, u2, 3, 2) == pytest.approx(0.5)
    assert subspace_similarity(u1, u2, 1, 2) == pytest.approx(1.0)
    assert subspace_similarity(u1[:, 1:], u2, 2, 2) == pytest.approx(0.0)


def test_random_subspaces_average_max_i_j_over_d():
    d, r1, r2, trials = 64, 4, 12, 300
    rng = np.random.default_rng(0)
    mean = np.zeros((r1, r2))
    for _ in range(trials):
        u1, _ = np.linalg.qr(rng.standard_normal((d, r1)))
        u2, _ = np.linalg.qr(rng.standard_normal((d, r2)))
        mean += similarity_matrix(u1, u2) / trials
    expected = random_baseline(r1, r2, d)
    assert expected[0, 0] == pytest.approx(1 / 64) and expected[3, 11] == pytest.approx(12 / 64)
    np.testing.assert_allclose(mean, expected, rtol=0.15)


def test_a_subspace_is_right_singular_vectors_of_a():
    a = torch.randn(5, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v = lora_a_subspace(a)
    assert v.shape == (20, 5)
    _, _, vh = torch.linalg.svd(a, full_matrices=False)
    np.testing.assert_allclose(np.abs(v.T @ vh.numpy().T), np.eye(5), atol=1e-10)


def _lora(a, b, w0=None, name="m"):
    return ModuleUpdate(name, w0=w0, lora_A=a, lora_B=b, scaling=1.0)


def test_a_similarity_of_nested_adapters():
    g = torch.Generator().manual_seed(1)
    a64 = torch.randn(16, 40, generator=g, dtype=torch.float64)
    b = torch.randn(30, 16, generator=g, dtype=torch.float64)
    # rescaling the rows of A keeps its row space but reorders nothing important: φ at full rank is 1
    res = a_similarity(_lora(a64, b), _lora(2.0 * a64, b))
    assert res.phi.shape == (16, 16) and res.d == 40
    assert res.phi[-1, -1] == pytest.approx(1.0)
    assert res.summary()["shared_directions"] == 16
    np.testing.assert_allclose(res.baseline, random_baseline(16, 16, 40))


def test_update_similarity_lora_vs_full_uses_delta_directions():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(3, 25, generator=g, dtype=torch.float64)
    b = torch.randn(20, 3, generator=g, dtype=torch.float64)
    w0 = torch.randn(20, 25, generator=g, dtype=torch.float64)
    lora = _lora(a, b, w0)
    full = ModuleUpdate("m", w0=w0, w_ft=w0 + b @ a)       # the same ΔW, learned densely
    for side in ("input", "output"):
        res = update_similarity(lora, full, side=side, top_k2=3)
        np.testing.assert_allclose(np.diagonal(res.phi), 1.0, atol=1e-8)
    assert update_similarity(lora, full, side="output", top_k2=3).d == 20
    with pytest.raises(ValueError, match="side='sideways'"):
        update_similarity(lora, full, side="sideways")
    with pytest.raises(ValueError, match="needs two LoRA updates"):
        a_similarity(lora, full)


def test_adapter_similarity_over_common_modules():
    g = torch.Generator().manual_seed(3)
    one = {n: _lora(torch.randn(4, 10, generator=g), torch.randn(12, 4, generator=g), name=n) for n in ("q", "v")}
    two = {"v": one["v"], "k": one["q"]}
    res = adapter_similarity(one, two)
    assert list(res) == ["v"]
    frame = similarity_summary_frame(res)
    assert frame.loc[0, "phi_top1"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="share no adapted module"):
        adapter_similarity({"q": one["q"]}, {"k": one["q"]})


def test_base_overlap_when_delta_lies_in_w0_top_directions():
    g = torch.Generator().manual_seed(4)
    u, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    w0 = (u[:, :16] * torch.linspace(10, 1, 16, dtype=torch.float64)) @ v.T
    # ΔW along W0's top-2 directions: overlap 1 at k = 2 on both sides
    b, a = u[:, :2] * torch.tensor([0.5, 0.3], dtype=torch.float64), v[:, :2].T
    frame = base_overlap(_lora(a, b, w0), k=2)
    np.testing.assert_allclose(frame["phi_output"], [1.0, 1.0], atol=1e-10)
    np.testing.assert_allclose(frame["phi_input"], [1.0, 1.0], atol=1e-10)
    # ΔW along W0's weakest directions: no overlap with its top-2
    weak = base_overlap(_lora(v[:, 14:].T, u[:, 14:16], w0), k=2)
    assert weak["phi_output"].max() < 1e-10 and weak["baseline_output"].tolist() == [1 / 20, 2 / 20]


def test_similarity_matrix_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="same space"):
        similarity_matrix(np.eye(5)[:, :2], np.eye(6)[:, :2])
