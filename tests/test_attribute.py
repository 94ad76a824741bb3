"""Neuron semantic attribution: planted topic-selective neurons are found, removal arithmetic is exact,
kept neurons survive save/load, correlation intervals behave, and the CLI views work on tiny artifacts."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import tiny_model
from fang.analysis.attribute import (
    Accumulator,
    NO_LABEL,
    attribute,
    bh_adjust,
    match_rows,
    removal_by_topic,
    removed_mask,
    token_articles,
)
from fang.core.errors import FangError
from fang.evaluation.removal import (
    CellRemoval,
    fisher_interval,
    plot_removal_correlation,
    removal_correlations,
    removal_markdown,
    topic_correlation,
)
from fang.model.shrink import KEPT_ATTR, load_pruned, save_pruned, shrink_mlp
from helpers_tokenizer import tiny_tokenizer

TOPICS = ["Art", "Maths", "Sport"]


# --------------------------------------------------------------------------------------- planted activations


def planted(seed: int = 0):
    """12 articles (4 per topic) of 50 tokens; |h| ~ U(0.5, 1.5), neuron 5 x4 on Maths, neuron 9 x3 on Sport,
    and one spike on neuron 3 at token 333."""
    rng = np.random.default_rng(seed)
    n_art, per, n = 12, 50, 16
    article = np.repeat(np.arange(n_art), per)
    topic_of_article = np.arange(n_art) % 3
    topic = topic_of_article[article]
    h = rng.uniform(0.5, 1.5, size=(article.size, n)) * rng.choice([-1, 1], size=(article.size, n))
    h[topic == 1, 5] *= 4
    h[topic == 2, 9] *= 3
    h[333, 3] = 50.0
    return torch.tensor(h, dtype=torch.float32), article, topic_of_article, topic


def accumulate(h: torch.Tensor, article: np.ndarray, n_articles: int, batch: int = 64, top_k: int = 4) -> Accumulator:
    acc = Accumulator(1, h.shape[1], n_articles, top_k)
    art, flat = torch.as_tensor(article), torch.arange(h.shape[0])
    for s in range(0, h.shape[0], batch):  # in batches, so the running top-k merge is exercised
        acc.add(0, h[s:s + batch], art[s:s + batch], flat[s:s + batch])
    return acc


def test_planted_topic_neurons_are_found_and_only_they():
    h, article, topic_of_article, topic = planted()
    acc = accumulate(h, article, 12)
    assert acc.counts.tolist() == [50] * 12
    att = attribute(acc.sums.numpy(), acc.counts.numpy(), topic_of_article, TOPICS, min_tokens=100, min_articles=3)
    # exact selectivity of the planted neuron: mean |h| on Maths / mean over all tokens
    a = h.abs().double().numpy()
    assert att.selectivity[0, 1, 5] == pytest.approx(a[topic == 1, 5].mean() / a[:, 5].mean(), rel=1e-5)
    assert att.selectivity[0, 1, 5] == pytest.approx(4 / (4 / 3 + 2 / 3), abs=0.1)  # x4 on a third of the tokens
    labels = {j: int(att.label[0, j]) for j in range(16) if att.label[0, j] != NO_LABEL}
    assert labels == {5: 1, 9: 2}
    assert att.selective[0, :, 5].tolist() == [False, True, False]
    # the spike is neuron 3's hardest context; neuron 5's top contexts are all Maths tokens
    assert acc.top_index[0, 0, 3] == 333 and acc.top_value[0, 0, 3] == 50.0
    assert all(topic[i] == 1 for i in acc.top_index[0, :, 5].tolist())
    assert (acc.top_value[0, :, 5].abs().diff() <= 0).all()  # sorted, hardest first


def test_sequences_give_one_top_context_each():
    """Given [sequences, L, n], a neuron's top contexts come from different windows, skipped tokens never."""
    h = torch.zeros(3, 5, 2)
    h[0, :, 0] = torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0])  # window 0's first token is skipped below
    h[1, 2, 0] = -4.0
    h[2, 4, 0] = 1.0
    article = torch.zeros(3, 5, dtype=torch.long)
    article[:, 0] = -1
    acc = Accumulator(1, 2, 1, top_k=3)
    acc.add(0, h, article, torch.arange(15).view(3, 5))
    assert acc.top_index[0, :, 0].tolist() == [1, 7, 14]  # 8 (window 0, pos 1), -4 (window 1), 1 (window 2)
    assert acc.top_value[0, :, 0].tolist() == [8.0, -4.0, 1.0]
    assert acc.counts.tolist() == [12]


