"""Neuron semantic attribution (seed 004): what each FFN neuron responds to, and what pruning took away.

For every layer l and FFN neuron j, from the activations h = act(gate) * up entering down_proj:
- topic selectivity  sel[l, k, j] = mean |h| over topic k's tokens / mean |h| over all tokens,
  set to NaN for topics with too few tokens or articles to say anything (`min_tokens`,
  `min_articles`), with a Welch t-test over *article* means (tokens of one article are not
  independent draws) and Benjamini-Hochberg q-values per layer;
- "selective" = sel >= `min_selectivity` and q < `fdr`; its label = the most selective such topic;
- top contexts: the k token positions where |h| is largest.
A pruned model removed some neurons; per topic we count the fraction of that topic's selective
neurons it removed and the share of the topic's activation mass (sum of mean |h|) they carried,
and correlate both with the topic's perplexity increase across topics.
Arrays are numpy (analysis) or torch (the streaming accumulator, filled by one forward pass in
`stream_activations`, block by block); `calibration_topics` and `kept_neurons` read the calibration set's articles and a
pruned checkpoint's kept neurons.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from ..core import paths
from ..core.atomic import read_json
from ..core.errors import FangError, require
from ..core.progress import progress
from ..data.corpus import article_tokens, read_jsonl
from ..model.layerwise import BlockRunner, batch_slices, embed_tokens, input_hooks
from ..model.modeling import decoder_layers
from ..model.offload import place_model

NO_LABEL = -1


# ------------------------------------------------------------------------------------------------ token topics


def token_articles(input_ids: np.ndarray, window_articles: Sequence[Sequence[str]],
                   article_tokens: Mapping[str, Sequence[int]]) -> tuple[np.ndarray, list[str]]:
    """Which article every calibration token came from -> (index [N, L] into `articles`, articles).

    The calibration set is the articles' tokens (each followed by its separator) joined in one
    order and cut into windows; `window_articles` lists each window's articles in that order. The
    stream is rebuilt from `article_tokens` and must reproduce `input_ids` exactly, so a stale or
    differently tokenized calibration set is an error, never a silent mislabelling.
    """
    input_ids = np.asarray(input_ids)
    require(input_ids.ndim == 2, f"calibration ids must be [N, L], got shape {input_ids.shape}")
    require(len(window_articles) == input_ids.shape[0],
            f"calib.json lists articles for {len(window_articles)} windows but the set has {input_ids.shape[0]}")
    articles = list(dict.fromkeys(a for window in window_articles for a in window))
    missing = [a for a in articles if a not in article_tokens]
    require(not missing, f"calibration articles {missing[:3]} are not in the corpus split: rerun `fang calibrate`")
    stream, owner = [], []
    for i, a in enumerate(articles):
        stream += list(article_tokens[a])
        owner += [i] * len(article_tokens[a])
    need = input_ids.size
    if len(stream) < need or not np.array_equal(np.asarray(stream[:need]), input_ids.reshape(-1)):
        raise FangError("the calibration set does not match its recorded articles (corpus or tokenizer changed): "
                        "rerun `fang calibrate`")
    return np.asarray(owner[:need], dtype=np.int64).reshape(input_ids.shape), articles


# ------------------------------------------------------------------------------------------ streaming accumulator


def calibration_topics(input_ids: torch.Tensor, tokenizer) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """(article index [N, L], topic index per article, article ids, topics) of the main calibration set."""
    meta = read_json(paths.CALIB / "calib.json")
    require("window_articles" in meta, f"{paths.CALIB / 'calib.json'} does not record its articles: rerun `fang calibrate`")
    rows = {r["id"]: r for r in read_jsonl(paths.DATA / f"{meta['split']}.jsonl")}
    wanted = dict.fromkeys(a for w in meta["window_articles"] for a in w)
    # tokenized exactly as fang.data.corpus.sample_calibration does, so the stream can be checked token by token
    tokens = {a: article_tokens(tokenizer, rows[a]["text"]) for a in wanted if a in rows}
    owner, articles = token_articles(input_ids.numpy(), meta["window_articles"], tokens)
    topics = sorted({r["topic"] for r in rows.values()})
    return owner, np.array([topics.index(rows[a]["topic"]) for a in articles]), articles, topics


@dataclass
class Accumulator:
    """Per layer: sum of |h| per article (float64) and the running top-k |h| per neuron.

    Tokens with article index < 0 are ignored (the window starts the caller chose to skip).
    """

    n_layers: int
    n_ffn: int
    n_articles: int
    top_k: int
    sums: torch.Tensor = field(init=False)  # [layers, articles, n_ffn]
    counts: torch.Tensor = field(init=False)  # [articles] tokens per article (counted once, from layer 0)
    top_value: torch.Tensor = field(init=False)  # [layers, k, n_ffn] signed h at the top-|h| tokens
    top_index: torch.Tensor = field(init=False)  # [layers, k, n_ffn] flat token index, -1 = empty slot

    def __post_init__(self) -> None:
        self.sums = torch.zeros(self.n_layers, self.n_articles, self.n_ffn, dtype=torch.float64)
        self.counts = torch.zeros(self.n_articles, dtype=torch.int64)
        self.top_value = torch.zeros(self.n_layers, self.top_k, self.n_ffn)
        self.top_index = torch.full((self.n_layers, self.top_k, self.n_ffn), -1, dtype=torch.int64)

    def add(self, layer: int, h: torch.Tensor, article: torch.Tensor, flat_index: torch.Tensor) -> None:
        """h [tokens, n_ffn] or [sequences, L, n_ffn] activations of `layer`; article and flat_index for the
        same tokens. Given sequences, each contributes at most one top context per neuron (its hardest
        token), so a neuron's contexts come from different windows instead of one phrase's neighbours."""
        h = h.detach().float().cpu()
        if h.dim() == 3:
            self._top(layer, *hardest_per_sequence(h, article, flat_index))
        per_token = h.dim() == 2
        h = h.reshape(-1, self.n_ffn)
        article, flat_index = article.reshape(-1), flat_index.reshape(-1)
        keep = article >= 0
        h, article, flat_index = h[keep], article[keep], flat_index[keep]
        if h.shape[0] == 0:
            return
        self.sums[layer].index_add_(0, article, h.abs().double())
        if layer == 0:
            self.counts += torch.bincount(article, minlength=self.n_articles)
        if per_token:
            _, rows = h.abs().topk(min(self.top_k, h.shape[0]), dim=0)
            self._top(layer, h.gather(0, rows), flat_index[rows])

    def _top(self, layer: int, value: torch.Tensor, index: torch.Tensor) -> None:
        """Merge candidates value/index [c, n_ffn] (index -1 = none) into the running top-k."""
        cand_value = torch.cat([self.top_value[layer], value])
        cand_index = torch.cat([self.top_index[layer], index])
        # empty slots rank below every real token
        rank = torch.where(cand_index >= 0, cand_value.abs(), torch.full_like(cand_value, -1.0))
        _, best = rank.topk(self.top_k, dim=0)
        self.top_value[layer] = cand_value.gather(0, best)
        self.top_index[layer] = cand_index.gather(0, best)



@torch.no_grad()
def stream_activations(model, input_ids: torch.Tensor, owner: np.ndarray, n_articles: int, batch_size: int,
                       top_k: int, device) -> Accumulator:
    """One pass of `model`'s blocks over `input_ids` [N, L] with a hook on every down_proj input: each
    token's |activation| summed per article (`owner` [N, L], -1 = no article) and the top-k contexts per
    neuron (`Accumulator`).

    Block by block, like capture: every block's input for the whole calibration set (N·L·d float32)
    waits on the host, and block l runs over every batch before block l+1, so a streamed model
    (model.offload) reads each block once. The accumulator sees the same batches of each layer in the
    same order as a whole-model forward per batch would give it, so the result is the same."""
    device = torch.device(device)
    place_model(model, device)
    layers = decoder_layers(model)
    cfg = model.config
    acc = Accumulator(len(layers), cfg.intermediate_size, n_articles, top_k)
    n, seq_len = input_ids.shape
    owner_t = torch.as_tensor(owner)
    flat = torch.arange(n * seq_len).view(n, seq_len)
    runner = BlockRunner(model, device)
    hidden = embed_tokens(model, input_ids, batch_size, device)  # block 0's input, float32 on the host
    current: dict[str, slice] = {}

    def sink(name: str, x: torch.Tensor) -> None:
        sl = current["batch"]
        acc.add(int(name), x, owner_t[sl], flat[sl])

    with progress() as bar:
        task = bar.add_task("attribute", total=len(layers) * n)
        for li, layer in enumerate(layers):
            with runner.on_device(li), input_hooks({str(li): layer.mlp.down_proj}, sink):
                for sl in batch_slices(n, batch_size):
                    current["batch"] = sl
                    out = runner(layer, hidden[sl])
                    if li + 1 < len(layers):  # the last block's output feeds only the final norm and head
                        hidden[sl] = out.float().cpu()
                    bar.advance(task, sl.stop - sl.start)
    return acc


def hardest_per_sequence(h: torch.Tensor, article: torch.Tensor, flat_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence and neuron, the signed h and flat index of its largest-|h| token -> two [sequences, n].

    Skipped tokens (article < 0) never win; a sequence with none left gives index -1.
    """
    valid = (article >= 0).unsqueeze(-1)
    pos = torch.where(valid, h.abs(), torch.full_like(h, -1.0)).argmax(1)  # [B, n]
    value = h.gather(1, pos.unsqueeze(1)).squeeze(1)
    index = flat_index.gather(1, pos)
    any_valid = valid.squeeze(-1).any(1, keepdim=True)
    return value, torch.where(any_valid, index, torch.full_like(index, -1))


