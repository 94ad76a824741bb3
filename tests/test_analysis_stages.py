"""The ica and gprune_modules stages end to end on a tiny random LLaMA and a tiny three-topic corpus."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
import zarr

from conftest import tiny_model
from helpers_tokenizer import tiny_tokenizer

TOPICS = ("People", "Geography", "Mathematics")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A project folder with a tiny model, a corpus split and a calibration set (6 x 40 tokens)."""
    import os

    from stages import calibrate

    root = tmp_path_factory.mktemp("analysis")
    model = tiny_model(6, 3, layers=3)
    model.save_pretrained(root / "artifacts/model")
    tiny_tokenizer().save_pretrained(root / "artifacts/model")
    rows = [{"id": f"{t} {i}", "title": f"{t} {i}", "topic": t,
             "text": f"The {t.lower()} number {i} is {'ab' * (i % 5)} and {t[:3]} {i * 7}."}
            for t in TOPICS for i in range(12)]
    (root / "artifacts/data").mkdir(parents=True)
    (root / "artifacts/data/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = {"calibrate": {"n_samples": 6, "seq_len": 40},
              "capture": {"batch_size": 4, "dtype": "float32"}, "cluster": {"pca_dim": 8},
              "ica": {"n_components": 4, "n_restarts": 2, "batch_size": 4},
              "gprune": {"min_source_tokens": 16, "n_modules": 3, "batch_size": 4, "min_tau_z": 3.0}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        calibrate.run("params.yaml")
    finally:
        os.chdir(cwd)
    return root, model


def test_ica_stage_writes_zscored_maps_and_their_scores(tree, monkeypatch):
    from fang.analysis.ica import neuron_score
    from stages import ica

    root, model = tree
    monkeypatch.chdir(root)
    ica.run("params.yaml")
    store = zarr.open_group(str(root / "artifacts/ica.zarr"), mode="r")
    assert store.attrs["kind"] == "ica"
    maps, score = store["maps"][:], store["neuron_score"][:]
    assert maps.shape == (3, 4, 128) and score.shape == (3, 64)
    assert np.allclose(maps.mean(2), 0, atol=1e-4) and np.allclose(maps.std(2, ddof=1), 1, atol=1e-3)
    for li in range(3):
        assert np.allclose(score[li], neuron_score(torch.from_numpy(maps[li])).numpy())
    summary = json.loads((root / "artifacts/metrics/ica.json").read_text())
    assert [x["layer"] for x in summary["layers"]] == [0, 1, 2]
    assert all(0 < x["explained_variance"] <= 1 for x in summary["layers"])
    assert not list(root.glob("artifacts/.ica.zarr.tmp-*"))  # the temp store was renamed into place


def test_gprune_stage_streams_per_topic_statistics_and_writes_modules(tree, monkeypatch):
    from safetensors.torch import load_file

    from fang.analysis.gprune import SourceMoments, source_scores
    from fang.data.sources import token_topics
    from stages import gprune_modules

    root, model = tree
    monkeypatch.chdir(root)
    gprune_modules.run("params.yaml")
    store = zarr.open_group(str(root / "artifacts/gprune.zarr"), mode="r")
    ids = load_file(root / "artifacts/calib/calib.safetensors")["input_ids"]
    meta = json.loads((root / "artifacts/calib/calib.json").read_text())
    rows = [json.loads(line) for line in (root / "artifacts/data/train.jsonl").read_text().splitlines()]
    topics = token_topics(ids, meta["window_articles"], rows, tiny_tokenizer())
    # the sources are the topics with at least gprune.min_source_tokens calibration tokens
    names = list(store.attrs["sources"])
    assert names == sorted(t for t in set(topics) if topics.count(t) >= 16) and len(names) >= 2
    s = len(names)
    modules, size = store["modules"][:], store["module_size"][:]
    assert modules.shape == (3, 64) and (size.sum(1) == 64).all()
    assert store["switched"].dtype == bool and store["ranks"].shape == (3, s, 64)

    # the streamed per-source scores equal those of a plain full-model forward with hooks
    src = torch.tensor([names.index(t) if t in names else -1 for t in topics])
    seen = {}
    mlp = model.model.layers[2].mlp
    hook = mlp.down_proj.register_forward_pre_hook(lambda _m, a: seen.__setitem__("h", a[0]))
    with torch.no_grad():
        model(ids)
    hook.remove()
    m = SourceMoments(s, 64)
    m.add(seen["h"].reshape(-1, 64), src)
    expected = source_scores("wanda_sp", m, mlp.down_proj.weight)
    assert np.allclose(store["source_scores"][2], expected.numpy(), rtol=1e-4, atol=1e-6)

    summary = json.loads((root / "artifacts/metrics/gprune.json").read_text())
    assert list(summary["sources"]) == names
    assert sum(summary["sources"].values()) + summary["unused_tokens"] == ids.numel()


def test_token_topics_catch_a_changed_corpus(tree):
    from safetensors.torch import load_file

    from fang.core.errors import FangError
    from fang.data.sources import source_index, token_topics

    root, _ = tree
    ids = load_file(root / "artifacts/calib/calib.safetensors")["input_ids"]
    meta = json.loads((root / "artifacts/calib/calib.json").read_text())
    rows = [json.loads(line) for line in (root / "artifacts/data/train.jsonl").read_text().splitlines()]
    for r in rows:
        r["text"] = r["text"].upper()
    with pytest.raises(FangError, match="do not reproduce the calibration set"):
        token_topics(ids, meta["window_articles"], rows, tiny_tokenizer())
    with pytest.raises(FangError, match="at least 2 calibration sources"):
        source_index(["People"] * 50, [], 16)
    with pytest.raises(FangError, match="have no calibration tokens"):
        source_index(["People"] * 50 + ["Geography"] * 50, ["Art"], 16)


def test_gprune_stage_falls_back_to_shards_of_a_one_topic_calibration(tree, monkeypatch, tmp_path):
    from fang.data.sources import shard_sources
    from stages import gprune_modules

    root, _ = tree
    monkeypatch.chdir(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["gprune"]["min_source_tokens"] = 10_000  # no topic qualifies: as if calibrated on one topic
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    gprune_modules.run(str(tmp_path / "p.yaml"))
    store = zarr.open_group(str(root / "artifacts/gprune.zarr"), mode="r")
    assert store.attrs["source_kind"] == "shards" and store.attrs["sources"] == ["shard0", "shard1", "shard2", "shard3"]
    assert store.attrs["source_tokens"] == [80, 40, 80, 40]  # 6 windows of 40 tokens in 4 contiguous shards
    ids, names = shard_sources(6, 40)
    assert ids.tolist() == [0] * 80 + [1] * 40 + [2] * 80 + [3] * 40 and len(names) == 4
    assert shard_sources(1, 10)[0].tolist() == [0] * 5 + [1] * 5


def test_ica_fn_ranked_and_gprune_prune_from_the_stores_of_the_stages(tree, monkeypatch):
    """The stage path of the two methods: stores written by the stages, pruned with `fang prune --out`, reloaded.
    The main job refuses them: its prune stage does not list the studies' stores as deps."""
    from fang.core.errors import FangError
    from fang.model.shrink import load_pruned
    from stages import capture, gprune_modules, ica, prune

    root, model = tree
    monkeypatch.chdir(root)
    capture.run("params.yaml")
    ica.run("params.yaml")
    gprune_modules.run("params.yaml")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    for method in ("ica_fn_ranked", "gprune"):
        prune.run("params.yaml", method=method, sparsity=0.3, out=f"artifacts/sweep/{method}-0.3")
        report = json.loads((root / f"artifacts/sweep/{method}-0.3.prune.json").read_text())
        assert report["method"] == method and abs(report["achieved_sparsity"] - 0.3) < 0.1
        pruned, _ = load_pruned(root / f"artifacts/sweep/{method}-0.3")
        assert [layer.mlp.down_proj.in_features for layer in pruned.model.layers] == [e["ffn"] for e in report["layers"]]
        with torch.no_grad():
            assert torch.isfinite(pruned(ids).logits).all()
        with pytest.raises(FangError, match="which the main pipeline does not build"):
            prune.run("params.yaml", method=method, sparsity=0.3)
