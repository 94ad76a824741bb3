"""Block weight streaming (model.offload, fang.model.offload): the same bits as without it, and at most
one block's weights materialized at any moment.

A streamed block that is not running holds meta tensors, so on this CPU-only machine "on the device"
is checked as "not meta" (`resident_blocks`); on a GPU the one materialized block is the one on it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_checkpoint, stage_project, tiny_model
from helpers_tokenizer import tiny_tokenizer
from method_cases import CASES, SPARSITY, calibration

from fang.analysis.capture import capture_features, open_capture
from fang.analysis.taylor import taylor_scores
from fang.core.errors import FangError
from fang.core.params import OFFLOADS, ModelParams, parse_block
from fang.methods.driver import PruneOptions, prune_model
from fang.model.layerwise import BlockRunner
from fang.model.mlp_stream import stream_mlp
from fang.model.modeling import decoder_layers, load_dense
from fang.model.offload import block_stream, gather_blocks, load_dense_offloaded, load_for_block_passes, place_model, resident_blocks
from fang.model.shrink import INDEX_FILE, load_pruned, save_pruned

MODES = ("host", "disk")
N_LAYERS = 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A dense 3-block GQA checkpoint (6 query / 3 KV heads) as fetch_model writes it."""
    return save_checkpoint(tmp_path_factory.mktemp("offload") / "model", tiny_model(6, 3, layers=N_LAYERS))


class ResidencyProbe:
    """Records, at the end of every block's forward, which blocks hold real tensors: must be that block alone.

    A forward hook, not a pre-hook: embedding a batch stops at block 0's pre-hook without running it
    (`first_block_inputs`), and needs no block weights."""

    def __init__(self, model):
        self.model, self.seen = model, []
        self.handles = [layer.register_forward_hook(lambda _m, _a, _o, i=i: self.seen.append((i, resident_blocks(model))))
                        for i, layer in enumerate(decoder_layers(model))]

    def check(self, runs_per_block: int) -> None:
        for h in self.handles:
            h.remove()
        assert self.seen, "no block ran"
        assert all(resident == [i] for i, resident in self.seen), self.seen
        assert sorted({i for i, _ in self.seen}) == list(range(N_LAYERS))
        assert len(self.seen) == runs_per_block * N_LAYERS
        assert resident_blocks(self.model) == []  # every block left the device after its turn


def test_streamed_loading_gives_the_same_weights(checkpoint):
    dense, _ = load_dense(checkpoint)
    for mode in MODES:
        model, _ = load_dense_offloaded(checkpoint, offload=mode)
        assert resident_blocks(model) == []  # nothing of the blocks is loaded up front
        assert model.model.embed_tokens.weight.device.type == "cpu"  # the non-block parts are on the device
        gather_blocks(model)
        assert resident_blocks(model) == list(range(N_LAYERS))
        want = {**dict(dense.named_parameters()), **dict(dense.named_buffers())}
        have = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        assert want.keys() == have.keys()
        assert all(torch.equal(want[k], have[k]) and want[k].dtype == have[k].dtype for k in want), mode


