"""lm-eval log-likelihoods with each question's context run once for all its answer choices.

A multiple-choice question asks lm-eval for log P(choice | context) once per choice, and lm-eval's
HFLM runs context + choice through the model every time (it reuses work only for one-token
choices). Here the distinct contexts of a batch run once, their KV cache is kept, and every choice
continues from it: the same log-likelihoods up to float rounding (tests/test_shared_context.py
checks against HFLM itself), for about (choices - 1) x context fewer tokens per question.
Task definitions, prompts, metrics and standard errors stay lm-eval's: only the scoring of
(context, continuation) token pairs is replaced.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Request = tuple[tuple[str, str], list[int], list[int]]  # lm-eval's ((context, continuation), ctx ids, cont ids)


def group_by_context(requests: list[Request]) -> dict[tuple[int, ...], list[int]]:
    """Request indices per distinct context token sequence, in first-seen order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (_, ctx, _) in enumerate(requests):
        groups.setdefault(tuple(ctx), []).append(i)
    return groups


def _select_rows(cache, rows: torch.Tensor, width: int):
    """A new KV cache holding `rows` of `cache` (repeats allowed), cut to its first `width` positions."""
    from transformers import DynamicCache

    return DynamicCache([(layer.keys.index_select(0, rows)[:, :, :width], layer.values.index_select(0, rows)[:, :, :width])
                         for layer in cache.layers])


