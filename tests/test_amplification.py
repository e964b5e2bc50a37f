"""Amplification factor (LoRA paper §7.3, Table 7) on constructed cases with known answers."""

import math

import pytest
import torch

from lora_analysis.analysis.amplification import amplification, amplification_frame, projection_norm
from lora_analysis.weights import ModuleUpdate


def _basis(n, seed):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def _w0():
    u, v = _basis(12, 0), _basis(10, 1)
    sigma = torch.arange(10, 0, -1, dtype=torch.float64)       # 10, 9, ..., 1
    return u, v, (u[:, :10] * sigma) @ v.T


def test_known_amplification_on_a_weak_direction():
    u, v, w0 = _w0()
    # ΔW = 5·u_9·v_9ᵀ lies on W0's weakest direction (σ = 1): ‖ΔW‖ = 5, ‖uᵀ W0 v‖ = 1 → factor 5
    b, a = 5.0 * u[:, 9:10], v[:, 9:10].T
    row = amplification(ModuleUpdate("m", w0=w0, lora_A=a, lora_B=b, scaling=1.0))
    assert row["r"] == 1
    assert row["delta_fro"] == pytest.approx(5.0)
    assert row["proj_delta"] == pytest.approx(1.0)
    assert row["amplification"] == pytest.approx(5.0)
    assert row["proj_w0"] == pytest.approx(10.0)                # W0's own top-1: σ₁
    assert row["w0_fro"] == pytest.approx(math.sqrt(sum(k * k for k in range(1, 11))))
    # on the strongest direction the same ΔW is barely amplified: 5 / 10
    strong = amplification(ModuleUpdate("m", w0=w0, lora_A=v[:, :1].T, lora_B=5.0 * u[:, :1], scaling=1.0))
    assert strong["amplification"] == pytest.approx(0.5)


def test_rank_two_and_random_row():
    u, v, w0 = _w0()
    b, a = u[:, [8, 9]] * torch.tensor([3.0, 4.0], dtype=torch.float64), v[:, [8, 9]].T
    row = amplification(ModuleUpdate("m", w0=w0, lora_A=a, lora_B=b, scaling=2.0))
    # ΔW = 2·(3 u8 v8ᵀ + 4 u9 v9ᵀ): ‖ΔW‖ = 10; UᵀW0V = diag(2, 1) up to order → √5
    assert row["delta_fro"] == pytest.approx(10.0)
    assert row["proj_delta"] == pytest.approx(math.sqrt(5.0))
    assert row["proj_w0"] == pytest.approx(math.sqrt(100 + 81))
    assert 0 < row["proj_random"] < row["proj_w0"]
    again = amplification(ModuleUpdate("m", w0=w0, lora_A=a, lora_B=b, scaling=2.0), seed=0)
    assert again["proj_random"] == row["proj_random"]          # seeded


def test_zero_update_and_orthogonal_update():
    u, v, w0 = _w0()
    zero = amplification(ModuleUpdate("m", w0=w0, lora_A=v[:, :1].T, lora_B=torch.zeros(12, 1, dtype=torch.float64),
                                      scaling=1.0))
    assert zero["amplification"] == 0.0
    # u[:, 10] is outside W0's column space: Uᵀ W0 V = 0 → infinite amplification
    ortho = amplification(ModuleUpdate("m", w0=w0, lora_A=v[:, :1].T, lora_B=u[:, 10:11], scaling=1.0))
    assert ortho["proj_delta"] == pytest.approx(0.0, abs=1e-12) and ortho["amplification"] == math.inf


def test_full_fine_tuning_and_frame():
    u, v, w0 = _w0()
    delta = 3.0 * u[:, 9:10] @ v[:, 9:10].T
    full = ModuleUpdate("full", w0=w0, w_ft=w0 + delta)
    row = amplification(full, r=1)
    assert row["amplification"] == pytest.approx(3.0)
    frame = amplification_frame([full], r=1)
    assert frame.loc[0, "amplification"] == pytest.approx(3.0) and list(frame["kind"]) == ["full"]


def test_needs_w0_and_valid_r():
    a, b = torch.randn(2, 10), torch.randn(12, 2)
    with pytest.raises(ValueError, match="no base weight W0"):
        amplification(ModuleUpdate("m", lora_A=a, lora_B=b, scaling=1.0))
    with pytest.raises(ValueError, match="r=0 is not allowed"):
        amplification(ModuleUpdate("m", w0=torch.randn(12, 10), lora_A=a, lora_B=b, scaling=1.0), r=0)


def test_projection_norm_matches_definition():
    w0 = torch.randn(6, 5, dtype=torch.float64)
    u, v = torch.eye(6, dtype=torch.float64)[:, :2], torch.eye(5, dtype=torch.float64)[:, :3]
    assert projection_norm(w0, u, v) == pytest.approx(float(torch.linalg.matrix_norm(w0[:2, :3])))