def test_shuffled_topics_find_far_fewer_selective_neurons():
    from fang.analysis.attribute import permutation_null

    h, article, topic_of_article, _ = planted()
    acc = accumulate(h, article, 12)
    args = (acc.sums.numpy(), acc.counts.numpy(), topic_of_article, TOPICS)
    real = attribute(*args, min_tokens=100, min_articles=3).selective.sum()
    null = permutation_null(*args, n_perm=5, min_tokens=100, min_articles=3)
    assert real == 2 and len(null) == 5 and max(null) < real


def test_guard_drops_topics_with_too_few_articles():
    h, article, topic_of_article, _ = planted()
    acc = accumulate(h, article, 12)
    att = attribute(acc.sums.numpy(), acc.counts.numpy(), topic_of_article, TOPICS, min_tokens=100, min_articles=5)
    assert att.guarded.tolist() == [True, True, True]  # 4 articles per topic < 5
    assert np.isnan(att.selectivity).all() and not att.selective.any() and (att.label == NO_LABEL).all()


def test_skipped_tokens_are_not_counted():
    h, article, _, _ = planted()
    article = article.copy()
    article[:10] = -1
    acc = accumulate(h, article, 12)
    assert acc.counts[0] == 40
    assert acc.sums[0, 0].numpy() == pytest.approx(h[10:50].abs().double().sum(0).numpy())


def test_bh_adjust_matches_hand_computation():
    p = np.array([0.01, 0.04, 0.03, np.nan, 0.5])
    # sorted 0.01, 0.03, 0.04, 0.5 over m = 4: 0.04, 0.06, 0.0533 -> monotone 0.04, 0.0533, 0.0533, 0.5
    assert np.allclose(bh_adjust(p), [0.04, 0.16 / 3, 0.16 / 3, np.nan, 0.5], equal_nan=True)


def test_token_articles_rebuilds_the_stream_and_rejects_a_mismatch():
    toks = {"a": [1, 2, 3, 0], "b": [4, 5, 0], "c": [6, 7, 8, 9, 0]}
    ids = np.array([[1, 2, 3, 0], [4, 5, 0, 6]])
    owner, articles = token_articles(ids, [["a"], ["b", "c"]], toks)
    assert articles == ["a", "b", "c"] and owner.tolist() == [[0, 0, 0, 0], [1, 1, 1, 2]]
    with pytest.raises(FangError, match="does not match its recorded articles"):
        token_articles(ids, [["a"], ["c", "b"]], toks)


# ------------------------------------------------------------------------------------------- tiny model


