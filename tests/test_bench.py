"""Benchmarks on a tiny artifacts tree: timings, floor and targets, memory estimate, inference, outputs,
README markers; and the memory bound of capture and prune (peak RSS does not grow with depth)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from conftest import tiny_model
from fang.analysis.capture import capture_features, open_capture
from fang.core.atomic import write_json
from fang.core.errors import FangError
from fang.methods.driver import prune_model
from fang.model.shrink import save_pruned
from fang.tools.bench import floor as bench_floor, memory, render, timings
from helpers_tokenizer import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def timing(stage: str, seconds: float, *args, rss: int = 100, when: str = "2026-01-01T00:00:00") -> str:
    return json.dumps({"stage": stage, "args": [str(a) for a in args], "seconds": seconds, "peak_rss_mib": rss,
                       "time": when}) + "\n"


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A project root with the artifacts bench reads: dense model, calibration set, capture, two pruned models, timings."""
    root = tmp_path_factory.mktemp("bench")
    art = root / "artifacts"
    tok = tiny_tokenizer()
    dense = tiny_model(6, 3, layers=2)
    dense.save_pretrained(art / "model")
    tok.save_pretrained(art / "model")
    calib = torch.randint(0, 100, (6, 24), generator=torch.Generator().manual_seed(3))
    (art / "calib").mkdir(parents=True)
    save_file({"input_ids": calib}, str(art / "calib" / "calib.safetensors"))
    capture_features(dense, calib, art / "capture.zarr", batch_size=2)
    for out, report, sparsity in [("pruned", art / "metrics" / "prune.json", 0.3),
                                  ("sweep/flap-0.5", art / "sweep" / "flap-0.5.prune.json", 0.5)]:
        model = tiny_model(6, 3, layers=2)
        rep = prune_model(model, open_capture(art / "capture.zarr"), "flap", sparsity, batch_size=2)
        save_pruned(model, tok, art / out)
        write_json(report, rep.as_dict())
    lines = [timing("capture", 9.0, when="2025-12-31T00:00:00"), "{not json\n"]  # an older run and a torn line
    for stage, sec in [("fetch_model", 2.0), ("fetch_data", 1.0), ("calibrate", 1.0), ("capture", 0.5),
                       ("cluster", 0.01), ("taylor", 60.0), ("group", 0.01), ("allocate", 0.01)]:
        lines.append(timing(stage, sec))
    lines += [timing("prune", 0.4, "None", "None", "None"),
              timing("prune", 0.6, "flap", 0.5, "artifacts/sweep/flap-0.5"),
              timing("evaluate", 100.0, "artifacts/model", "artifacts/metrics/dense.json"),
              # the calibration-bias study's per-source runs, logged after the main ones
              timing("capture", 7.0, "People"),
              timing("prune", 3.0, "flap", 0.3, "artifacts/bias_sweep/People/flap-0.3", "People"),
              timing("bench", 5.0, "pipeline")]
    (art / "timings.jsonl").write_text("".join(lines))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["capture"]["batch_size"] = 2
    params["taylor"]["batch_size"] = 2
    params["cluster"]["pca_dim"] = 8  # capture fits the PCA: at most the tiny model's hidden size
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


# --------------------------------------------------------------------------------------------- timings, targets


