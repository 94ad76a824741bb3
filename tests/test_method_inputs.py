"""Per-method manifests: a method's manifest changes exactly when something that method reads changes."""

from __future__ import annotations

import dataclasses

import pytest

from fang.core.errors import FangError
from fang.core.params import PruneParams
from fang.core.paths import calibration_artifacts
from fang.methods import inputs as mi


@pytest.fixture
def art(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = calibration_artifacts(None)
    for d in (a.cluster, a.taylor, a.groups, a.ica, a.gprune):
        (d / "arr").mkdir(parents=True)
        (d / "arr" / "0").write_bytes(b"\x00\x01")
    a.allocate.write_text('{"mode": "fc"}')
    return a


def test_each_method_reads_its_own_keys():
    assert "tau" not in mi.keys_read("flap") and "damp" not in mi.keys_read("flap")
    assert "damp" in mi.keys_read("obc") and "tau" not in mi.keys_read("obc")
    assert {"tau", "damp", "shared_group", "reweighting"} <= set(mi.keys_read("o_fang"))
    assert "damp" not in mi.keys_read("f_fang") and "batch_size" not in mi.keys_read("magnitude")
    every = {f.name for f in dataclasses.fields(PruneParams)} - set(mi.CELL_KEYS) - set(mi.VARIANT_KEYS)
    assert set().union(*(mi.keys_read(m) for m in mi.READS)) == every


def test_a_key_nobody_classified_counts_for_every_method(monkeypatch):
    monkeypatch.setitem(mi.READS, "o_fang", tuple(k for k in mi.READS["o_fang"] if k != "tau"))
    monkeypatch.setitem(mi.READS, "f_fang", tuple(k for k in mi.READS["f_fang"] if k != "tau"))
    assert all("tau" in mi.keys_read(m) for m in mi.READS)  # rerunning too much beats a stale cell


def test_manifest_changes_only_for_the_methods_that_read_a_change(art):
    base = PruneParams()
    before = {m: mi.method_inputs(m, base, art) for m in mi.READS}
    after_tau = {m: mi.method_inputs(m, dataclasses.replace(base, tau=7.0), art) for m in mi.READS}
    assert {m for m in mi.READS if before[m] != after_tau[m]} == {"f_fang", "o_fang"}
    after_damp = {m: mi.method_inputs(m, dataclasses.replace(base, damp=0.1), art) for m in mi.READS}
    assert {m for m in mi.READS if before[m] != after_damp[m]} == {"obc", "obc_iter", "o_fang", "sobp"}

    (art.cluster / "arr" / "0").write_bytes(b"\x00\x02")  # new clusters: only FANG reads them
    after_cluster = {m: mi.method_inputs(m, base, art) for m in mi.READS}
    assert {m for m in mi.READS if before[m] != after_cluster[m]} == {"f_fang", "o_fang"}


def test_ica_and_gprune_manifests_follow_their_own_artifacts_and_keys(art):
    base = PruneParams()
    before = {m: mi.method_inputs(m, base, art) for m in mi.READS}
    assert set(before["ica_fn"]["artifacts"]) == {str(art.ica)} and set(before["gprune"]["artifacts"]) == {str(art.gprune)}
    assert before["ica_fn"]["params"]["allocation"] == "ica_threshold"
    assert before["ica_fn_ranked"]["params"]["allocation"] == "uniform"
    assert before["gprune"]["params"]["gprune.module_gamma"] == 0.1  # the default when params.yaml has no gprune block

    (art.ica / "arr" / "0").write_bytes(b"\x00\x03")  # new ICA maps: only the ICA methods read them
    after = {m: mi.method_inputs(m, base, art) for m in mi.READS}
    assert {m for m in mi.READS if before[m] != after[m]} == {"ica_fn", "ica_fn_ranked"}
    (art.gprune / "arr" / "0").write_bytes(b"\x00\x03")
    again = {m: mi.method_inputs(m, base, art) for m in mi.READS}
    assert {m for m in mi.READS if after[m] != again[m]} == {"gprune"}
    # gprune's prune-time keys live in the gprune block; a change reaches only its manifest
    blocks = {"gprune": {"module_gamma": 0.3}}
    gamma = {m: mi.method_inputs(m, base, art, blocks) for m in mi.READS}
    assert {m for m in mi.READS if gamma[m] != again[m]} == {"gprune"}
    assert gamma["gprune"]["params"]["gprune.module_gamma"] == 0.3
    with pytest.raises(FangError, match="gprune.module_gamma=-1"):
        mi.method_inputs("gprune", base, art, {"gprune": {"module_gamma": -1.0}})
    # prune.gqa: ica_fn prunes no head
    gqa = dataclasses.replace(base, gqa="query_slot")
    assert mi.method_inputs("ica_fn", gqa, art) == again["ica_fn"]
    assert mi.method_inputs("ica_fn_ranked", gqa, art) != again["ica_fn_ranked"]


def test_content_hash_sees_names_and_bytes(tmp_path):
    d = tmp_path / "d"
    (d / "a").mkdir(parents=True)
    (d / "a" / "x").write_bytes(b"1")
    h = mi.content_hash(d)
    (d / "a" / "x").rename(d / "a" / "y")
    assert mi.content_hash(d) != h
    with pytest.raises(FangError, match="does not exist"):
        mi.content_hash(tmp_path / "missing")
    with pytest.raises(FangError, match="unknown prune method 'sparsegpt'"):
        mi.keys_read("sparsegpt")


def test_variants_record_their_effective_allocation_and_compensation(art):
    base = PruneParams()
    obc, obc_fc = mi.method_inputs("obc", base, art), mi.method_inputs("obc+fc", base, art)
    assert obc["params"]["allocation"] == "uniform" and obc_fc["params"]["allocation"] == "fc"
    assert obc["artifacts"] == {} and str(art.allocate) in obc_fc["artifacts"]  # only fc reads allocate.json
    assert "compensation" not in obc["params"]
    layer = mi.method_inputs("o_fang+layer", base, art)
    assert layer["params"]["compensation"] == "layer" and layer["params"]["allocation"] == "asa"
    # prune.compensation reaches o_fang rows that do not fix it, and no other method
    changed = dataclasses.replace(base, compensation="layer")
    assert mi.method_inputs("o_fang", changed, art) != mi.method_inputs("o_fang", base, art)
    assert mi.method_inputs("o_fang+layer", changed, art) == layer
    assert mi.method_inputs("obc", changed, art) == obc
    # prune.allocation reaches rows that do not name one
    fc_all = dataclasses.replace(base, allocation="fc")
    assert mi.method_inputs("flap", fc_all, art)["params"]["allocation"] == "fc"
    assert mi.method_inputs("obc+uniform", fc_all, art)["params"]["allocation"] == "uniform"


def test_stage_writes_the_manifest_and_names_an_unknown_key(art, tmp_path):
    import json

    from stages.method_inputs import run

    (tmp_path / "params.yaml").write_text("prune:\n  tau: 7.0\n  method: o_fang\n")
    run(str(tmp_path / "params.yaml"), "o_fang", str(tmp_path / "m.json"))
    manifest = json.loads((tmp_path / "m.json").read_text())
    assert manifest["params"]["prune.tau"] == 7.0 and set(manifest["artifacts"]) == {
        str(art.cluster), str(art.taylor), str(art.groups), str(art.allocate)}
    (tmp_path / "params.yaml").write_text("prune:\n  tua: 7.0\n")
    with pytest.raises(FangError, match="unknown key\\(s\\) in params block 'prune': tua"):
        run(str(tmp_path / "params.yaml"), "o_fang", str(tmp_path / "m.json"))


def test_align_reaches_every_method_and_is_silent_at_one(art):
    base = PruneParams()
    assert all("align" in mi.keys_read(m) for m in mi.READS)
    before = {m: mi.method_inputs(m, base, art) for m in mi.READS}
    assert all("prune.align" not in before[m]["params"] for m in mi.READS)  # at 1: the manifests locked before it
    aligned = {m: mi.method_inputs(m, dataclasses.replace(base, align=32), art) for m in mi.READS}
    assert all(aligned[m]["params"]["prune.align"] == 32 and aligned[m] != before[m] for m in mi.READS)
