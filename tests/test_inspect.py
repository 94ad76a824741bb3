"""`fang inspect`: every view on tiny hand-made artifacts, the PNG plots, and the missing-artifact errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_model
from fang.analysis.capture import capture_features
from fang.analysis.store import write_store
from fang.core.errors import FangError
from fang.tools.inspection.cli import app
from fang.tools.inspection.clusters import cluster_tokens, pick_samples
from fang.tools.inspection.groups import layer_groups
from helpers_tokenizer import tiny_tokenizer

# 4 calibration sequences of 16 characters = 16 tokens each (the tiny tokenizer is per character)
TEXTS = ["ab 1 cd 2 ef 3 g", "hi 4 jk 5 lm 6 n", "op 7 qr 8 st 9 u", "vw x yz a bc d e"]
K, N_FFN, SHARED = 3, 64, 3  # group id K = shared


def digit_layer(text: str) -> list[int]:
    # layer 0: digits -> cluster 1, spaces -> cluster 2, everything else -> cluster 0
    return [1 if ch.isdigit() else 2 if ch == " " else 0 for ch in text]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inspect") / "artifacts"
    tok = tiny_tokenizer()
    tok.save_pretrained(root / "model")
    ids = torch.tensor([tok.convert_tokens_to_ids(list(t)) for t in TEXTS])
    capture_features(tiny_model(), ids, root / "capture.zarr", batch_size=2)

    labels = np.stack([
        np.concatenate([digit_layer(t) for t in TEXTS]),
        np.arange(ids.numel()) % K,  # layer 1: position-based
    ]).astype(np.int32)
    sizes = np.stack([np.bincount(row, minlength=K) for row in labels]).astype(np.int64)
    write_store(root / "cluster.zarr", "cluster",
                {"token_clusters": labels, "cluster_sizes": sizes, "inertia": np.array([1.25, 2.5])},
                {"k": K, "pca_dim": 4, "seed": 0, "n_layers": 2})

    # neuron j belongs to group j % 4 (3 = shared); S[c, j] = (j + 1) on its own cluster, 0.1 (j + 1) elsewhere
    j = np.arange(N_FFN)
    groups = np.stack([j % 4, j % 4]).astype(np.int32)
    own = (j % 4)[None, :] == np.arange(K)[:, None]
    s = np.where(own, 1.0, 0.1) * (j + 1)
    scores = np.stack([s, 2 * s]).astype(np.float32)
    write_store(root / "taylor.zarr", "taylor",
                {"scores": scores, "token_counts": sizes, "block_sensitivity": np.ones(2, np.float32)}, {"k": K})
    write_store(root / "groups.zarr", "groups", {"neuron_groups": groups}, {"k": K, "method": "lap", "seed": 0})
    (root / "metrics").mkdir()
    (root / "metrics/groups.json").write_text(json.dumps(
        {"layers": [{"layer": 0, "gain_over_greedy": 0.0123}, {"layer": 1, "gain_over_greedy": 0.0}]}))
    (root / "block_sparsity.json").write_text(json.dumps({"mode": "fc", "by_target": {
        "0.3": {"attn_sparsity": [0.375, 0.225], "ffn_sparsity": [0.375, 0.225], "mean_sparsity": 0.3}}}))
    (root / "allocate.json").write_text(json.dumps({
        "mode": "fc", "max_sparsity": 0.95, "functional_complexity": [0.1234, 0.4321], "scores": [0.1234, 0.4321],
    }))
    return root


def run(*args: str):
    # wide terminal so rich never shortens numbers with an ellipsis
    return CliRunner(env={"COLUMNS": "220"}).invoke(app, list(args))


# ---------------------------------------------------------------------------- sampling


def test_pick_samples_is_deterministic_and_spread_over_sequences():
    seq_len = 10
    labels = np.zeros(50, dtype=np.int64)  # 5 sequences
    labels[[1, 2, 3, 4, 5, 21, 22, 41]] = 7
    picks = pick_samples(labels, 7, seq_len, 3)
    assert np.array_equal(picks, pick_samples(labels, 7, seq_len, 3))
    assert set((picks // seq_len).tolist()) == {0, 2, 4}  # one per sequence before any repeats
    assert (labels[picks] == 7).all()
    assert picks[0] == 3  # the middle occurrence of sequence 0, not its first
    many = pick_samples(labels, 7, seq_len, 100)
    assert sorted(many.tolist()) == [1, 2, 3, 4, 5, 21, 22, 41]  # capped at the cluster's size
    assert pick_samples(labels, 3, seq_len, 5).size == 0


# ------------------------------------------------------------------------------- views


def test_clusters_table_and_heatmap(root, tmp_path):
    res = run("clusters", "--artifacts", str(root), "--png", str(tmp_path / "png"))
    assert res.exit_code == 0, res.output
    sizes = np.bincount(np.concatenate([digit_layer(t) for t in TEXTS]), minlength=K)
    assert sizes.tolist() == [31, 9, 24]
    row0 = next(line for line in res.output.splitlines() if line.strip("│┃ ").startswith("0 "))
    for v in ["31", "9", "24", f"{9 / 64:.1%}", f"{31 / 64:.1%}", "1.25"]:
        assert v in row0
    assert "k=3" in res.output and "64 calibration tokens" in res.output
    assert (tmp_path / "png/cluster_sizes.png").stat().st_size > 1000


def test_tokens_show_highlighted_digits_in_context(root):
    res = run("tokens", "--artifacts", str(root), "--layer", "0", "--cluster", "1", "--samples", "4", "--context", "3")
    assert res.exit_code == 0, res.output
    assert "9 of 64 tokens" in res.output and "in 3 of 4 sequences" in res.output
    marked = [line for line in res.output.splitlines() if "⟦" in line]
    assert len(marked) == 4
    for line in marked:
        token = line.split("⟦")[1].split("⟧")[0]
        assert token.isdigit()
    # the context is the sequence's own text around the token, ±3 tokens
    ct = cluster_tokens(root, 0, 1, samples=4, context=3)
    assert len({s.seq for s in ct.samples}) == 3  # spread over all sequences that hold digits
    for s in ct.samples:
        text = TEXTS[s.seq]
        assert s.token == text[s.pos]
        assert s.left == text[max(0, s.pos - 3):s.pos] and s.right == text[s.pos + 1:s.pos + 4]
        assert f"{s.left}⟦{s.token}⟧{s.right}" in res.output
    # each digit occurs once: too rare to count as over-represented, so the plain counts are listed
    assert not ct.characteristic and ct.frequent and all(share == 1.0 for _, _, share in ct.frequent)
    spaces = cluster_tokens(root, 0, 2, samples=1)
    assert spaces.characteristic and spaces.frequent == [(" ", 24, 1.0)]


def test_tokens_fall_back_to_calibration_set_without_capture(root, tmp_path):
    from safetensors.torch import save_file

    alt = tmp_path / "artifacts"
    for name in ("model", "cluster.zarr"):
        shutil.copytree(root / name, alt / name)
    with pytest.raises(FangError, match=r"dvc repro capture"):
        cluster_tokens(alt, 0, 1)
    tok = tiny_tokenizer()
    (alt / "calib").mkdir()
    save_file({"input_ids": torch.tensor([tok.convert_tokens_to_ids(list(t)) for t in TEXTS])}, alt / "calib/calib.safetensors")
    assert all(s.token.isdigit() for s in cluster_tokens(alt, 0, 1).samples)


def test_groups_layer_details_and_overview(root, tmp_path):
    res = run("groups", "--artifacts", str(root), "--layer", "0", "--png", str(tmp_path))
    assert res.exit_code == 0, res.output
    # group 0 holds j = 0, 4, ..., 60: its top neurons by S[0, j] = j + 1
    assert "60:61  56:57  52:53  48:49  44:45" in res.output
    assert "62:63  58:59" in res.output  # group 2
    # shared group j = 3, 7, ..., 63 ranked by the total over clusters 0.3 (j + 1)
    assert "63:19.2  59:18" in res.output
    assert "ranked by S[g, j]" in res.output  # captions are not parsed as rich markup
    lg = layer_groups(root, 0)
    assert [g.size for g in lg.functional] == [16, 16, 16] and lg.shared.size == 16
    assert [g.tokens for g in lg.functional] == [31, 9, 24]
    assert all(g.best_fit == 1.0 for g in lg.functional)
    assert lg.gain_over_greedy == pytest.approx(0.0123)
    assert (tmp_path / "scores_layer0.png").stat().st_size > 1000

    res = run("groups", "--artifacts", str(root))
    assert res.exit_code == 0, res.output
    assert "+1.23%" in res.output and "k=3 functional groups + 1 shared" in res.output
    assert layer_groups(root, -1).layer == 1


def test_sparsity_table_and_plot(root, tmp_path):
    res = run("sparsity", "--artifacts", str(root), "--png", str(tmp_path))
    assert res.exit_code == 0, res.output
    for v in ["0.1234", "0.4321", "0.375", "0.225", "target 0.300", "mean 0.300"]:
        assert v in res.output
    assert (tmp_path / "sparsity_by_layer.png").stat().st_size > 1000


def test_all_views_and_plots(root, tmp_path):
    out = tmp_path / "plots"
    res = run("all", "--artifacts", str(root), "--layer", "0", "--samples", "2", "--png", str(out))
    assert res.exit_code == 0, res.output
    assert "skipped" not in res.output
    for c in range(K):
        assert f"layer 0, cluster {c}:" in res.output
    for name in ("cluster_sizes.png", "sparsity_by_layer.png", "scores_layer0.png"):
        assert (out / name).stat().st_size > 1000


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("args, stage", [
    (["clusters"], "dvc repro cluster"),
    (["tokens", "--layer", "0", "--cluster", "0"], "dvc repro cluster"),
    (["groups"], "dvc repro group"),
    (["sparsity"], "dvc repro allocate"),
    (["all"], "dvc repro allocate"),
])
def test_missing_artifacts_name_the_stage(tmp_path, args, stage):
    res = run(*args, "--artifacts", str(tmp_path / "nothing"))
    assert isinstance(res.exception, FangError), res.output
    assert stage in str(res.exception) and "\n" not in str(res.exception)


def test_partial_artifacts(root, tmp_path):
    alt = tmp_path / "artifacts"
    shutil.copytree(root / "groups.zarr", alt / "groups.zarr")
    with pytest.raises(FangError, match=r"taylor store not found.*dvc repro taylor"):
        layer_groups(alt, 0)
    shutil.copy(root / "allocate.json", alt / "allocate.json")
    shutil.copy(root / "block_sparsity.json", alt / "block_sparsity.json")
    res = run("all", "--artifacts", str(alt))  # only the sparsity view can run: the others are skipped
    assert res.exit_code == 0, res.output
    assert "0.4321" in res.output and "skipped: cluster store not found" in res.output
    for name in ("cluster.zarr", "capture.zarr"):
        shutil.copytree(root / name, alt / name)
    with pytest.raises(FangError, match=r"no tokenizer .*dvc repro fetch_model"):
        cluster_tokens(alt, 0, 0)


def test_out_of_range_layer_and_cluster(root):
    with pytest.raises(FangError, match=r"--layer 5 is out of range.*2 layers"):
        cluster_tokens(root, 5, 0)
    with pytest.raises(FangError, match=r"--cluster 3 is out of range.*k=3"):
        cluster_tokens(root, 0, 3)


def test_registered_in_the_fang_cli(root):
    from fang import cli

    if not any(g.name == "inspect" for g in cli.app.registered_groups):
        pytest.skip("fang.cli does not register `inspect` yet")
    res = CliRunner(env={"COLUMNS": "220"}).invoke(cli.app, ["inspect", "sparsity", "--artifacts", str(root)])
    assert res.exit_code == 0 and "0.4321" in res.output