@torch.no_grad()
def test_stream_on_a_tiny_model_finds_a_planted_neuron():
    """Topic 0's articles use tokens 10..29, topic 1's 60..79. Token embeddings of topic 0 carry +4 in
    hidden dimension 0 (others 0), attention in block 0 writes nothing, and neuron 7 of block 0 reads
    only dimension 0: it fires on topic 0 and is silent elsewhere."""
    from fang.analysis.attribute import stream_activations

    model = tiny_model(layers=2)
    emb = model.model.embed_tokens.weight
    emb[:, 0] = 0.0
    emb[10:30, 0] = 4.0
    layer = model.model.layers[0]
    layer.self_attn.o_proj.weight.zero_()
    for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
        proj.weight[7] = 0.0
        proj.weight[7, 0] = 3.0
    g = torch.Generator().manual_seed(0)
    n_art, per = 8, 24
    topic_of_article = np.arange(n_art) % 2
    ids = torch.cat([torch.randint(10 + 50 * t, 30 + 50 * t, (per,), generator=g) for t in topic_of_article])
    ids = ids.view(4, 48)
    owner = np.repeat(np.arange(n_art), per).reshape(4, 48)
    acc = stream_activations(model, ids, owner, n_art, batch_size=3, top_k=5, device="cpu")
    att = attribute(acc.sums.numpy(), acc.counts.numpy(), topic_of_article, ["A", "B"], min_tokens=50, min_articles=3)
    assert att.label[0, 7] == 0 and att.selective[0, 0, 7]
    assert int(np.nanargmax(att.selectivity[0, 0])) == 7  # the most selective neuron of block 0 for topic A
    assert att.selectivity[0, 0, 7] > 1.9  # nearly all its mass is on A, half the tokens
    tops = acc.top_index[0, :, 7].numpy()
    assert tops[-1] == -1 and sorted(tops[:4] // 48) == [0, 1, 2, 3]  # one context per window, 4 windows
    assert all(topic_of_article[owner.reshape(-1)[t]] == 0 for t in tops[:4])


# -------------------------------------------------------------------------------------------- removal


def test_removal_by_topic_arithmetic_is_exact():
    # 2 layers, 2 topics, 4 neurons
    selective = np.zeros((2, 2, 4), dtype=bool)
    selective[0, 0, [0, 1]] = True  # topic 0: layer 0 neurons 0, 1; layer 1 neuron 2
    selective[1, 0, 2] = True
    selective[1, 1, 3] = True  # topic 1: layer 1 neuron 3
    removed = removed_mask([[1, 2, 3], [0, 1, 3]], 4)  # layer 0 removes neuron 0, layer 1 removes neuron 2
    assert removed.tolist() == [[True, False, False, False], [False, False, True, False]]
    m = np.zeros((2, 2, 4))
    m[0, 0] = [1, 1, 1, 1]
    m[1, 0] = [0, 0, 3, 1]
    m[0, 1] = [2, 0, 0, 2]
    m[1, 1] = [1, 1, 1, 1]
    r = removal_by_topic(selective, m, removed)
    assert r["selective"].tolist() == [3, 1] and r["selective_removed"].tolist() == [2, 0]
    assert r["selective_removed_fraction"][0] == 2 / 3 and r["selective_removed_fraction"][1] == 0.0
    # topic 0: layer 0 loses 1/4, layer 1 loses 3/4 -> mean 1/2; topic 1: 2/4 and 1/4 -> 3/8
    assert r["mass_lost_by_layer"].tolist() == [[0.25, 0.5], [0.75, 0.25]]
    assert r["mass_lost"].tolist() == [0.5, 0.375]
    assert float(r["removed_fraction"]) == 0.25


def test_removed_mask_rejects_out_of_range():
    with pytest.raises(FangError, match="out of range"):
        removed_mask([[0, 4]], 4)


def test_kept_neurons_are_recorded_composed_and_reloaded(tmp_path):
    model = tiny_model()
    dense_gate = model.model.layers[0].mlp.gate_proj.weight.detach().clone()
    mlp = model.model.layers[0].mlp
    shrink_mlp(mlp, torch.tensor([40, 3, 10, 20, 63]))
    shrink_mlp(mlp, torch.tensor([0, 2, 4]))  # of the kept [3, 10, 20, 40, 63]: 3, 20, 63
    assert getattr(mlp, KEPT_ATTR).tolist() == [3, 20, 63]
    save_pruned(model, tiny_tokenizer(), tmp_path / "m")
    layers = json.loads((tmp_path / "m/structure.json").read_text())["layers"]
    assert layers[0][KEPT_ATTR] == [3, 20, 63] and KEPT_ATTR not in layers[1]
    reloaded, _ = load_pruned(tmp_path / "m")
    assert getattr(reloaded.model.layers[0].mlp, KEPT_ATTR).tolist() == [3, 20, 63]
    # the fallback for older checkpoints finds the same neurons from the weights
    pruned_gate = reloaded.model.layers[0].mlp.gate_proj.weight.detach().numpy()
    assert match_rows(dense_gate.numpy(), pruned_gate).tolist() == [3, 20, 63]


# ----------------------------------------------------------------------------------------- correlation


def test_correlation_intervals_are_sane():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, 12)
    strong = topic_correlation(x[None], (2 * x + rng.normal(0, 0.05, 12))[None], n_boot=500)
    assert strong["r"] > 0.95 and strong["low"] <= strong["r"] <= strong["high"] <= 1.0
    assert strong["fisher_low"] <= strong["r"] <= strong["fisher_high"] and strong["topics"] == 12
    noise = topic_correlation(x[None], rng.normal(size=12)[None], n_boot=500)
    assert noise["low"] < 0 < noise["high"] and noise["high"] - noise["low"] > 0.5
    # Fisher interval of r = 0.5 with n = 12: tanh(atanh(0.5) -+ 1.96 / 3)
    low, high = fisher_interval(0.5, 12)
    assert low == pytest.approx(math.tanh(math.atanh(0.5) - 1.959964 / 3), abs=1e-5)
    assert high == pytest.approx(math.tanh(math.atanh(0.5) + 1.959964 / 3), abs=1e-5)