def test_targets_carry_peak_rss_and_load_and_skip_scratch_prunes(tmp_path):
    log = tmp_path / "timings.jsonl"
    loaded = json.dumps({"stage": "taylor", "args": [], "seconds": 3.0, "peak_rss_mib": 1500,
                         "time": "2026-01-01T00:00:00", "load_avg": [3.5, 3.1, 2.0], "threads": 2}) + "\n"
    log.write_text(timing("capture", 1.0, rss=700) + loaded
                   + timing("prune", 0.5, "obc", 0.3, "/tmp/check") + timing("prune", 0.7, "obc", 0.3, "artifacts/sweep/obc-0.3"))
    entries = timings.read_timings(log)
    assert [e["label"] for e in entries if e["stage"] == "prune"] == ["prune obc 0.3 artifacts/sweep/obc-0.3"]
    floor = {"forward": {"seconds_full": 1.0}, "forward_backward": {"seconds_full": 2.0}}
    rows = {r["target"]: r for r in timings.check_targets(entries, floor)}
    taylor = rows["taylor ≤ 1.3× forward+backward"]
    assert (taylor["peak_rss_mib"], taylor["load5"]) == (1500, 3.1)
    assert (rows["capture ≤ 1.3× forward"]["peak_rss_mib"], rows["capture ≤ 1.3× forward"]["load5"]) == (700, None)
    table = "\n".join(render._targets_table(list(rows.values())))
    assert "| 1,500 | 3.1 |" in table and "| 700 | — |" in table


def test_read_timings_keeps_the_latest_entry_per_stage_and_args(tree):
    entries = timings.read_timings(tree / "artifacts" / "timings.jsonl")
    labels = [e["label"] for e in entries]
    assert labels[:4] == ["fetch_model", "fetch_data", "calibrate", "capture"]  # pipeline order
    assert labels.count("capture") == 1 and entries[3]["seconds"] == 0.5  # the later capture run wins
    prunes = [e for e in entries if e["stage"] == "prune" and not e["source"]]
    assert [(e["label"], e["main_prune"]) for e in prunes] == [
        ("prune", True), ("prune flap 0.5 artifacts/sweep/flap-0.5", False)]
    assert timings.read_timings(tree / "nope.jsonl") == []
    assert {e["label"]: e["source"] for e in entries if e["source"]} == {
        "capture People": "People", "prune flap 0.3 artifacts/bias_sweep/People/flap-0.3 People": "People"}


def test_targets_are_ratios_against_the_floor(tree):
    entries = timings.read_timings(tree / "artifacts" / "timings.jsonl")
    floor = {"forward": {"seconds_full": 1.0}, "forward_backward": {"seconds_full": 2.0}}
    rows = {r["target"]: r for r in timings.check_targets(entries, floor)}
    assert rows["capture ≤ 1.3× forward"]["ratio"] == 0.5 and rows["capture ≤ 1.3× forward"]["status"] == "met"
    assert rows["taylor ≤ 1.3× forward+backward"]["ratio"] == 30.0
    assert rows["taylor ≤ 1.3× forward+backward"]["status"] == "missed"
    assert rows["cluster+group+allocate ≤ 0.5× forward"]["ratio"] == pytest.approx(0.03)
    assert rows["prune ≤ 2× forward"]["status"] == "met"
    assert rows["prune flap 0.5 artifacts/sweep/flap-0.5 ≤ 2× forward"]["ratio"] == 0.6
    rerun = rows["rerun after prune.sparsity ≤ 15% of cold run"]
    cold = 2 + 1 + 1 + 0.5 + 0.01 + 60 + 0.01 + 0.01 + 0.4  # evaluation and the sweep are not in the cold run
    assert rerun["reference_seconds"] == pytest.approx(cold) and rerun["ratio"] == pytest.approx(0.4 / cold, abs=1e-4)
    assert all(r["missing"] == [] for r in rows.values())
    assert not any("People" in target for target in rows)  # bias-study runs are not the default pipeline
    # no floor, no timings: every target says so, and what it lacks, instead of failing
    empty = timings.check_targets([], None)
    assert {r["status"] for r in empty} == {"no data"}
    assert empty[0]["missing"] == ["capture", "compute floor"] and "cold-run taylor" in empty[-1]["missing"]