# ---------------------------------------------------------------------------------------------- attribution


@dataclass
class Attribution:
    topics: list[str]
    topic_tokens: np.ndarray  # [K] tokens per topic
    topic_articles: np.ndarray  # [K] articles per topic
    topic_mean_abs: np.ndarray  # [layers, K, n] mean |h| on the topic's tokens
    mean_abs: np.ndarray  # [layers, n] mean |h| over all tokens
    selectivity: np.ndarray  # [layers, K, n], NaN for guarded topics
    q_value: np.ndarray  # [layers, K, n] BH-adjusted p of the article-level Welch test (NaN when untestable)
    selective: np.ndarray  # bool [layers, K, n]
    label: np.ndarray  # int [layers, n] most selective topic among those it is selective for, NO_LABEL if none
    guarded: np.ndarray  # bool [K] topics left out (too few tokens or articles)


def welch_p(a_mean: np.ndarray, a_var: np.ndarray, a_n: np.ndarray, b_mean: np.ndarray, b_var: np.ndarray,
            b_n: np.ndarray) -> np.ndarray:
    """Two-sided Welch t-test p-values from group means, unbiased variances and sizes (broadcast)."""
    from scipy.stats import t as student_t

    va, vb = a_var / a_n, b_var / b_n
    se2 = va + vb
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (a_mean - b_mean) / np.sqrt(se2)
        dof = se2**2 / (va**2 / (a_n - 1) + vb**2 / (b_n - 1))
    p = 2 * student_t.sf(np.abs(t), dof)
    return np.where(np.isfinite(p), p, np.nan)


