"""GPrune-LLM analysis: per-source scores, rank drift, modules, the reliability switch and module budgets."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import kendalltau

from fang.analysis.gprune import (
    ModuleStats,
    SourceMoments,
    analyze_layer,
    mean_kendall_tau,
    normalized_ranks,
    null_tau_se,
    rank_drift,
    reliability_switch,
    source_scores,
)
from fang.core.errors import FangError
from fang.methods.gprune import module_keep_counts, select_neurons

N_SRC, D, PER = 4, 16, 20  # sources, hidden size, neurons per planted module


def planted_layer(unstable_rms: tuple[float, float], seed: int = 0):
    """Three modules of 20 neurons with distinct weight prototypes; modules 0 and 1 have the same
    activation RMS under every source, module 2 a fresh random RMS per source in `unstable_rms`."""
    g = torch.Generator().manual_seed(seed)
    n = 3 * PER
    proto = torch.randn(3, 3, D, generator=g)  # module x (gate, up, down) x d
    module = torch.arange(n) // PER
    noise = lambda: 0.05 * torch.randn(n, D, generator=g)  # noqa: E731
    w_gate, w_up = proto[module, 0] + noise(), proto[module, 1] + noise()
    w_down = (proto[module, 2] + noise()).T.contiguous()  # [d, n]
    rms = torch.empty(N_SRC, n)
    rms[:, : 2 * PER] = (1.0 + torch.rand(2 * PER, generator=g)).expand(N_SRC, -1)
    lo, hi = unstable_rms
    rms[:, 2 * PER :] = lo + (hi - lo) * torch.rand(N_SRC, PER, generator=g)
    m = SourceMoments(N_SRC, n)
    m.count += 100
    m.sum_sq += (rms.double() ** 2) * 100
    return m, w_gate, w_up, w_down, module


def analyze(m, w_gate, w_up, w_down, rule="sensitive_and_weak"):
    return analyze_layer("wanda_sp", m, w_gate, w_up, w_down, n_modules=3, drift_weight=1.0, refine_iter=10,
                         min_tau_z=3.0, weak_ratio=1.0, rule=rule)


def test_modules_follow_parameter_similarity_and_the_unstable_weak_module_switches_to_magnitude():
    m, w_gate, w_up, w_down, planted_module = planted_layer((0.0, 0.5))
    r = analyze(m, w_gate, w_up, w_down)
    # every planted module is exactly one found module
    for c in range(3):
        assert len(set(r.modules[planted_module == c].tolist())) == 1
    assert len(set(r.modules.tolist())) == 3
    unstable = int(r.modules[2 * PER])
    assert r.drift[: 2 * PER].max() == 0  # same ranking under every source
    assert r.stats.tau_z[unstable] < 3.0 and r.stats.act[unstable] < 1.0
    assert (r.stats.tau_z[[c for c in range(3) if c != unstable]] > 3.0).all()
    assert r.switched.tolist() == [c == unstable for c in range(3)]
    # the switched module is ranked by weight magnitude, the others by their activation score
    assert torch.equal(r.score[2 * PER :], r.magnitude[2 * PER :])
    assert torch.equal(r.score[: 2 * PER], r.act[: 2 * PER])


def test_a_strong_unstable_module_switches_only_under_the_or_rule():
    m, w_gate, w_up, w_down, _ = planted_layer((3.0, 6.0))
    strict = analyze(m, w_gate, w_up, w_down, "sensitive_and_weak")
    loose = analyze(m, w_gate, w_up, w_down, "sensitive_or_weak")
    unstable = int(strict.modules[2 * PER])
    assert strict.stats.act[unstable] > 1.0  # strong: not weak
    assert not strict.switched.any()
    assert loose.switched[unstable]


def test_source_scores_follow_the_base_metrics():
    m = SourceMoments(2, 3)
    h = torch.tensor([[1.0, 2.0, 0.0], [3.0, 2.0, 1.0], [5.0, -2.0, 1.0]])
    m.add(h, torch.tensor([0, 0, 1]))
    m.add(h[:1], torch.tensor([-1]))  # a token of no used source is ignored
    w = torch.tensor([[1.0, -2.0, 0.5], [1.0, 1.0, 0.5]])
    wanda = source_scores("wanda_sp", m, w)
    assert torch.allclose(wanda[0], torch.tensor([2 * (5.0 ** 0.5), 3 * 2.0, 1 * (0.5 ** 0.5)], dtype=torch.float64))
    flap = source_scores("flap", m, w)
    assert torch.allclose(flap[0], torch.tensor([1.0 * 2, 0.0 * 5, 0.25 * 0.5], dtype=torch.float64))
    assert torch.equal(flap[1], torch.zeros(3, dtype=torch.float64))  # one token: no fluctuation
    with pytest.raises(FangError, match="use wanda_sp or flap"):
        source_scores("taylor", m, w)


def test_rank_drift_is_zero_for_agreeing_sources_and_large_for_reversed_ones():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0], [4.0, 3.0, 2.0, 1.0]])
    ranks = normalized_ranks(scores)
    assert ranks[0].tolist() == [0.0, 1 / 3, 2 / 3, 1.0]
    assert rank_drift(ranks[:2]).tolist() == [0.0] * 4
    assert rank_drift(ranks)[0] > 0.4


def test_mean_kendall_tau_matches_scipy():
    s = torch.randn(3, 25, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    expected = sum(kendalltau(s[a], s[b]).statistic for a, b in [(0, 1), (0, 2), (1, 2)]) / 3
    assert mean_kendall_tau(s) == pytest.approx(expected, abs=1e-12)
    assert mean_kendall_tau(s[:, :1]) == 1.0


@pytest.mark.parametrize("n_keep", [15, 50, 61, 99])
def test_module_budget_is_exact_and_gives_sensitive_modules_more_sparsity(n_keep):
    size = torch.tensor([40, 30, 20, 10])
    drift = torch.tensor([0.02, 0.05, 0.2, 0.1])
    counts = module_keep_counts(size, drift, n_keep, gamma=0.1, max_sparsity=0.9)
    assert int(counts.sum()) == n_keep
    assert (counts <= size).all() and (counts >= 1).all()
    kept = counts.double() / size
    if 20 < n_keep < 90:  # away from the clips, the most drifting module keeps the smallest fraction
        assert kept[2] == kept.min() and kept[0] == kept.max()
    flat = module_keep_counts(size, drift, 50, gamma=0.0)
    assert flat.tolist() == [20, 15, 10, 5]
    with pytest.raises(FangError, match="max_sparsity"):
        module_keep_counts(size, drift, 5, max_sparsity=0.9)


def test_select_neurons_ranks_inside_each_module():
    modules = torch.tensor([0, 0, 0, 1, 1, 1])
    score = torch.tensor([5.0, 1.0, 3.0, 0.1, 0.3, 0.2])  # module 1's best is below module 0's worst
    keep = select_neurons(modules, score, torch.tensor([1, 2]))
    assert keep.tolist() == [True, False, False, False, True, True]


def test_reliability_switch_rules():
    # modules 0 and 1: sources disagree (tau_z 0.5); module 2: they agree (tau_z 8)
    stats = ModuleStats(torch.tensor([5, 5, 5]), torch.tensor([0.3, 0.3, 0.01], dtype=torch.float64),
                        torch.zeros(3), torch.tensor([0.5, 0.5, 8.0], dtype=torch.float64),
                        torch.tensor([0.5, 2.0, 0.5], dtype=torch.float64))
    assert reliability_switch(stats, 3.0, 1.0, "sensitive_and_weak").tolist() == [True, False, False]
    assert reliability_switch(stats, 3.0, 1.0, "sensitive_or_weak").tolist() == [True, True, True]


def test_layer_keep_meets_the_budget_from_store_rows():
    from fang.methods.gprune import layer_keep

    m, w_gate, w_up, w_down, _ = planted_layer((0.0, 0.5))
    r = analyze(m, w_gate, w_up, w_down)
    keep = layer_keep(r.modules.numpy(), r.score.numpy(), r.stats.drift.numpy(), 30, gamma=0.2)
    assert int(keep.sum()) == 30
    unstable = int(r.modules[2 * PER])
    kept_frac = [float(keep[r.modules == c].double().mean()) for c in range(3)]
    assert kept_frac[unstable] == min(kept_frac)  # the drifting module gives up the most
    # inside a module the kept neurons are its best-scored ones
    c = int(r.modules[0])
    idx = (r.modules == c).nonzero().flatten()
    kept, dropped = r.score[idx][keep[idx]], r.score[idx][~keep[idx]]
    assert kept.min() >= dropped.max()


def test_null_tau_standard_error_matches_independent_random_rankings():
    # sources that rank a module's neurons independently: the mean tau's spread is what the formula says
    g = torch.Generator().manual_seed(0)
    size, n_src, trials = 12, 5, 3000
    taus = torch.tensor([mean_kendall_tau(torch.rand(n_src, size, generator=g)) for _ in range(trials)])
    se = float(null_tau_se(torch.tensor([size]), n_src)[0])
    assert abs(float(taus.mean())) < 3 * se / trials ** 0.5
    assert abs(float(taus.std()) / se - 1) < 0.06  # ~2.6% sampling error of a std over 3000 trials
    assert null_tau_se(torch.tensor([1]), n_src)[0] == float("inf")  # one neuron: nothing to rank