def test_floor_scales_per_token():
    model = tiny_model(4, 4, layers=2)
    ids = torch.randint(0, 128, (5, 16), generator=torch.Generator().manual_seed(0))
    floor = bench_floor.measure_floor(model, ids, forward_batch=2, backward_batch=2, max_tokens=40)
    assert floor["sequences_measured"] == 2 and floor["tokens_measured"] == 32 and floor["calib_tokens"] == 80
    for key in ("forward", "forward_backward"):
        f = floor[key]
        assert f["seconds_measured"] > 0
        assert f["seconds_full"] == pytest.approx(f["seconds_per_token"] * 80, rel=1e-3, abs=1e-3)
    assert all(p.requires_grad for p in model.parameters())  # restored after the backward
    assert all(p.grad is None for p in model.parameters())  # activation gradients only


# --------------------------------------------------------------------------------------------- memory


def test_footprint_and_llama2_7b_estimate(tree):
    fp = memory.capture_footprint(tree / "artifacts" / "capture.zarr")
    arrays = {a["name"]: a for a in fp["arrays"]}
    assert arrays["block_io"]["scales"] == "token_layer" and arrays["block_io"]["layer_offset"] == 1
    assert arrays["down_in"]["width_dim"] == "intermediate_size" and arrays["down_in_var"]["scales"] == "layer"
    assert fp["bytes_per_token_layer"] == (48 + 48 + 64) * 2  # block_io, ffn_in, down_in in fp16
    assert 0 < fp["compression_ratio"] <= 1.1 and fp["disk_bytes"] > 0
    est = memory.estimate_memory(fp)
    assert est["check"]["ok"]  # the formula reproduces the measured store
    n_tok = 128 * 2048
    assert est["disk"]["uncompressed_bytes"] == n_tok * (33 * 4096 + 32 * 4096 + 32 * 11008) * 2
    assert est["disk"]["compressed_bytes"] == round(est["disk"]["uncompressed_bytes"] * fp["compression_ratio"])
    assert est["ram"]["bytes"] == n_tok * 4096 * 4 == 4 * 2**30
    assert est["gpu"]["params"] == 6_738_415_616  # LLaMA-2-7B's published parameter count
    assert est["gpu"]["weights_bytes"] == 2 * 6_738_415_616
    assert est["gpu"]["total_bytes"] == est["gpu"]["weights_bytes"] + est["gpu"]["activations_bytes"]
    assert "262144" in est["disk"]["formula"] and "4096" in est["gpu"]["activations_formula"]


# --------------------------------------------------------------------------------------------- the whole bench


def test_bench_stage_writes_json_markdown_and_the_results_page(tree, monkeypatch):
    import stages.bench

    monkeypatch.chdir(tree)
    readme = tree / "results.md"
    readme.write_text("# x\n\nintro\n<!-- bench:start -->\nold results\n<!-- bench:end -->\nafter\n")
    stages.bench.run("params.yaml", tokens=48, batch_sizes="1,2", prompt_len=16, new_tokens=4, repeats=2,
                     results=str(readme))
    out = tree / "artifacts" / "bench"
    result = json.loads((out / "bench.json").read_text())
    assert set(result) >= {"machine", "pipeline", "memory", "inference", "time"}
    m = result["machine"]
    assert m["cpu"] and m["cores_logical"] > 0 and m["ram_bytes"] > 0 and m["torch"] == torch.__version__
    pipe = result["pipeline"]
    assert "bench" not in {e["stage"] for e in pipe["stages"]}
    assert pipe["floor"]["forward"]["seconds_full"] > 0 and pipe["floor"]["forward_backward"]["seconds_full"] > 0
    assert pipe["floor"]["tokens_measured"] == 48 and pipe["floor"]["calib_tokens"] == 144
    assert {t["status"] for t in pipe["targets"]} <= {"met", "missed"}
    assert result["memory"]["estimate"]["check"]["ok"]
    # the default pipeline's streaming and analysis stages; the bias study's "capture People" is not among them
    assert [s["label"] for s in result["memory"]["stage_rss"]][:5] == [
        "capture", "cluster", "taylor", "prune", "prune flap 0.5 artifacts/sweep/flap-0.5"]
    inf = result["inference"]
    assert [x["name"] for x in inf["models"]] == ["dense", "pruned", "flap-0.5"]
    dense, pruned, sweep = inf["models"]
    assert dense["block_sparsity"] == 0 and 0 < pruned["block_sparsity"] < sweep["block_sparsity"]
    assert dense["checkpoint_bytes"] > sweep["checkpoint_bytes"] > 0
    assert sweep["method"] == "flap" and sweep["target_sparsity"] == 0.5
    for x in inf["models"]:
        assert [r["batch_size"] for r in x["runs"]] == [1, 2]
        for r in x["runs"]:
            assert len(r["prefill_seconds"]) == len(r["decode_seconds"]) == 2
            assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["prefill_speedup"] > 0
    assert all(r["prefill_speedup"] == 1.0 and r["decode_speedup"] == 1.0 for r in dense["runs"])

    md = (out / "bench.md").read_text()
    for heading in ("## Pipeline cost", "## Memory", "## Inference", "| flap-0.5 |", "LLaMA-2-7B", m["cpu"]):
        assert heading in md
    fragment = (out / "readme_fragment.md").read_text()
    assert "bench:start" not in fragment and "| target |" in fragment and "flap-0.5" in fragment
    text = readme.read_text()
    assert text.startswith("# x\n\nintro\n<!-- bench:start -->\n") and text.endswith("<!-- bench:end -->\nafter\n")
    assert "old results" not in text and fragment.strip() in text


