"""prune.align: every pruned block keeps a multiple of `align` FFN neurons, planned before selection, with the
block-parameter budget kept; align=1 is today's behaviour (tests/test_method_regression.py: bit for bit)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaForCausalLM

from conftest import assert_reloads_identically, captured, tiny_config
from fang.core.errors import FangError
from fang.core.params import PruneParams, parse_block
from fang.methods.driver import PruneOptions, prune_model
from fang.methods.ica_fn import IcaInputs
from fang.methods.plan import align_widths, plan_pruning
from fang.model.modeling import count_block_params

FFN = 120  # a multiple of 8 but not of 16 or 32: the dense width itself is then not aligned
LAYERS = 3
HIDDEN = 48


def model_(layers: int = LAYERS, seed: int = 0) -> LlamaForCausalLM:
    """A tiny GQA LLaMA (6 query / 3 KV heads, head_dim 8) with FFN width 120, weights wide enough to matter."""
    torch.manual_seed(seed)
    cfg = tiny_config(6, 3, layers)
    cfg.intermediate_size = FFN
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


# ------------------------------------------------------------------------------------------------ align_widths


def test_align_one_returns_the_plan_unchanged():
    keep = [1229, 1151, 1070, 1536, 7]
    assert align_widths(keep, [1536] * 5, 1) == keep


def test_rounds_to_nearest_multiples_and_repairs_the_total():
    # 1229 -> 1216, 1151 -> 1152, 1070 -> 1088, 700 -> 704: +10 neurons in all, less than half a multiple
    assert align_widths([1229, 1151, 1070, 1536, 700], [1536] * 5, 32) == [1216, 1152, 1088, 1536, 704]
    # 5 -> 16 (the floor: one multiple), 60 -> 64, 33 -> 32 keeps 14 too many; the block rounded up the most
    # that can go down (60 -> 64, +4) gives one multiple back: 2 too few, closer than 14
    assert align_widths([5, 60, 33], [64, 64, 64], 16) == [16, 48, 32]


def test_repair_follows_the_allocations_preference():
    # each block alone rounds up by 4 (the half-way tie rounds up): 12 too many, more than half a multiple,
    # so one block goes back down: the one the allocation made the sparsest (ties by remainder)
    assert align_widths([40, 24, 56], [64, 64, 64], 8) == [40, 24, 56]  # already aligned: nothing moves
    assert align_widths([36, 20, 52], [64, 64, 64], 8) == [40, 16, 56]
    # too few: the block rounded down the most takes the multiple
    assert align_widths([33, 35, 41], [64] * 3, 8) == [32, 40, 40]  # 33->32 (-1), 35->32 (-3) ... repaired
    assert sum(align_widths([33, 35, 41], [64] * 3, 8)) - (33 + 35 + 41) in range(-4, 5)


def test_dense_blocks_stay_dense_and_widths_stay_in_bounds():
    # block 1 is left dense by the plan (an ICA edge block); block 2 may round up to its dense width only
    assert align_widths([100, 120, 118], [120, 120, 120], 32) == [96, 120, 120]
    assert align_widths([3, 120], [120, 120], 64) == [64, 120]  # never below one multiple


@pytest.mark.parametrize("align", [2, 8, 16, 32, 64])
def test_random_plans_keep_multiples_and_the_budget(align):
    rng = random.Random(align)
    for _ in range(200):
        n_layers = rng.randint(1, 12)
        widths = [rng.choice([128, 256, 1536, 200]) for _ in range(n_layers)]
        keep = [rng.randint(1, n) for n in widths]
        out = align_widths(keep, widths, align)
        for k, o, n in zip(keep, out, widths):
            assert o == n if k == n else (o % align == 0 or o == n)
            assert align <= o <= n
            if all(align <= x for x in keep):  # no floor forced a block up: each stays within one multiple of its plan
                assert abs(o - k) <= align
        movable = [i for i in range(n_layers) if keep[i] < widths[i]]
        # unless a bound stopped the repair, the total is within half a multiple of the plan's
        stuck_low = all(out[i] == align for i in movable) and sum(out) > sum(keep)
        stuck_high = all(out[i] == widths[i] for i in movable) and sum(out) < sum(keep)
        if not (stuck_low or stuck_high):
            assert abs(sum(out) - sum(keep)) <= align / 2


def test_bad_align_is_one_clear_line():
    for bad in (0, -8, 1.5, True, "32"):
        with pytest.raises(FangError, match="prune.align"):
            parse_block("prune", {"align": bad}, PruneParams)
        with pytest.raises(FangError, match="prune.align"):
            PruneOptions(align=bad).validate()
    with pytest.raises(FangError, match="prune.align=256 is larger than the FFN width 120"):
        align_widths([60, 60], [120, 120], 256)
    assert parse_block("prune", {"align": 32}, PruneParams).align == 32
    assert PruneOptions.from_params(PruneParams(align=64)).align == 64


# ------------------------------------------------------------------------------ every method, through prune_model

# (method, PruneOptions kwargs, FANG's per-block sparsity or None)
CASES = [
    ("flap", {}, None),  # auto = flap_search
    ("wanda_sp", {}, None),
    ("magnitude", {}, None),
    ("obc", {}, None),
    ("obc_iter", {}, None),
    ("f_fang", {"tau": 1.0}, [0.2, 0.3, 0.4]),
    ("o_fang", {"tau": 1.0}, [0.2, 0.3, 0.4]),
    ("obc", {"allocation": "uniform"}, None),
    ("obc", {"allocation": "fc", "block_sparsity": [0.15, 0.35, 0.4]}, None),
    ("obc", {"allocation": "taylor", "block_sparsity": [0.4, 0.25, 0.3]}, None),
    ("obc", {"allocation": "flap_search"}, None),
    ("wanda_sp", {"allocation": "flap_search"}, None),
]
SPARSITY = 0.3


def _run(case, align, cap, calib):
    method, opts, fang_sparsity = case
    model = model_()
    kw = {}
    if fang_sparsity is not None:
        from test_fang_prune import make_fang_inputs

        kw["inputs"] = make_fang_inputs(cap, fang_sparsity)
    report = prune_model(model, cap, method, SPARSITY, "kv_group", batch_size=4,
                         options=PruneOptions(**opts, align=align), **kw)
    return model, report


@pytest.fixture(scope="module")
def cap(tmp_path_factory):
    calib = torch.randint(0, 128, (6, 24), generator=torch.Generator().manual_seed(5))
    return captured(model_(), calib, tmp_path_factory.mktemp("align_cap"), batch_size=3), calib


@pytest.mark.parametrize("case", CASES, ids=[c[0] + "+" + c[1].get("allocation", "auto") for c in CASES])
@pytest.mark.parametrize("align", [8, 32])
def test_every_method_keeps_aligned_widths_at_the_budget(case, align, cap):
    store, calib = cap
    base_model, base = _run(case, 1, store, calib)
    model, report = _run(case, align, store, calib)
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    base_widths = [layer.mlp.down_proj.in_features for layer in base_model.model.layers]
    assert base_widths != widths or all(w % align == 0 for w in base_widths)  # alignment did something
    for li, (w, b, entry) in enumerate(zip(widths, base_widths, report.layers)):
        assert w % align == 0 or w == FFN, f"block {li} keeps {w} neurons"
        assert entry["ffn"] == w and entry["ffn_unaligned"] == b  # the report says what the allocation asked
        assert abs(w - b) <= align  # each block within one multiple of its unaligned width
    # heads are not rounded: the same attention units as without alignment
    assert [e["kv_heads"] for e in report.layers] == [e["kv_heads"] for e in base.layers]
    # the budget: the kept FFN neurons, hence block parameters, within half a multiple of the unaligned plan
    neuron = 3 * HIDDEN
    assert abs(sum(widths) - sum(base_widths)) <= align / 2
    assert abs(report.pruned_block_params - base.pruned_block_params) <= align / 2 * neuron
    # align 1 is left out of the report (its bytes as before prune.align existed)
    assert report.options["align"] == align and "align" not in base.options and "ffn_unaligned" not in base.layers[0]
    assert report.pruned_block_params == count_block_params(model)


def test_an_aligned_model_runs_and_reloads(cap, tmp_path):
    store, calib = cap
    model, _ = _run(("o_fang", {"tau": 1.0}, [0.2, 0.3, 0.4]), 32, store, calib)
    assert all(layer.mlp.down_proj.in_features % 32 == 0 for layer in model.model.layers)
    assert_reloads_identically(model, calib, tmp_path)


def test_ica_fn_follows_the_aligned_widths_with_its_top_scores(tmp_path):
    calib = torch.randint(0, 128, (6, 24), generator=torch.Generator().manual_seed(5))
    layers = 7  # blocks 3 and 4 are prunable; 0-2 and 5-6 stay dense
    scores = torch.rand(layers, FFN, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 6
    store = captured(model_(layers), calib, tmp_path, batch_size=3)
    dense = model_(layers)
    base = prune_model(model_(layers), store, "ica_fn", 0.1, batch_size=4, inputs=IcaInputs(scores.clone()))
    model = model_(layers)
    report = prune_model(model, store, "ica_fn", 0.1, batch_size=4, inputs=IcaInputs(scores.clone()),
                         options=PruneOptions(align=16))
    up_d = [layer.mlp.up_proj.weight for layer in dense.model.layers]
    for li, (layer, entry, b) in enumerate(zip(model.model.layers, report.layers, base.layers)):
        w = layer.mlp.down_proj.in_features
        if li in (3, 4):
            assert w % 16 == 0 and abs(w - b["ffn"]) <= 16 and entry["ffn_unaligned"] == b["ffn"]
            kept = sorted(int(torch.nonzero((up_d[li] == row).all(1))[0]) for row in layer.mlp.up_proj.weight.detach())
            top = torch.sort(scores[li], descending=True, stable=True).indices[:w]
            assert kept == sorted(top.tolist())  # the block's top neurons by the ICA score
        else:
            assert w == FFN  # dense edge blocks
    assert abs(sum(e["ffn"] for e in report.layers) - sum(e["ffn"] for e in base.layers)) <= 8


def test_plan_checks_align_against_the_model(cap):
    store, _ = cap
    from fang.methods.driver import method_class

    model = model_()
    method = method_class("obc")("obc", PruneOptions(align=128))
    with pytest.raises(FangError, match="prune.align=128 is larger than the FFN width 120"):
        plan_pruning(model, store, method, 0.3, "kv_group", PruneOptions(align=128))


# ------------------------------------------------------------------------------------- the speed diagnostic


def test_align_speed_builds_the_shapes_it_times(tmp_path):
    import json

    from fang.tools.bench.align import load_inputs, measure_align_speed, render_table, report_widths

    cfg = tiny_config(6, 3, 3)
    cfg.intermediate_size = FFN
    report = {"layers": [{"ffn": 85, "kv_heads": 2, "heads": 4}, {"ffn": 77, "kv_heads": 3, "heads": 6},
                         {"ffn": 69, "ffn_unaligned": 70, "kv_heads": 1, "heads": 2}]}
    ffn, heads = report_widths(report)
    assert ffn == [85, 77, 70] and heads == [(2, 4), (3, 6), (1, 2)]  # an aligned report gives its unaligned widths
    result = measure_align_speed(cfg, ffn, heads, [8, 32], ["float32"], prompt_len=8, repeats=2)
    rows = result["dtypes"]["float32"]
    assert list(rows) == ["dense", "pruned", "pruned, align 8", "pruned, align 32"]
    assert rows["dense"]["ffn"] == [FFN] * 3 and rows["pruned"]["ffn"] == ffn
    assert rows["pruned, align 8"]["ffn"] == align_widths(ffn, [FFN] * 3, 8)
    assert all(w % 32 == 0 for w in rows["pruned, align 32"]["ffn"])
    assert rows["pruned"]["kv_heads"] == [2, 3, 1] and rows["dense"]["kv_heads"] == [3, 3, 3]
    # the models timed have the planned shapes: block parameters follow the widths and heads
    neuron, head = 3 * HIDDEN, 2 * 8 * HIDDEN  # a query head: its q rows and o columns (head_dim 8)
    kv_head = 2 * 8 * HIDDEN  # its k and v rows
    dense = rows["dense"]["block_params"]
    removed = (sum(FFN - w for w in ffn) * neuron + sum(6 - q for _, q in heads) * head
               + sum(3 - k for k, _ in heads) * kv_head)
    assert rows["pruned"]["block_params"] == dense - removed
    for r in rows.values():
        assert len(r["runs"]) == 2 and r["tokens_per_s"] > 0 and r["cpu_ms_per_token"] >= 0
    assert rows["dense"]["speedup_wall"] == 1.0
    json.dumps(result)  # what the tool writes
    assert "| float32 | pruned, align 32 |" in render_table(result)

    (tmp_path / "cfg").mkdir()
    cfg.save_pretrained(tmp_path / "cfg")
    (tmp_path / "r.json").write_text(json.dumps(report))
    got_cfg, got_ffn, _ = load_inputs(tmp_path / "r.json", tmp_path / "cfg" / "config.json")
    assert got_cfg.intermediate_size == FFN and got_ffn == ffn
    (tmp_path / "r.json").write_text(json.dumps({"layers": report["layers"][:2]}))
    with pytest.raises(FangError, match="has 2 blocks"):
        load_inputs(tmp_path / "r.json", tmp_path / "cfg")
    with pytest.raises(FangError, match="no per-block layers"):
        report_widths({"layers": []})


@pytest.mark.parametrize("method", ["f_fang", "o_fang"])
def test_fang_rounds_above_its_shared_group(method, cap):
    store, calib = cap
    # blocks this sparse ask for fewer neurons than FANG keeps (its shared group, 30 of 120, and one neuron a
    # group): unaligned it keeps those 33; aligned, the first multiple above them, not a width it cannot reach
    case = (method, {"tau": 1.0}, [0.9, 0.95, 0.3])
    _, base = _run(case, 1, store, calib)
    model, report = _run(case, 16, store, calib)
    assert [e["ffn"] for e in base.layers][:2] == [33, 33]
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    assert widths[:2] == [48, 48] and all(w % 16 == 0 for w in widths)
    assert [e["ffn"] for e in report.layers] == widths


@pytest.mark.parametrize("method", ["gprune", "ica_fn_ranked"])
def test_the_study_methods_keep_aligned_widths_too(method, cap):
    from test_ica_gprune_methods import _gprune_inputs

    store, calib = cap
    scores = torch.rand(LAYERS, FFN, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 6

    def run(align):
        inputs = _gprune_inputs(LAYERS, n=FFN) if method == "gprune" else IcaInputs(scores.clone())
        model = model_()
        return model, prune_model(model, store, method, SPARSITY, batch_size=4, inputs=inputs,
                                  options=PruneOptions(align=align))

    _, base = run(1)
    model, report = run(32)
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    assert all(w % 32 == 0 for w in widths)
    assert [e["ffn_unaligned"] for e in report.layers] == [e["ffn"] for e in base.layers]
    assert abs(sum(widths) - sum(e["ffn"] for e in base.layers)) <= 16


@pytest.mark.parametrize("allocation", ["auto", "first_order_split"])
def test_sobp_runs_its_greedy_selection_at_the_aligned_widths_of_its_own_search(allocation, cap):
    from fang.methods.sobp import SobpInputs

    store, calib = cap
    ids = torch.from_numpy(store["token_ids"][:].astype("int64"))

    def run(align):
        model = model_()
        return model, prune_model(model, store, "sobp", SPARSITY, "kv_group", batch_size=4, inputs=SobpInputs(ids, 4),
                                  options=PruneOptions(allocation=allocation, align=align))

    _, base = run(1)
    model, report = run(32)
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    assert all(w % 32 == 0 or w == FFN for w in widths) and widths != [e["ffn"] for e in base.layers]
    assert [e["ffn_unaligned"] for e in report.layers] == [e["ffn"] for e in base.layers]  # the search's own widths
    assert abs(sum(widths) - sum(e["ffn"] for e in base.layers)) <= 16  # the budget within half a multiple
    assert [e["kv_heads"] for e in report.layers] == [e["kv_heads"] for e in base.layers]
    assert report.pruned_block_params == count_block_params(model)
