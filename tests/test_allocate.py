import numpy as np
import pytest
import torch

from fang.analysis.allocate import ComplexityStats, allocate_sparsity, block_sparsity, functional_complexity
from fang.core.errors import FangError

# --------------------------------------------------------------------- functional complexity


def test_fc_hand_made():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    assert functional_complexity(x, x) == pytest.approx(0.0)
    assert functional_complexity(x, 5 * x) == pytest.approx(0.0)  # scale-free
    orth = torch.stack([-x[:, 1], x[:, 0]], dim=1)
    assert functional_complexity(x, orth) == pytest.approx(1.0)
    assert functional_complexity(x, -x) == pytest.approx(2.0)
    # mean over tokens: one identical, one opposite -> 1 - (1 + -1) / 2
    assert functional_complexity(x[:2], torch.stack([x[0], -x[1]])) == pytest.approx(1.0)


def test_fc_streaming_and_shapes():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 10, 8, generator=g)  # [batch, seq, d]
    b = a + 0.5 * torch.randn(3, 10, 8, generator=g)
    whole = functional_complexity(a, b)
    stats = ComplexityStats()
    for i in range(3):
        stats.add_batch(a[i].half(), b[i].half())
    assert stats.count == 30
    assert stats.value == pytest.approx(whole, abs=2e-3)  # fp16 chunks vs fp32 whole
    ref = 1 - torch.nn.functional.cosine_similarity(a.reshape(-1, 8), b.reshape(-1, 8), dim=1).mean().item()
    assert whole == pytest.approx(ref, abs=1e-6)


def test_fc_of_a_capture_store_is_per_block_and_bit_stable(model, calib, tmp_path):
    from conftest import captured
    from fang.analysis.allocate import ComplexityStats
    from fang.analysis.capture import functional_complexities

    cap = captured(model, calib, tmp_path, batch_size=2)  # 3 chunks per layer
    fc = functional_complexities(cap, tmp_path / "cap.zarr")  # accumulated while capturing
    io = torch.from_numpy(cap["block_io"][:])
    chunk = cap["block_io"].chunks[1]
    assert len(fc) == model.config.num_hidden_layers
    for li, value in enumerate(fc):
        assert value == pytest.approx(functional_complexity(io[li], io[li + 1]), abs=1e-12)
        # bit for bit what streaming the stored block_io chunk by chunk gives (the old allocate stage)
        stats = ComplexityStats()
        for start in range(0, io.shape[1], chunk):
            stats.add_batch(io[li, start : start + chunk], io[li + 1, start : start + chunk])
        assert value == stats.value