def test_bench_options_select_parts_and_models(tree, monkeypatch):
    import stages.bench

    monkeypatch.chdir(tree)
    stages.bench.run("params.yaml", parts="inference", models="flap-*", batch_sizes="1", prompt_len=8,
                     new_tokens=2, repeats=1)
    result = json.loads((tree / "artifacts" / "bench" / "bench.json").read_text())
    assert "pipeline" not in result and "memory" not in result
    assert [x["name"] for x in result["inference"]["models"]] == ["dense", "flap-0.5"]
    with pytest.raises(FangError, match="matched no model"):
        stages.bench.run("params.yaml", parts="inference", models="obc-*")
    with pytest.raises(FangError, match="--parts"):
        stages.bench.run("params.yaml", parts="speed")
    with pytest.raises(FangError, match="--batch-sizes"):
        stages.bench.run("params.yaml", parts="inference", batch_sizes="1,x")


def test_keep_carries_parts_not_rerun_with_their_own_time(tree, monkeypatch):
    import stages.bench

    monkeypatch.chdir(tree)
    bench_json = tree / "artifacts" / "bench" / "bench.json"
    stages.bench.run("params.yaml", parts="inference", models="flap-*", batch_sizes="1", prompt_len=8,
                     new_tokens=2, repeats=1)
    earlier = json.loads(bench_json.read_text())
    assert earlier["measured"] == {"inference": earlier["time"]}
    earlier["time"] = earlier["measured"]["inference"] = "2000-01-01T00:00:00"  # as if measured long ago
    bench_json.write_text(json.dumps(earlier))

    stages.bench.run("params.yaml", parts="pipeline", tokens=48, keep=True)
    result = json.loads(bench_json.read_text())
    assert result["inference"] == earlier["inference"]
    assert result["measured"] == {"pipeline": result["time"], "inference": "2000-01-01T00:00:00"}
    fragment = (tree / "artifacts" / "bench" / "readme_fragment.md").read_text()
    assert "**Inference** (measured 2000-01-01T00:00:00, kept from an earlier run)" in fragment
    assert "**Pipeline cost** against" in fragment  # measured now: no label

    stages.bench.run("params.yaml", parts="pipeline", tokens=48)  # without --keep nothing is carried over
    assert "inference" not in json.loads(bench_json.read_text())
    earlier["machine"]["cpu"] = "another CPU"
    bench_json.write_text(json.dumps(earlier))
    with pytest.raises(FangError, match="another machine"):
        stages.bench.run("params.yaml", parts="pipeline", tokens=48, keep=True)