def test_disk_mode_reads_a_sharded_checkpoint(tmp_path):
    """A big checkpoint comes in shards (model-0000x-of-0000n.safetensors): each block is read from its own."""
    model = tiny_model(6, 3, layers=N_LAYERS)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    tiny_tokenizer().save_pretrained(tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    streamed = gather_blocks(load_dense_offloaded(tmp_path, offload="disk")[0])
    for (name, want), (_, have) in zip(model.state_dict().items(), streamed.state_dict().items()):
        assert torch.equal(want, have), name


def test_disk_mode_converts_to_the_model_dtype_like_from_pretrained(checkpoint):
    dense, _ = load_dense(checkpoint, dtype="float16")
    model = gather_blocks(load_dense_offloaded(checkpoint, dtype="float16", offload="disk")[0])
    for (name, want), (_, have) in zip(dense.state_dict().items(), model.state_dict().items()):
        assert want.dtype == have.dtype == torch.float16 and torch.equal(want, have), name
    # the rotary inv_freq is computed in __init__, not loaded: it must come out the same too
    for (name, want), (_, have) in zip(dense.named_buffers(), model.named_buffers()):
        assert want.dtype == have.dtype and torch.equal(want, have), name


def test_capture_is_identical_with_streaming(checkpoint, tmp_path):
    calib = calibration()
    stores = {}
    for mode in ("none", *MODES):
        model, _ = load_dense_offloaded(checkpoint, offload=mode)
        probe = ResidencyProbe(model) if mode != "none" else None
        capture_features(model, calib, tmp_path / f"{mode}.zarr", batch_size=4, dtype="float32",
                         pca_dim=4, keep=["block_io", "down_in"])
        if probe:
            probe.check(runs_per_block=2)  # 6 sequences in batches of 4
        stores[mode] = open_capture(tmp_path / f"{mode}.zarr")
    names = sorted(stores["none"].array_keys())
    assert {"block_io", "down_in", "ffn_proj", "fc", "pca_components"} <= set(names)
    for mode in MODES:
        assert sorted(stores[mode].array_keys()) == names
        for name in names:
            assert np.array_equal(stores[mode][name][:], stores["none"][name][:]), (mode, name)


def test_taylor_is_identical_with_streaming(checkpoint):
    calib, k = calibration(), 3
    clusters = torch.randint(0, k, (N_LAYERS, calib.numel()), generator=torch.Generator().manual_seed(2))
    results = {}
    for mode in ("none", *MODES):
        model, _ = load_dense_offloaded(checkpoint, offload=mode)
        probe = ResidencyProbe(model) if mode != "none" else None
        results[mode] = taylor_scores(model, calib, clusters, k, batch_size=4)
        if probe:
            probe.check(runs_per_block=2 * 2)  # 2 batches, each block forward once and recomputed for backward once
        assert all(p.requires_grad for p in model.parameters())  # restored after the pass
    for mode in MODES:
        for name, want in results["none"].items():
            assert torch.equal(results[mode][name], want), (mode, name)


def test_taylor_graph_blocks_with_streaming_is_an_error(checkpoint):
    # kept graphs hold their blocks' weights on the device: the memory streaming exists to avoid
    model, _ = load_dense_offloaded(checkpoint, offload="host")
    calib = calibration()
    with pytest.raises(FangError, match="graph_blocks.*model.offload"):
        taylor_scores(model, calib, torch.zeros(N_LAYERS, calib.numel(), dtype=torch.long), 2, graph_blocks=1)


class _Sums:
    def __init__(self):
        self.sums = {}

    def add(self, layer, rows, act, up):
        self.sums[layer] = self.sums.get(layer, 0) + act.double().sum() + up.double().square().sum()

    def end_layer(self, layer, mlp):
        self.sums[(layer, "w")] = mlp.down_proj.weight.double().sum()  # the block is still on the device here


def test_stream_mlp_is_identical_with_streaming(checkpoint):
    out = {}
    for mode in ("none", *MODES):
        model, _ = load_dense_offloaded(checkpoint, offload=mode)
        consumer = _Sums()
        stream_mlp(model, calibration(), consumer, batch_size=4)
        out[mode] = consumer.sums
    assert out["host"] == out["none"] == out["disk"]


PRUNE_CASES = [c for c in CASES if c[0] in ("flap", "magnitude", "obc", "o_fang")]


@pytest.mark.parametrize("case", PRUNE_CASES, ids=[c[0] for c in PRUNE_CASES])
def test_prune_saves_the_same_checkpoint_with_streaming(case, checkpoint, tmp_path):
    """flap reads every block's weights for its global search; magnitude runs no forward pass; obc and
    o_fang compensate the kept weights: the saved pruned checkpoints are the same files, byte for byte.

    A streamed model is saved as it is, in shards, one block at a time (no gather_blocks); in disk mode
    with a spill directory its pruned blocks wait there, not on the host. The in-memory model saved
    with shards=True writes the same files, and its single-file save holds the same tensors."""
    name, method, scheme, opts, fang_sparsity = case
    dense, _ = load_dense(checkpoint)
    capture_features(dense, calibration(), tmp_path / "cap.zarr", batch_size=3, dtype="float32")
    cap = open_capture(tmp_path / "cap.zarr")
    kw = {}
    if fang_sparsity is not None:
        from test_fang_prune import make_fang_inputs

        kw["inputs"] = make_fang_inputs(cap, fang_sparsity)
    reports = {}
    for mode in ("none", *MODES):
        spill = tmp_path / f"spill-{mode}" if mode == "disk" else None
        model, tokenizer = load_dense_offloaded(checkpoint, offload=mode, spill=spill)
        probe = ResidencyProbe(model) if mode != "none" else None
        report = prune_model(model, cap, method, SPARSITY, scheme, batch_size=4, options=PruneOptions(**opts), **kw)
        if probe and method != "magnitude":
            probe.check(runs_per_block=2 * 2)  # 2 batches, before and after pruning the block
        if mode == "disk":  # every pruned block waits in the spill directory, none in host RAM
            stream = block_stream(model)
            assert stream.host == {} and sorted(stream.spilled) == list(range(N_LAYERS))
            assert sorted(p.name for p in spill.iterdir()) == [f"block-{i:05d}.safetensors" for i in range(N_LAYERS)]
        reports[mode] = report.as_dict()
        save_pruned(model, tokenizer, tmp_path / mode, shards=True if mode == "none" else None)
        if mode != "none":
            assert resident_blocks(model) == []  # written one block at a time, none left behind
        else:
            save_pruned(model, tokenizer, tmp_path / "single")
    assert (tmp_path / "none" / INDEX_FILE).exists() and not (tmp_path / "single" / INDEX_FILE).exists()
    sharded, single = load_pruned(tmp_path / "none")[0].state_dict(), load_pruned(tmp_path / "single")[0].state_dict()
    assert sharded.keys() == single.keys() and all(torch.equal(sharded[k], single[k]) for k in single)
    for mode in MODES:
        assert reports[mode] == reports["none"], mode
        files = sorted(p.relative_to(tmp_path / "none") for p in (tmp_path / "none").rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(tmp_path / mode) for p in (tmp_path / mode).rglob("*") if p.is_file())
        for f in files:
            assert (tmp_path / mode / f).read_bytes() == (tmp_path / "none" / f).read_bytes(), (mode, f)


def test_a_block_run_off_the_device_is_a_clear_error(checkpoint):
    model, _ = load_dense_offloaded(checkpoint, offload="host")
    runner = BlockRunner(model, torch.device("cpu"))
    hidden = runner.embed(calibration()[:2])
    with pytest.raises(FangError, match="block_on_device"):
        runner(decoder_layers(model)[0], hidden)
    with runner.on_device(0) as layer:
        assert runner(layer, hidden).shape == hidden.shape
        with runner.on_device(0):  # nested for the same block: still there after the inner one
            pass
        assert resident_blocks(model) == [0]
        with pytest.raises(FangError, match="one block at a time"), runner.on_device(1):
            pass
    assert resident_blocks(model) == []
    with pytest.raises(FangError, match="streams its blocks to cpu"):
        place_model(model, torch.device("meta"))


def test_offload_is_validated(checkpoint):
    with pytest.raises(FangError, match="model.offload='gpu'"):
        load_dense_offloaded(checkpoint, offload="gpu")
    with pytest.raises(FangError, match="model.offload='ram'"):
        parse_block("model", {"offload": "ram"}, ModelParams)
    assert parse_block("model", {}, ModelParams).offload == "none"  # off unless asked for
    assert OFFLOADS == ("none", *MODES)  # the loader handles exactly the names params.yaml accepts


def test_the_capture_and_prune_stages_read_model_offload(tmp_path, monkeypatch):
    """End to end through the stages: model.offload=disk in params.yaml gives the capture store of the
    default run file for file, and the same pruned model, written in shards (one block at a time)
    instead of one file, with no spill directory left behind."""
    import json

    import yaml

    from stages import calibrate, capture, prune

    stage_project(tmp_path, tiny_model(6, 3, layers=N_LAYERS))
    monkeypatch.chdir(tmp_path)
    streamed = []  # (stage, whether its model streamed its blocks)

    def spy(stage):
        def load(*args, **kw):
            model, tok, dtype = load_for_block_passes(*args, **kw)
            streamed.append((stage, resident_blocks(model) == []))
            return model, tok, dtype
        return load

    monkeypatch.setattr(capture, "load_for_block_passes", spy("capture"))
    monkeypatch.setattr(prune, "load_for_block_passes", spy("prune"))
    files = {}
    for mode in ("none", "disk"):
        params = {"model": {"offload": mode}, "calibrate": {"n_samples": 4, "seq_len": 16},
                  "capture": {"batch_size": 3, "dtype": "float32"}, "cluster": {"pca_dim": 4}, "prune": {"batch_size": 3}}
        Path("params.yaml").write_text(yaml.safe_dump(params))
        calibrate.run("params.yaml")
        capture.run("params.yaml")
        prune.run("params.yaml", method="obc", sparsity=0.3, out=f"artifacts/pruned-{mode}")
        root = Path("artifacts")
        wanted = [*root.joinpath("capture.zarr").rglob("*"), *root.joinpath(f"pruned-{mode}").rglob("*")]
        files[mode] = {str(p.relative_to(root)).replace(f"pruned-{mode}", "pruned"): p.read_bytes()
                       for p in wanted if p.is_file()}
    weights = lambda name: name.endswith((".safetensors", ".index.json")) or name.endswith("structure.json")  # noqa: E731
    assert "pruned/model.safetensors" in files["none"] and "pruned/model.safetensors.index.json" in files["disk"]
    same = {k: v for k, v in files["none"].items() if not weights(k)}
    assert same and same == {k: v for k, v in files["disk"].items() if not weights(k)}
    assert {k for k in files["disk"] if "capture.zarr" in k} == {k for k in files["none"] if "capture.zarr" in k}
    structures = [json.loads(files[m]["pruned/structure.json"]) for m in ("none", "disk")]
    assert [{k: v for k, v in s.items() if k != "weights_sha256"} for s in structures] == \
        [{k: v for k, v in structures[0].items() if k != "weights_sha256"}] * 2
    a, b = load_pruned("artifacts/pruned-none")[0].state_dict(), load_pruned("artifacts/pruned-disk")[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(Path("artifacts").glob(".pruned-*.blocks-*"))  # the spill directory is gone
    assert streamed == [("capture", False), ("prune", False), ("capture", True), ("prune", True)]


@pytest.mark.parametrize("mode", MODES)
def test_evaluation_forwards_are_identical_with_streaming(checkpoint, tmp_path, mode):
    """`fang evaluate` with model.offload: a plain forward (perplexity) and the shared-context
    scoring (lm-eval, with its KV cache) run inside `streamed_forward` with one block at a time, and
    give the same numbers; a pruned checkpoint streams from host RAM ("host") or, block by block in
    its pruned shapes, from its safetensors file ("disk")."""
    from fang.evaluation.shared_context import score_continuations
    from fang.model.offload import streamed_forward
    from fang.model.shrink import load_any

    ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(0))
    contexts, conts = [[1, 2, 3], [4, 5]], [[[6], [7, 8]], [[9, 10, 11]]]

    def forwards(model):
        probe = ResidencyProbe(model)  # registered first: it sees the block before streaming releases it
        with streamed_forward(model):
            logits = model(ids).logits
            scores = score_continuations(model, contexts, conts)
        # one plain forward; the contexts once and one batch of the longer continuations
        probe.check(runs_per_block=3)
        assert resident_blocks(model) == []
        return logits, scores

    ref, _ = load_dense(checkpoint)
    want = (ref(ids).logits, score_continuations(ref, contexts, conts))
    got = forwards(load_any(checkpoint, "cpu", "float32", mode)[0])
    assert torch.equal(got[0], want[0]) and got[1] == want[1]

    # a pruned checkpoint (magnitude: no calibration needed)
    dense, tok = load_dense(checkpoint)
    capture_features(dense, calibration(), tmp_path / "cap.zarr", batch_size=3, dtype="float32")
    prune_model(dense, open_capture(tmp_path / "cap.zarr"), "magnitude", SPARSITY, "kv_group", batch_size=4)
    save_pruned(dense, tok, tmp_path / "pruned")
    ref, _ = load_any(tmp_path / "pruned", "cpu", "float32")
    want = (ref(ids).logits, score_continuations(ref, contexts, conts))
    streamed = load_any(tmp_path / "pruned", "cpu", "float32", mode)[0]
    if mode == "disk":
        assert block_stream(streamed).host == {} and block_stream(streamed).disk is not None
    got = forwards(streamed)
    assert torch.equal(got[0], want[0]) and got[1] == want[1]


def test_streamed_forward_leaves_no_block_behind_after_an_error(checkpoint):
    from fang.model.offload import streamed_forward

    model, _ = load_dense_offloaded(checkpoint, offload="host")
    boom = decoder_layers(model)[1].register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"), streamed_forward(model):
        model(torch.zeros(1, 4, dtype=torch.long))
    boom.remove()
    assert resident_blocks(model) == []
    with streamed_forward(model):  # and the model still runs
        model(torch.zeros(1, 4, dtype=torch.long))
    model2, _ = load_dense(checkpoint)
    with streamed_forward(model2):  # a model that is not streamed: nothing changes
        assert resident_blocks(model2) == list(range(N_LAYERS))