def test_pooled_correlation_ignores_offsets_between_models_and_drops_nan_topics():
    x = np.array([0.1, 0.2, 0.3, 0.4, 0.5, np.nan])
    y = 3 * x
    pooled = topic_correlation(np.stack([x, x + 10]), np.stack([y, y - 7]), n_boot=200)
    assert pooled["r"] == pytest.approx(1.0) and pooled["topics"] == 5 and pooled["cells"] == 2
    assert math.isnan(pooled["fisher_low"])  # Fisher only for one model's independent pairs


def test_bias_section_markdown_and_figure(tmp_path):
    topics = [f"T{i}" for i in range(6)]
    frac = dict(zip(topics, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]))
    cells = [CellRemoval("obc", src, 0.3, frac, frac, {t: 0.5 * v for t, v in frac.items()}) for src in ("all", "People")]
    cells.append(CellRemoval("flap", "all", 0.3, frac, frac, {t: 1.0 - v for t, v in frac.items()}))
    section = removal_correlations(cells, topics, n_boot=200)
    by = {m["method"]: m for m in section["methods"]}
    assert by["obc"]["models"] == 2 and by["obc"]["removed"]["r"] > 0.99 and by["flap"]["removed"]["r"] < -0.99
    md = "\n".join(removal_markdown(section))
    assert "| obc | 2 | 6 | +1.00" in md and "| flap | all | 30% |" in md
    assert removal_markdown(None) == []
    plot_removal_correlation(section, cells, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000


# ------------------------------------------------------------------------------------------ stage + CLI


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny project: model, a 3-topic corpus split, a calibration set and its attribution."""
    import stages.attribute as stage
    import stages.calibrate as calibrate

    root = tmp_path_factory.mktemp("attr")
    art = root / "artifacts"
    model = tiny_model(layers=2)
    model.save_pretrained(art / "model")
    tiny_tokenizer().save_pretrained(art / "model")
    words = {"Art": "paint brush canvas", "Maths": "12 + 7 = 19", "Sport": "goal team kick"}
    rows = [{"id": f"{t}{i}", "title": f"{t}{i}", "topic": t, "text": f"{words[t]} {i} " * 4}
            for t in words for i in range(8)]
    (art / "data").mkdir()
    (art / "data/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = {"calibrate": {"n_samples": 8, "seq_len": 64, "seed": 0},
              "attribute": {"batch_size": 3, "top_k": 4, "min_tokens": 20, "min_articles": 2, "n_boot": 200}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        calibrate.run("params.yaml")
        stage.run("params.yaml")
    return root


def test_stage_writes_consistent_store_and_summary(project):
    import zarr

    store = zarr.open_group(str(project / "artifacts/attribution.zarr"), mode="r")
    calib = json.loads((project / "artifacts/calib/calib.json").read_text())
    topic_of = {json.loads(line)["id"]: json.loads(line)["topic"]
                for line in (project / "artifacts/data/train.jsonl").read_text().splitlines()}
    topics = list(store.attrs["topics"])
    assert topics == ["Art", "Maths", "Sport"] and store["selectivity"].shape == (2, 3, 64)
    token_topic = store["token_topic"][:]
    assert (token_topic[:, 0] == -1).all()  # skip_first = 1
    # window 0's second token belongs to the first article of the window
    assert topics[token_topic[0, 1]] == topic_of[calib["window_articles"][0][0]]
    assert store["topic_tokens"][:].sum() == 8 * 63
    assert store["article_tokens"][:].sum() == 8 * 63 and store["article_abs_sum"].shape[:2] == (2, store["article_topic"].shape[0])
    summary = json.loads((project / "artifacts/attribution.json").read_text())
    assert [t["topic"] for t in summary["topics"]] == topics
    assert sum(t["tokens"] for t in summary["topics"]) == 8 * 63
    assert len(summary["null_selective_pairs"]) == 5
    top = store["top_index"][0, 5]
    assert ((top >= 0) & (top % 64 != 0)).all()  # never a skipped window start


def test_inspect_neurons_views(project, tmp_path):
    from fang.tools.inspection.cli import app

    runner = CliRunner()
    a = str(project / "artifacts")
    res = runner.invoke(app, ["neurons", "--layer", "0", "--neuron", "5", "-a", a, "--png", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "layer 0, neuron 5" in res.output and "⟦" in res.output and "selectivity" in res.output
    assert (tmp_path / "neuron_l0_n5.png").stat().st_size > 1000
    res = runner.invoke(app, ["neurons", "--layer", "-1", "--topic", "Maths", "--top", "3", "-a", a])
    assert res.exit_code == 0, res.output
    assert "layer 1, topic Maths" in res.output
    res = runner.invoke(app, ["neurons", "--layer", "0", "-a", a])
    assert res.exit_code == 0 and "Sport" in res.output
    res = runner.invoke(app, ["neurons", "--layer", "0", "--topic", "Cooking", "-a", a])
    assert isinstance(res.exception, FangError) and "unknown topic 'Cooking'" in str(res.exception)


def test_attribute_removed_writes_exact_fractions_beside_the_evaluation(project, monkeypatch):
    import zarr

    from fang.model.modeling import load_dense
    from stages.attribute import run_removed

    monkeypatch.chdir(project)
    model, tok = load_dense("artifacts/model")
    keep = [np.arange(0, 64, 2), np.arange(32)]  # layer 0 keeps even neurons, layer 1 the first half
    for layer, k in zip(model.model.layers, keep):
        shrink_mlp(layer.mlp, torch.as_tensor(k))
    save_pruned(model, tok, "artifacts/sweep/x-0.3")
    topics = ["Art", "Maths", "Sport"]
    Path("artifacts/metrics").mkdir(parents=True, exist_ok=True)
    Path("artifacts/metrics/dense.json").write_text(json.dumps({"ppl_by_topic": dict.fromkeys(topics, 10.0)}))
    Path("artifacts/sweep/x-0.3.metrics.json").write_text(json.dumps({"ppl_by_topic": dict(zip(topics, [11.0, 20.0, 15.0]))}))
    run_removed("params.yaml", "artifacts/sweep/x-0.3")
    out = json.loads(Path("artifacts/sweep/x-0.3.attribution.json").read_text())
    store = zarr.open_group("artifacts/attribution.zarr", mode="r")
    expected = removal_by_topic(store["selective"][:], store["topic_mean_abs"][:], removed_mask(keep, 64))
    assert out["kept_from"] == "structure.json" and out["removed_fraction"] == 0.5
    assert out["removed_by_layer"] == [32, 32]
    for k, t in enumerate(topics):
        assert out["topics"][t]["mass_lost"] == pytest.approx(expected["mass_lost"][k], rel=1e-12)
        assert out["topics"][t]["selective_removed"] == expected["selective_removed"][k]
    assert out["ppl_log_ratio"]["Maths"] == pytest.approx(math.log(2.0))
    assert set(out["correlation"]) == {"removed", "mass_lost"}
    # inspect names the models that removed a neuron: layer 0 keeps even neurons only
    from fang.tools.inspection.neurons import removed_by

    assert removed_by(Path("artifacts"), 0, 3, 64) == [("sweep/x-0.3", True)]
    assert removed_by(Path("artifacts"), 0, 4, 64) == [("sweep/x-0.3", False)]


def test_bias_report_stage_adds_the_attribution_section_for_attributed_models(tmp_path, monkeypatch):
    """Two bias-study models, one with an attribution file: only that one enters the section and figure."""
    import stages.bias_report as stage

    monkeypatch.chdir(tmp_path)
    topics = ["A", "B", "C", "D"]
    task = {"acc": 0.5, "acc_stderr": 0.05, "acc_norm": 0.5, "acc_norm_stderr": 0.05, "n": 100}
    dense = {"ppl": 10.0, "ppl_by_topic": dict.fromkeys(topics, 10.0), "tasks": {"t": task}}
    Path("artifacts/metrics").mkdir(parents=True)
    Path("artifacts/metrics/dense.json").write_text(json.dumps(dense))
    cell = Path("artifacts/bias_sweep/all")
    cell.mkdir(parents=True)
    for method, ppl in (("obc", [11.0, 12.0, 13.0, 14.0]), ("flap", [12.0, 12.0, 12.0, 12.0])):
        (cell / f"{method}-0.3.metrics.json").write_text(json.dumps(
            {**dense, "ppl": 12.0, "ppl_by_topic": dict(zip(topics, ppl))}))
    removed = dict(zip(topics, [0.1, 0.2, 0.3, 0.5]))
    (cell / "obc-0.3.attribution.json").write_text(json.dumps({"topics": {
        t: {"selective_removed_fraction": v, "mass_lost": v / 2} for t, v in removed.items()}}))
    params = {"bias": {"sources": ["all"], "methods": ["obc", "flap"], "sparsities": [0.3]},
              "attribute": {"n_boot": 200}}
    Path("params.yaml").write_text(yaml.safe_dump(params))
    stage.run("params.yaml")
    result = json.loads(Path("artifacts/bias_report/bias.json").read_text())
    section = result["attribution"]
    assert [m["method"] for m in section["methods"]] == ["obc"] and section["methods"][0]["removed"]["r"] > 0.9
    assert "Does losing a topic's neurons predict losing the topic?" in Path("artifacts/bias_report/bias.md").read_text()
    assert Path("artifacts/bias_report/attribution_correlation.png").stat().st_size > 1000


@pytest.mark.parametrize("raw, message", [
    ({"fdr": 2.0}, "attribute.fdr=2.0 must be in"),
    ({"min_articles": 1}, "min_articles >= 2"),
    ({"top_k": "many"}, "attribute.top_k='many' has the wrong type"),
    ({"bins": 3}, "unknown key(s) in params block 'attribute': bins"),
])
def test_bad_attribute_params_are_named(raw, message):
    from fang.core.params import AttributeParams, parse_block

    with pytest.raises(FangError, match=re.escape(message)):
        parse_block("attribute", raw, AttributeParams)