def test_profile_part_names_where_capture_and_taylor_spend_time(tree, monkeypatch):
    import numpy as np

    import stages.bench
    from fang.analysis.store import write_store

    monkeypatch.chdir(tree)
    labels = np.random.default_rng(0).integers(0, 3, size=(2, 6 * 24)).astype(np.int32)
    write_store(tree / "artifacts" / "cluster.zarr", "cluster", {"token_clusters": labels}, {"k": 3})
    stages.bench.run("params.yaml", parts="profile", max_seqs=2)
    result = json.loads((tree / "artifacts" / "bench" / "bench.json").read_text())
    prof = result["profile"]
    assert prof["sequences"] == 2 and set(prof["runs"]) == {"capture", "taylor"}
    for run in prof["runs"].values():
        assert run["seconds"] > 0 and 0 < len(run["top"]) <= 15
        own = [r["self_seconds"] for r in run["top"]]
        assert own == sorted(own, reverse=True) and sum(own) <= run["seconds"] * 1.05
    assert "## Profile" in (tree / "artifacts" / "bench" / "bench.md").read_text()
    assert not list((tree / "artifacts").glob("tmp*"))  # the profiled capture store is thrown away


def test_update_readme_replaces_only_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    before = "top\n<!-- bench:start -->\nold\nlines\n<!-- bench:end -->\nbottom <!-- other -->\n"
    readme.write_text(before)
    render.update_readme(readme, "\n\nnew table\n")
    assert readme.read_text() == "top\n<!-- bench:start -->\nnew table\n<!-- bench:end -->\nbottom <!-- other -->\n"
    render.update_readme(readme, "again")  # idempotent layout: markers kept, only the inside changes
    assert readme.read_text() == "top\n<!-- bench:start -->\nagain\n<!-- bench:end -->\nbottom <!-- other -->\n"
    for bad in ("no markers\n", "<!-- bench:end -->\n<!-- bench:start -->\n",
                "<!-- bench:start -->\n<!-- bench:start -->\n<!-- bench:end -->\n"):
        readme.write_text(bad)
        with pytest.raises(FangError, match="bench"):
            render.update_readme(readme, "x")
        assert readme.read_text() == bad  # untouched on error
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]  # no temp file left behind


# --------------------------------------------------------------------------------------------- memory bound

# One fresh interpreter imports torch once, then forks a child per (stage, depth): a forked child's
# ru_maxrss starts from the parent's current RSS (not its peak), so each child reports its own peak
# over the same baseline, without paying the imports four times. Widths are chosen so the captured
# features (T x (2d + ffn) x 2 B per layer) dwarf the weights (4d² + 3·d·ffn floats per layer).
_PROBE = textwrap.dedent("""
    import json, os, resource, sys
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from fang.analysis.capture import capture_features, open_capture
    from fang.methods.driver import prune_model
    torch.set_num_threads(1)
    tmp = sys.argv[1]

    def child(mode, layers):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=256, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=4, head_dim=16, max_position_embeddings=128,
                          tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg).eval()
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # dense, before pruning
        ids = torch.randint(0, 64, (128, 128), generator=torch.Generator().manual_seed(0))
        store = f"{tmp}/cap{layers}.zarr"
        if mode == "capture":
            capture_features(model, ids, store, batch_size=16)
        elif mode == "prune":
            prune_model(model, open_capture(store), "flap", 0.3, batch_size=16)
        else:
            from fang.analysis.taylor import taylor_scores
            clusters = torch.randint(0, 4, (layers, ids.numel()), generator=torch.Generator().manual_seed(1))
            taylor_scores(model, ids, clusters, 4, batch_size=16)
        return {"maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "weight_bytes": weight_bytes}

    out = {}
    for layers in (2, 8):
        for mode in ("capture", "prune", "taylor"):  # prune reads the store its capture wrote
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                code = 1
                try:
                    os.write(w, json.dumps(child(mode, layers)).encode())
                    code = 0
                finally:
                    os._exit(code)
            os.close(w)
            with os.fdopen(r) as fh:
                data = fh.read()
            _, status = os.waitpid(pid, 0)
            if status != 0 or not data:
                sys.exit(f"{mode} with {layers} layers failed (status {status})")
            out[f"{mode}{layers}"] = json.loads(data)
    print(json.dumps(out))
""")