def test_fc_errors():
    with pytest.raises(FangError, match="shapes differ"):
        functional_complexity(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(FangError, match="at least one token"):
        ComplexityStats().value


# ------------------------------------------------------------------------------ allocation


def _wmean(sp, w=None):
    w = np.ones(len(sp)) if w is None else np.asarray(w, dtype=float)
    return float(np.dot(sp, w) / w.sum())


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("target", [0.2, 0.3, 0.5])
def test_allocation_hits_target_and_band(seed, target):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    fc = rng.random(n) * rng.choice([1e-3, 1.0, 2.0])
    w = rng.integers(1, 100, size=n) if seed % 2 else None
    sp = block_sparsity(fc, target, w)
    assert len(sp) == n
    assert _wmean(sp, w) == pytest.approx(target, abs=1e-12)
    assert min(sp) >= 0.5 * target - 1e-12 and max(sp) <= 1.5 * target + 1e-12
    # monotone: higher FC never gets higher sparsity
    order = np.argsort(fc)
    assert all(np.diff(np.asarray(sp)[order]) <= 1e-12)


def test_allocation_linear_map_when_no_clip_needed():
    # symmetric scores: the linear map already averages to the target, so no shift is applied
    sp = block_sparsity([0.0, 0.5, 1.0], 0.4)
    assert sp == pytest.approx([0.6, 0.4, 0.2])
    # asymmetric: blocks strictly inside the band keep the linear map's spacing (one common shift)
    fc = np.array([0.1, 0.2, 0.25, 0.3, 0.9])
    sp = np.asarray(block_sparsity(fc, 0.4))
    inside = (sp > 0.2 + 1e-12) & (sp < 0.6 - 1e-12)
    assert inside.sum() >= 2
    slope = -(1.5 - 0.5) * 0.4 / (fc.max() - fc.min())
    assert np.allclose(np.diff(sp[inside]), slope * np.diff(fc[inside]))


def test_allocation_clips_to_band():
    # one very complex block: the official unclipped shift would give it 0.043 < 0.5 * sp
    sp = block_sparsity([1.0] + [0.0] * 6, 0.3)
    assert sp[0] == pytest.approx(0.15)
    assert sp[1:] == pytest.approx([0.325] * 6)
    assert _wmean(sp) == pytest.approx(0.3)


def test_allocation_max_sparsity_clip():
    sp = block_sparsity([0.0, 1.0], 0.8, max_sparsity=0.85)
    assert max(sp) <= 0.85 + 1e-12 and _wmean(sp) == pytest.approx(0.8)
    assert sp == pytest.approx([0.85, 0.75])
    with pytest.raises(FangError, match="exceeds max_sparsity"):
        block_sparsity([0.0, 1.0], 0.9, max_sparsity=0.85)


def test_allocation_param_weighting():
    # a big block pulls the weighted mean: the allocation compensates on the small ones
    sp = block_sparsity([0.0, 0.5, 1.0], 0.4, params_per_block=[1, 1, 8])
    assert _wmean(sp, [1, 1, 8]) == pytest.approx(0.4)
    assert sp[0] > sp[1] > sp[2]


def test_allocation_uniform_cases():
    assert block_sparsity([0.3] * 5, 0.25) == [0.25] * 5
    assert block_sparsity([0.1, 0.9], 0.0) == [0.0, 0.0]
    assert allocate_sparsity("uniform", None, 0.3, n_blocks=4) == [0.3] * 4
    assert allocate_sparsity("fc", [0.0, 0.5, 1.0], 0.4) == pytest.approx([0.6, 0.4, 0.2])
    assert allocate_sparsity("taylor", [2.0, 1.0], 0.2) == pytest.approx([0.1, 0.3])


def test_allocation_errors():
    with pytest.raises(FangError, match="target sparsity"):
        block_sparsity([0.1, 0.2], 1.0)
    with pytest.raises(FangError, match="no block scores"):
        block_sparsity([], 0.3)
    with pytest.raises(FangError, match="params_per_block has 1"):
        block_sparsity([0.1, 0.2], 0.3, params_per_block=[5])
    with pytest.raises(FangError, match="band"):
        block_sparsity([0.1, 0.2], 0.3, lo=1.2)
    with pytest.raises(FangError, match="allocation mode"):
        allocate_sparsity("owl", [0.1], 0.3)


def test_the_plan_computes_every_per_block_allocation_from_the_scores():
    """plan.allocated_sparsity: fc and taylor on their own scores, FANG's own (asa) on allocate.mode's, uniform
    without scores; the same numbers as `allocate_sparsity` on allocate.json's fields (what FANG read before)."""
    from fang.analysis.allocate import AllocationScores
    from fang.methods.plan import allocated_sparsity

    fc, taylor = [0.1, 0.4, 0.2, 0.3], [3.0, 1.0, 2.0, 0.5]
    scores = AllocationScores("taylor", taylor, fc, taylor, 0.95, "x/allocate.json")
    assert allocated_sparsity("uniform", 0.3, 4) == [0.3] * 4
    assert allocated_sparsity("fc", 0.3, 4, scores) == allocate_sparsity("fc", fc, 0.3, n_blocks=4)
    assert allocated_sparsity("taylor", 0.3, 4, scores) == allocate_sparsity("taylor", taylor, 0.3, n_blocks=4)
    assert allocated_sparsity("asa", 0.3, 4, scores) == allocated_sparsity("taylor", 0.3, 4, scores)
    with pytest.raises(FangError, match="x/allocate.json has no Taylor"):
        allocated_sparsity("taylor", 0.3, 4, AllocationScores("fc", fc, fc, None, 0.95, "x/allocate.json"))
