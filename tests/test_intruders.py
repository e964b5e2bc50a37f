"""Intruder dimensions: none when ΔW stays in W0's top subspace, one for a planted orthogonal direction."""

import pytest
import torch

from lora_analysis.analysis.intruders import intruder_dimensions, intruder_sweep, intruders_frame
from lora_analysis.weights import ModuleUpdate


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(24, 24, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    sigma = torch.linspace(10, 0.5, 20, dtype=torch.float64)
    # W0 is 24x20: its 20 left singular vectors leave 4 directions of R^24 (u[:, 20:]) untouched
    return u, v, (u[:, :20] * sigma) @ v.T


def test_update_inside_w0_top_subspace_has_no_intruders():
    u, v, w0 = _setup()
    b, a = u[:, :3] * torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64), v[:, :3].T
    res = intruder_dimensions(ModuleUpdate("m", w0=w0, lora_A=a, lora_B=b, scaling=1.0))
    assert res.k == 10 and res.count == 0
    assert res.max_cos.min() > 0.99


def test_planted_orthogonal_direction_is_one_intruder():
    u, v, w0 = _setup()
    # a strong update writing u[:, 20] (orthogonal to every left singular vector of W0) from W0's weakest
    # input direction v_19 (σ = 0.5): the new top left vector is (0.5·u_19 + 30·u_20)/‖·‖, whose largest
    # cosine with W0's vectors is 0.5/√(0.25 + 900)
    b, a = 30.0 * u[:, 20:21], v[:, 19:20].T
    res = intruder_dimensions(ModuleUpdate("m", w0=w0, lora_A=a, lora_B=b, scaling=1.0))
    assert res.count == 1
    assert res.intruders == [0]                 # it is now the top singular vector
    assert res.max_cos[0] == pytest.approx(0.5 / (0.25 + 900) ** 0.5, rel=1e-8)


def test_full_fine_tuning_and_frame_totals():
    u, v, w0 = _setup()
    planted = ModuleUpdate("a", w0=w0, w_ft=w0 + 30.0 * u[:, 21:22] @ v[:, 2:3].T)
    clean = ModuleUpdate("b", w0=w0, w_ft=w0 + 0.1 * u[:, :1] @ v[:, :1].T)
    frame = intruders_frame([planted, clean])
    assert frame["intruders"].tolist() == [1, 0] and frame["intruders"].sum() == 1
    assert frame["kind"].tolist() == ["full", "full"]


def test_sweep_counts_are_monotone_in_epsilon_and_k():
    u, v, w0 = _setup()
    g = torch.Generator().manual_seed(5)
    a = torch.randn(4, 20, generator=g, dtype=torch.float64)
    b = 3.0 * torch.randn(24, 4, generator=g, dtype=torch.float64)
    sweep = intruder_sweep({"m": ModuleUpdate("m", w0=w0, lora_A=a, lora_B=b, scaling=1.0)},
                           epsilons=(0.1, 0.5, 0.9, 1.0), ks=(2, 10), label="r=4")
    assert set(sweep["label"]) == {"r=4"} and len(sweep) == 8
    for k, grp in sweep.groupby("k"):
        counts = grp.sort_values("epsilon")["intruders"].tolist()
        assert counts == sorted(counts) and counts[-1] <= k
    # ε = 1 counts every vector not exactly in W0's span; the k=2 counts never exceed the k=10 ones
    by = sweep.set_index(["k", "epsilon"])["intruders"]
    assert all(by[(2, e)] <= by[(10, e)] for e in (0.1, 0.5, 0.9, 1.0))
    # the counts move: a sweep of zeros (or of k) would pass the order checks above
    assert by[(10, 0.1)] < by[(10, 0.5)] < by[(10, 0.9)] == 10 and by[(2, 1.0)] == 2
    direct = intruder_dimensions(ModuleUpdate("m", w0=w0, lora_A=a, lora_B=b, scaling=1.0), k=10, epsilon=0.5)
    assert by[(10, 0.5)] == direct.count


def test_bad_arguments():
    u, v, w0 = _setup()
    upd = ModuleUpdate("m", w0=w0, lora_A=v[:, :1].T, lora_B=u[:, :1], scaling=1.0)
    with pytest.raises(ValueError, match="k=0"):
        intruder_dimensions(upd, k=0)
    with pytest.raises(ValueError, match="epsilon=1.5"):
        intruder_dimensions(upd, epsilon=1.5)
    with pytest.raises(ValueError, match="no base weight W0"):
        intruder_dimensions(ModuleUpdate("m", lora_A=v[:, :1].T, lora_B=u[:, :1], scaling=1.0))
