"""calibrate: sample N x L calibration tokens (seeded) from one split and an optional topic filter."""

import collections

from safetensors.torch import save_file

from fang.core import paths
from fang.core.atomic import atomic_dir, write_json
from fang.core.params import load_block
from fang.core.progress import console
from fang.core.outputs import take_lock
from fang.data.corpus import filter_topics, read_jsonl, sample_calibration


def run(params_path: str = "params.yaml", source: str | None = None, analysis: str | None = None) -> None:
    """Sample the main calibration set, or with `source` one of the bias study's (`bias.sources`):
    that topic only ("all": every topic), at the study's `bias.n_samples` x `bias.seq_len`; or with
    `analysis` a recipe-study variant's ("calib=128x2048": calibrate.n_samples x calibrate.seq_len)."""
    from transformers import AutoTokenizer

    from fang.core.errors import FangError

    p = load_block("calibrate", path=params_path, analysis=analysis)
    if source is not None:
        b = load_block("bias", path=params_path)
        b.require_source(source)
        p.topics, p.n_samples, p.seq_len = b.topics_of(source), b.n_samples, b.seq_len
    out = paths.calibration_artifacts(source, analysis).calib
    take_lock(out)  # one writer at a time (fang.core.outputs)
    if not (paths.MODEL / "config.json").exists():
        raise FangError(f"no model at {paths.MODEL}: run `dvc repro fetch_model` first")
    from fang.core.integrity import read_config

    max_pos = read_config(paths.MODEL).get("max_position_embeddings")
    seq_key = "calibrate.seq_len" if source is None else "bias.seq_len"
    # longer windows than the model was built for run on silently and capture meaningless features
    if isinstance(max_pos, int) and p.seq_len > max_pos:
        raise FangError(f"{seq_key}={p.seq_len} exceeds the model's max_position_embeddings ({max_pos})")
    tokenizer = AutoTokenizer.from_pretrained(paths.MODEL)
    rows = filter_topics(read_jsonl(paths.DATA / f"{p.split}.jsonl"), p.topics,
                         "calibrate.topics" if source is None else "bias.sources")
    input_ids, articles = sample_calibration(rows, tokenizer, p.n_samples, p.seq_len, p.seed)
    topic_of = {r["id"]: r["topic"] for r in rows}
    topics = collections.Counter(topic_of[a] for window in articles for a in window)
    with atomic_dir(out) as tmp:
        save_file({"input_ids": input_ids.contiguous()}, tmp / "calib.safetensors")
        write_json(tmp / "calib.json", {
            "split": p.split, "topics_filter": p.topics, "n_samples": p.n_samples, "seq_len": p.seq_len,
            "seed": p.seed, "articles_per_topic": dict(sorted(topics.items())), "window_articles": articles,
        })
    console.print(f"calibration set: {p.n_samples} x {p.seq_len} tokens from {sum(topics.values())} articles -> {out}")