def bh_adjust(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values over all finite entries of `p` (NaN stays NaN)."""
    flat = p.reshape(-1)
    ok = np.flatnonzero(np.isfinite(flat))
    q = np.full(flat.shape, np.nan)
    if ok.size:
        order = ok[np.argsort(flat[ok])]
        ranked = flat[order] * ok.size / np.arange(1, ok.size + 1)
        q[order] = np.minimum(1.0, np.minimum.accumulate(ranked[::-1])[::-1])
    return q.reshape(p.shape)


def attribute(article_sums: np.ndarray, article_counts: np.ndarray, article_topic: np.ndarray, topics: list[str],
              min_tokens: int = 256, min_articles: int = 3, min_selectivity: float = 1.5,
              fdr: float = 0.05) -> Attribution:
    """Topic selectivity, significance and labels from per-article sums of |h| [layers, A, n]."""
    article_sums = np.asarray(article_sums, dtype=np.float64)
    article_counts = np.asarray(article_counts, dtype=np.float64)
    article_topic = np.asarray(article_topic, dtype=np.int64)
    n_layers, n_art, n = article_sums.shape
    n_topics = len(topics)
    require(article_counts.shape == (n_art,) and article_topic.shape == (n_art,),
            f"per-article counts/topics must have {n_art} entries")
    require(bool(((article_topic >= 0) & (article_topic < n_topics)).all()), "article topic index out of range")
    present = article_counts > 0
    onehot = np.zeros((n_topics, n_art))
    onehot[article_topic, np.arange(n_art)] = 1.0
    onehot[:, ~present] = 0.0
    topic_tokens = onehot @ article_counts
    topic_articles = onehot.sum(1)
    total = article_counts.sum()
    require(total > 0, "no calibration tokens were attributed")
    topic_sums = np.einsum("ka,lan->lkn", onehot, article_sums)
    mean_abs = article_sums.sum(1) / total
    with np.errstate(divide="ignore", invalid="ignore"):
        topic_mean = topic_sums / topic_tokens[None, :, None]
        selectivity = topic_mean / mean_abs[:, None, :]
    guarded = (topic_tokens < min_tokens) | (topic_articles < min_articles)
    selectivity[:, guarded, :] = np.nan

    # article means: the unit of the significance test
    art_mean = article_sums[:, present, :] / article_counts[present][None, :, None]
    art_topic = article_topic[present]
    p = np.full((n_layers, n_topics, n), np.nan)
    for k in np.flatnonzero(~guarded):
        inside = art_topic == k
        if inside.sum() < 2 or (~inside).sum() < 2:
            continue
        a, b = art_mean[:, inside, :], art_mean[:, ~inside, :]
        p[:, k, :] = welch_p(a.mean(1), a.var(1, ddof=1), inside.sum(), b.mean(1), b.var(1, ddof=1), (~inside).sum())
    q = np.stack([bh_adjust(p[li]) for li in range(n_layers)]) if n_layers else p
    with np.errstate(invalid="ignore"):
        selective = (selectivity >= min_selectivity) & (q < fdr)
    best = np.where(selective, selectivity, -np.inf)
    label = np.where(selective.any(1), best.argmax(1), NO_LABEL)
    return Attribution(topics, topic_tokens.astype(np.int64), topic_articles.astype(np.int64),
                       topic_mean.astype(np.float32), mean_abs.astype(np.float32), selectivity.astype(np.float32),
                       q.astype(np.float32), selective, label.astype(np.int64), guarded)


# ---------------------------------------------------------------------------------------------- removal


def attribution_summary(att: Attribution, top: int = 5) -> dict:
    """attribution.json's summary: per topic its tokens, articles, selective and labelled neurons and its
    `top` most selective (layer, neuron) pairs; labelled neurons per layer."""
    topics = []
    for k, t in enumerate(att.topics):
        sel = np.where(att.selective[:, k, :], att.selectivity[:, k, :], -np.inf)
        best = np.argsort(-sel, axis=None)[:top]
        topics.append({
            "topic": t, "tokens": int(att.topic_tokens[k]), "articles": int(att.topic_articles[k]),
            "guarded": bool(att.guarded[k]), "selective_neurons": int(att.selective[:, k, :].sum()),
            "labelled_neurons": int((att.label == k).sum()),
            "most_selective": [{"layer": int(li), "neuron": int(j), "selectivity": round(float(att.selectivity[li, k, j]), 3)}
                               for li, j in zip(*np.unravel_index(best, sel.shape)) if np.isfinite(sel[li, j])],
        })
    return {"topics": topics,
            "labelled_neurons_by_layer": [int(v) for v in (att.label != NO_LABEL).sum(1)],
            "neurons_per_layer": int(att.label.shape[1])}


def removed_mask(kept: Sequence[Sequence[int]], n_ffn: int) -> np.ndarray:
    """bool [layers, n_ffn]: True for every neuron a pruned model does not keep."""
    removed = np.ones((len(kept), n_ffn), dtype=bool)
    for li, keep in enumerate(kept):
        keep = np.asarray(keep, dtype=np.int64)
        require(keep.size == 0 or (keep.min() >= 0 and keep.max() < n_ffn),
                f"layer {li}: kept neuron indices out of range [0, {n_ffn})")
        removed[li, keep] = False
    return removed


def removal_by_topic(selective: np.ndarray, topic_mean_abs: np.ndarray, removed: np.ndarray) -> dict[str, np.ndarray]:
    """Per topic: removed fraction of its selective neurons (all layers pooled) and lost activation mass.

    `mass_lost[k]` = mean over layers of (sum of topic k's mean |h| over removed neurons / over all
    neurons): each layer counts equally, whatever its activation scale. `selective_removed` is NaN
    for a topic with no selective neuron. `removed_fraction` (all neurons) is the no-preference
    reference a method that ignored topics would hit on average.
    """
    selective = np.asarray(selective, dtype=bool)
    removed = np.asarray(removed, dtype=bool)
    require(selective.shape[0] == removed.shape[0] and selective.shape[2] == removed.shape[1],
            f"attribution has {selective.shape[0]} layers x {selective.shape[2]} neurons, "
            f"the pruned model {removed.shape[0]} x {removed.shape[1]}")
    n_sel = selective.sum((0, 2))
    n_sel_removed = (selective & removed[:, None, :]).sum((0, 2))
    m = np.asarray(topic_mean_abs, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_layer = (m * removed[:, None, :]).sum(2) / m.sum(2)  # [layers, K]
        frac = np.where(n_sel > 0, n_sel_removed / n_sel, np.nan)
    return {"selective": n_sel, "selective_removed": n_sel_removed, "selective_removed_fraction": frac,
            "mass_lost": per_layer.mean(0), "mass_lost_by_layer": per_layer,
            "removed_fraction": np.asarray(removed.mean())}


def match_rows(dense: np.ndarray, pruned: np.ndarray) -> np.ndarray:
    """Dense row index of every row of `pruned` (bit-identical rows), for checkpoints that predate
    structure.json's `kept_neurons`: gate_proj rows are copied, never updated, by every method."""
    dense, pruned = np.ascontiguousarray(dense), np.ascontiguousarray(pruned)
    require(dense.shape[1:] == pruned.shape[1:], f"row width {pruned.shape[1:]} differs from dense {dense.shape[1:]}")
    where: dict[bytes, int] = {}
    for i, row in enumerate(dense):
        where.setdefault(row.tobytes(), i)
    idx = [where.get(row.tobytes(), -1) for row in pruned]
    require(-1 not in idx, "pruned gate_proj rows do not match the dense model's: not pruned from this model")
    require(len(set(idx)) == len(idx), "pruned gate_proj rows match the dense model ambiguously (duplicate rows)")
    return np.asarray(idx, dtype=np.int64)


def kept_neurons(model_dir: Path, dense_dir: Path, n_ffn: int) -> tuple[list[np.ndarray], str]:
    """Dense indices of each layer's kept neurons, from structure.json or (older checkpoints) the weights."""
    from safetensors import safe_open

    from fang.model.shrink import KEPT_ATTR, read_structure, weight_files

    layers = read_structure(model_dir)["layers"]
    kept, source = [], "structure.json"
    files = None
    for li, spec in enumerate(layers):
        if KEPT_ATTR in spec:
            require(len(spec[KEPT_ATTR]) == int(spec["intermediate_size"]),
                    f"{model_dir}/structure.json: layer {li} lists {len(spec[KEPT_ATTR])} kept neurons but has "
                    f"intermediate_size {spec['intermediate_size']}")
            kept.append(np.asarray(spec[KEPT_ATTR], dtype=np.int64))
        elif int(spec["intermediate_size"]) == n_ffn:
            kept.append(np.arange(n_ffn))
        else:
            name = f"model.layers.{li}.mlp.gate_proj.weight"
            if files is None:  # tensor -> file of both checkpoints (one file or shards), read once
                files = weight_files(model_dir), weight_files(dense_dir)
            pruned_files, dense_files = files
            require(name in pruned_files and name in dense_files, f"{name} is missing from {model_dir} or {dense_dir}")
            with safe_open(str(pruned_files[name]), "np") as fp, safe_open(str(dense_files[name]), "np") as fd:
                kept.append(match_rows(fd.get_tensor(name), fp.get_tensor(name)))
            source = "gate_proj rows matched to the dense model"
    return kept, source


def permutation_null(article_sums: np.ndarray, article_counts: np.ndarray, article_topic: np.ndarray,
                     topics: list[str], n_perm: int = 5, seed: int = 0, **thresholds) -> list[int]:
    """Selective (layer, neuron, topic) pairs found after shuffling the articles' topics, per shuffle.

    The same tokens, activations and thresholds with the topic labels made meaningless: what the
    selection finds by chance (plus what article-to-article variation alone produces).
    """
    rng = np.random.default_rng(seed)
    return [int(attribute(article_sums, article_counts, rng.permutation(article_topic), topics, **thresholds)
                .selective.sum()) for _ in range(n_perm)]
