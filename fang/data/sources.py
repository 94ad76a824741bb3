"""Calibration sources: the topic of every calibration token, rebuilt from the calibration set's article list.

`calibrate` concatenates whole articles (each followed by EOS) and cuts N windows of L tokens;
`calib.json` keeps, per window, the articles it covers. Re-tokenizing those articles in order
gives every token's article, hence its topic. The rebuilt ids must equal the stored ones, so a
changed tokenizer or corpus is caught rather than silently mislabelling tokens.
"""

from __future__ import annotations

import collections

import torch
from torch import Tensor

from ..core.errors import FangError, require
from .corpus import join_articles


def token_topics(input_ids: Tensor, window_articles: list[list[str]], rows: list[dict], tokenizer) -> list[str]:
    """Topic of each calibration token, row-major over [N, L] -> list of N x L topic names."""
    n_seq, seq_len = input_ids.shape
    require(len(window_articles) == n_seq,
            f"calib.json lists articles for {len(window_articles)} windows but the calibration set has {n_seq}")
    by_id = {r["id"]: r for r in rows}
    order = list(dict.fromkeys(a for window in window_articles for a in window))
    missing = [a for a in order if a not in by_id]
    if missing:
        raise FangError(f"{len(missing)} calibration articles (e.g. {missing[0]!r}) are not in the corpus split; "
                        "rerun calibrate")
    need = n_seq * seq_len
    ids, topics = join_articles(tokenizer, ((by_id[a]["topic"], by_id[a]["text"]) for a in order), need)
    if len(ids) < need or not torch.equal(torch.tensor(ids[:need]).view(n_seq, seq_len), input_ids.long()):
        raise FangError("re-tokenized calibration articles do not reproduce the calibration set: "
                        "the tokenizer or corpus changed since `calibrate`; rerun it")
    return topics[:need]


def source_index(topics: list[str], wanted: list[str], min_tokens: int) -> tuple[Tensor, list[str], dict[str, int]]:
    """Map tokens to sources: ids [T] (-1 = not in any used source), source names, and tokens per topic.

    `wanted` = [] uses every topic with at least `min_tokens` tokens; named topics must reach it too.
    """
    counts = collections.Counter(topics)
    if wanted:
        unknown = [w for w in wanted if w not in counts]
        require(not unknown, f"gprune.sources {unknown} have no calibration tokens; the calibration set has: "
                             f"{', '.join(sorted(counts))}")
        small = [w for w in wanted if counts[w] < min_tokens]
        require(not small, f"gprune.sources {small} have fewer than gprune.min_source_tokens={min_tokens} tokens "
                           f"({', '.join(f'{w}: {counts[w]}' for w in small)})")
        names = list(wanted)
    else:
        names = sorted(t for t, c in counts.items() if c >= min_tokens)
    require(len(names) >= 2, f"GPrune needs at least 2 calibration sources with >= {min_tokens} tokens; "
                             f"found {names} among topic counts {dict(sorted(counts.items()))}")
    pos = {n: i for i, n in enumerate(names)}
    ids = torch.tensor([pos.get(t, -1) for t in topics], dtype=torch.long)
    return ids, names, dict(sorted(counts.items()))


def shard_sources(n_seq: int, seq_len: int, n_shards: int = 4) -> tuple[Tensor, list[str]]:
    """Fallback sources for a one-topic calibration set: contiguous shards of its windows (ours).

    Rank drift then measures sampling noise between shards rather than a distribution shift; the
    stage records that it fell back. With one window, its two token halves are the shards.
    """
    if n_seq >= 2:
        k = max(2, min(n_shards, n_seq))
        ids = (torch.arange(n_seq) * k // n_seq).repeat_interleave(seq_len)
    else:
        k = 2
        ids = (torch.arange(seq_len) * 2 // seq_len)
    return ids.long(), [f"shard{i}" for i in range(k)]