@torch.no_grad()
def score_continuations(model, contexts: list[list[int]], continuations: list[list[list[int]]],
                        pad_id: int = 0, tokens_per_batch: int = 1024) -> list[list[tuple[float, bool]]]:
    """(sum of log P(continuation token | everything before it), whether every token was the argmax)
    for each continuation of each context.

    The contexts run once, right-padded in one batch, keeping their KV cache. The continuations are
    then sorted by length (padding to the longest of a batch would otherwise dominate: answers range
    from 1 to 100+ tokens) and run about `tokens_per_batch` tokens at a time (small matrix products
    waste a CPU) from a copy of their contexts' cache rows, with the context padding masked out and positions counted from each context's true length.
    A one-token continuation needs no second pass: the context's last position predicts it.
    """
    device = next(model.parameters()).device
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    lens = torch.tensor([len(c) for c in contexts])
    n_ctx, width = len(contexts), int(lens.max())
    ids = torch.full((n_ctx, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n_ctx, width), dtype=torch.long)
    for i, c in enumerate(contexts):
        ids[i, : len(c)] = torch.tensor(c)
        mask[i, : len(c)] = 1
    out = decoder(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True)
    last = out.last_hidden_state[torch.arange(n_ctx), lens - 1]  # predicts each continuation's first token
    first = F.log_softmax(head(last).float(), dim=-1)  # [n_ctx, vocab]
    cache = out.past_key_values

    owner = [i for i, conts in enumerate(continuations) for _ in conts]
    flat = [k for conts in continuations for k in conts]
    scores: list[tuple[float, bool] | None] = [None] * len(flat)
    for j, k in enumerate(flat):
        if len(k) == 1:
            lp = first[owner[j]]
            scores[j] = (float(lp[k[0]]), bool(lp.argmax() == k[0]))
    longer = sorted((j for j, k in enumerate(flat) if len(k) > 1), key=lambda j: -len(flat[j]))
    batches, at = [], 0
    while at < len(longer):  # sorted longest first: the first row of a batch sets its padded length
        n = max(1, tokens_per_batch // (len(flat[longer[at]]) - 1))
        batches.append(longer[at: at + n])
        at += n
    for batch in batches:
        rows = torch.tensor([owner[j] for j in batch])
        ctx_width = int(lens[rows].max())
        rest = len(flat[batch[0]]) - 1  # sorted: the first is the longest
        cids = torch.full((len(batch), rest), pad_id, dtype=torch.long)
        cmask = torch.zeros((len(batch), rest), dtype=torch.long)
        for r, j in enumerate(batch):
            cids[r, : len(flat[j]) - 1] = torch.tensor(flat[j][:-1])
            cmask[r, : len(flat[j]) - 1] = 1
        positions = lens[rows][:, None] + torch.arange(rest)[None, :]
        h = decoder(input_ids=cids.to(device), attention_mask=torch.cat([mask[rows, :ctx_width], cmask], 1).to(device),
                    position_ids=positions.to(device), past_key_values=_select_rows(cache, rows.to(device), ctx_width),
                    use_cache=True).last_hidden_state
        later = F.log_softmax(head(h).float(), dim=-1)  # [rows, rest, vocab]
        for r, j in enumerate(batch):
            k = flat[j]
            lp0 = first[owner[j]]
            target = torch.tensor(k[1:], device=later.device)
            steps = later[r, : len(k) - 1]
            total = lp0[k[0]] + steps.gather(1, target[:, None]).sum()
            greedy = bool(lp0.argmax() == k[0]) and bool((steps.argmax(-1) == target).all())
            scores[j] = (float(total), greedy)

    nested, at = [], 0
    for conts in continuations:
        nested.append(scores[at: at + len(conts)])
        at += len(conts)
    return nested


def shared_context_lm(**kwargs):
    """An lm-eval HFLM whose loglikelihood shares each context across its continuations."""
    from lm_eval.models.huggingface import HFLM
    from tqdm import tqdm

    class SharedContextLM(HFLM):
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            # what HFLM would truncate from the left keeps HFLM's own path, so results stay identical
            # in meaning; so does anything that is not a plain decoder-only model
            shared = [i for i, (_, ctx, cont) in enumerate(requests)
                      if 0 < len(ctx) and 0 < len(cont) and len(ctx) + len(cont) <= self.max_length + 1]
            if self.backend != "causal" or getattr(self.model.config, "final_logit_softcapping", None):
                shared = []
            out: list = [None] * len(requests)
            fallback = sorted(set(range(len(requests))) - set(shared))
            if fallback:
                # one at a time: HFLM's logits for a batch of 8 x 8k-token requests are 8 x 8k x vocab floats
                size, self.batch_size_per_gpu = self.batch_size_per_gpu, 1  # HFLM's batch_size reads it
                try:
                    answers = super()._loglikelihood_tokens([requests[i] for i in fallback], disable_tqdm, override_bs)
                finally:
                    self.batch_size_per_gpu = size
                for i, ans in zip(fallback, answers):
                    out[i] = ans
            groups = group_by_context([requests[i] for i in shared])
            # longest contexts first (HFLM's order: a memory problem shows at once), similar lengths batched
            keys = sorted(groups, key=lambda c: (-len(c), c))
            # contexts per pass, each pass about `budget` tokens (longest first, so similar lengths
            # share a pass); lm-eval's batch_size x 128 tokens keeps its memory scale
            budget = 128 * max(int(self.batch_size) if str(self.batch_size).isdigit() else 8, 1)
            bar = tqdm(total=len(shared), disable=disable_tqdm or self.rank != 0,
                       desc="Running loglikelihood requests (shared contexts)")
            passes, at = [], 0
            while at < len(keys):
                n = max(1, budget // len(keys[at]))
                passes.append(keys[at: at + n])
                at += n
            for batch in passes:
                members = [[shared[i] for i in groups[c]] for c in batch]
                conts = [[requests[r][2] for r in rows] for rows in members]
                scored = score_continuations(self.model, [list(c) for c in batch], conts, tokens_per_batch=budget)
                for rows, answers in zip(members, scored):
                    for r, ans in zip(rows, answers):
                        out[r] = ans
                        self.cache_hook.add_partial("loglikelihood", requests[r][0], ans)
                    bar.update(len(rows))
            bar.close()
            return out

    return SharedContextLM(**kwargs)