@pytest.mark.slow  # a fresh process per stage and depth, about 12 s
@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux", reason="ru_maxrss in KiB and fork: Linux")
def test_peak_rss_of_capture_prune_and_taylor_does_not_grow_with_depth(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(_PROBE)
    env = {"PYTHONPATH": str(ROOT), "FANG_NO_PROGRESS": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    fp = memory.capture_footprint(tmp_path / "cap8.zarr")
    # what holding the extra layers' features in RAM would cost (block_io, ffn_in, down_in per layer)
    extra_features = (8 - 2) * fp["tokens"] * fp["bytes_per_token_layer"]
    one_block = fp["tokens"] * fp["model"]["hidden_size"] * 4
    assert extra_features > 10 * one_block  # the test can tell streaming from holding the store
    for mode in ("capture", "prune"):
        small, big = rss[f"{mode}2"], rss[f"{mode}8"]
        weight_growth = big["weight_bytes"] - small["weight_bytes"]
        growth = big["maxrss"] - small["maxrss"]
        # weights (and their transient copies while pruning) may grow with depth; features must not
        assert growth < 3 * weight_growth + extra_features / 4, (mode, growth, weight_growth, extra_features)
    # taylor: autograd over the whole model would keep ~(6d + 5 ffn) floats per token in every block
    # for a batch; block-by-block backward keeps one block's, plus d floats per token and block
    d, ffn = fp["model"]["hidden_size"], fp["model"]["intermediate_size"]
    batch_tokens = 16 * 128
    retained = (8 - 2) * batch_tokens * (6 * d + 5 * ffn) * 4
    small, big = rss["taylor2"], rss["taylor8"]
    growth = big["maxrss"] - small["maxrss"]
    assert growth < 3 * (big["weight_bytes"] - small["weight_bytes"]) + retained / 4, (growth, retained)


def test_runs_at_another_thread_count_than_the_floor_are_not_compared(tmp_path):
    """A one-thread study lane is not a ratio to a two-thread floor; the latest same-thread run is used."""
    def entry(stage, seconds, threads, *args):
        return json.dumps({"stage": stage, "args": list(args), "seconds": seconds, "peak_rss_mib": 100,
                           "time": "2026-01-01T00:00:00", "load_avg": [1.0, 1.0, 1.0], "threads": threads}) + "\n"

    log = tmp_path / "timings.jsonl"
    log.write_text(entry("capture", 1.2, 2) + entry("capture", 9.0, 1)
                   + entry("prune", 5.0, 1, "obc", "0.3", "artifacts/sweep/obc-0.3")
                   + entry("prune", 1.5, 2, "flap", "0.3", "artifacts/sweep/flap-0.3"))
    floor = {"threads": 2, "forward": {"seconds_full": 1.0}, "forward_backward": {"seconds_full": 2.0}}
    rows = {r["target"]: r for r in timings.check_targets(timings.read_timings(log, threads=2), floor)}
    assert rows["capture ≤ 1.3× forward"]["ratio"] == 1.2
    assert "prune flap 0.3 artifacts/sweep/flap-0.3 ≤ 2× forward" in rows
    assert not any("obc" in target for target in rows)
    # without a thread count every run is read, and the latest capture (one thread) wins
    assert {e["label"]: e["seconds"] for e in timings.read_timings(log)}["capture"] == 9.0
