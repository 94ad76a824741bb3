"""Screening evaluation tasks for signal: keep only tasks the dense model does clearly above chance.

A task on which the dense model is at chance cannot show what pruning destroyed; one on which it
always gives the same answer (winowhy on SmolLM2-135M) cannot separate two pruned models either.
Both only dilute an average. The screen runs the dense model in two passes:

1. probe: the first `probe_examples` questions of every affordable candidate (enough questions to
   resolve a few points, few enough choices x questions to evaluate on every sweep model);
2. full: every question of the candidates the probe found above chance, where the decision is made:
   accuracy at least `min_z` standard errors above the floor, and not a constant answer. Candidates
   go through it by decreasing probe signal until the kept ones fill the dev-set budget.

The floor is the better of chance and the majority answer: always giving the most common correct
answer text. BIG-bench shuffles the choices of each question, so a model that always says "false"
answers with balanced choice indices and, on a task whose answers are 71% "false", scores 71% with
a z of 5 against 50% chance (fact_checker on SmolLM2-135M). Both the floor and the constant-answer
test therefore work on answer texts, never on choice indices.

The dev set is then the kept tasks by strength of signal (z) until the per-model request budget is
spent. Everything here is bookkeeping on numbers, task rows and token counts; `stages/screen_tasks.py`
runs the model.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field

from ..core.errors import require
from ..data.next_sentence import NEXT_SENTENCE

CONSTANT_ANSWER = 0.95  # share of questions answered with the same choice index above which a task is degenerate
SCREEN_START = "<!-- screen:start -->"  # the block of docs/results.md (`fang screen-tasks --results`)
SCREEN_END = "<!-- screen:end -->"


@dataclass
class Candidate:
    """One task through the screen (accuracy = the metric the report shows: acc_norm, else acc)."""

    name: str
    n_examples: int
    mean_choices: float
    chance: float
    majority: float | None = None  # accuracy of always giving the most common correct answer text
    probe: dict | None = None  # {"n", "acc", "stderr", "z"}
    full: dict | None = None  # {"n", "acc", "stderr", "z", "constant_share"}
    decision: str = "not screened"  # kept | dropped: <reason> | not screened: <reason>
    max_tokens: int | None = None  # longest question + choice in tokens (None: not measured)
    tokens: int | None = None  # tokens one full evaluation runs: every question once + every choice (shared contexts)
    in_dev_set: bool = False

    @property
    def floor(self) -> float:
        """What a model that ignores the question reaches: chance, or the majority answer if higher."""
        return max(self.chance, self.majority or 0.0)

    @property
    def requests(self) -> int:
        """Loglikelihood requests of one full evaluation (one per choice per question)."""
        return int(round(self.n_examples * self.mean_choices))

    def as_dict(self) -> dict:
        return {**asdict(self), "requests": self.requests}


def z_above_chance(acc: float, stderr: float | None, chance: float) -> float:
    """Standard errors above chance; a zero standard error (all right or all wrong) counts as +-inf."""
    if stderr is None or stderr <= 0:
        return math.inf if acc > chance else -math.inf
    return (acc - chance) / stderr


def answer_texts(rows: list[dict], doc_ids: list[int], preds: list[int]) -> list[str]:
    """The text of the choice each question was answered with (`rows[doc_id]["choices"][pred]`)."""
    return [str(rows[d]["choices"][p]) for d, p in zip(doc_ids, preds)]


def leaf_tasks(leaves, task: str) -> list[str]:
    """`task` itself if it is among the leaf tasks `leaves`, else its group's subtasks (`task_*`, next_sentence)."""
    return [task] if task in leaves else sorted(k for k in leaves if k.startswith(f"{task}_"))


def given_answers(results: dict, task: str, rows_of: dict[str, list[dict]]) -> list[str]:
    """The answer texts a model gave on `task` (a group pools its subtasks), from evaluate's per-question
    predictions and each leaf task's rows."""
    scored = {k for k, v in results.items() if (v.get("per_example") or {}).get("pred") is not None}
    return [text for leaf in leaf_tasks(scored, task)
            for text in answer_texts(rows_of[leaf], results[leaf]["per_example"]["doc_id"],
                                     results[leaf]["per_example"]["pred"])]


def majority_rate(rows: list[dict]) -> float:
    """Accuracy of always answering the answer text that is correct most often (rows: {"choices", "gold"})."""
    require(rows, "majority_rate: no question")
    correct = Counter(text for r in rows for text in {str(r["choices"][g]) for g in r["gold"]})
    return max(correct.values()) / len(rows)


def constant_share(preds: list | None) -> float | None:
    """Share of questions given the most common answer (1.0 = always the same answer). Pass answer
    texts (`answer_texts`): choice indices hide a constant answer when the choices are shuffled."""
    if not preds:
        return None
    return Counter(preds).most_common(1)[0][1] / len(preds)


def affordable(candidates: list[Candidate], min_examples: int, max_task_requests: int,
               exclude: list[str] = (), max_request_tokens: int | None = None,
               max_task_tokens: int | None = None) -> list[Candidate]:
    """Candidates big enough to resolve a few points and cheap enough to evaluate on every model;
    the others are marked with the reason. A task with a very long question costs its length
    squared in attention and, at lm-eval's batch size, more memory than a CPU machine has: such
    a task cannot be in a dev set that every sweep model runs, so `max_request_tokens` leaves it out."""
    out = []
    for c in candidates:
        if c.name in exclude:
            c.decision = "not screened: excluded in screen.exclude"
        elif c.n_examples < min_examples:
            c.decision = f"not screened: {c.n_examples} questions < screen.min_examples={min_examples}"
        elif c.requests > max_task_requests:
            c.decision = f"not screened: {c.requests} requests > screen.max_task_requests={max_task_requests}"
        elif max_request_tokens and c.max_tokens is not None and c.max_tokens > max_request_tokens:
            c.decision = (f"not screened: a question of {c.max_tokens} tokens > "
                          f"screen.max_request_tokens={max_request_tokens}")
        elif max_task_tokens and c.tokens is not None and c.tokens > max_task_tokens:
            c.decision = f"not screened: {c.tokens} tokens per evaluation > screen.max_task_tokens={max_task_tokens}"
        else:
            out.append(c)
    return out


def bigbench_candidates(source) -> tuple[list[Candidate], dict[str, list[dict]]]:
    """Every multiple-choice task of the source with its size, and its examples; chance is refined
    from the built rows."""
    names = source.mc_names()
    tasks, _ = source.read(names)
    out, examples_of = [], {}
    for name in names:
        examples = [e for e in tasks.get(name, {}).get("examples", []) if e.get("target_scores")]
        if not examples:
            continue
        choices = [len(e["target_scores"]) for e in examples]
        out.append(Candidate(name, len(examples), statistics.mean(choices), statistics.mean(1 / c for c in choices)))
        examples_of[name] = examples
    return out, examples_of


def next_sentence_candidate() -> Candidate:
    """The next-sentence task as a candidate: four choices, one right; its sizes are filled from the built task
    (`size_from_task_folder`)."""
    return Candidate(NEXT_SENTENCE, 0, 4.0, 0.25)


def evaluation_tokens(tokenizer, questions: list[str], choices: list[list[str]]) -> tuple[int, int]:
    """(tokens one full evaluation runs with shared contexts: every question once + every choice,
    tokens of the longest question + its longest choice); the prompt template adds a few more."""
    q = tokenizer([str(x) for x in questions], add_special_tokens=False)["input_ids"]
    flat = [" " + str(a) for cs in choices for a in cs]
    lens = [len(t) for t in tokenizer(flat, add_special_tokens=False)["input_ids"]] if flat else []
    total, longest, at = 0, 0, 0
    for qq, cs in zip(q, choices):
        mine = lens[at: at + len(cs)]
        at += len(cs)
        total += len(qq) + sum(mine)
        longest = max(longest, len(qq) + max(mine, default=0))
    return total, longest


def candidate_pool(candidates: list[Candidate], examples_of: dict[str, list[dict]], tokenizer, p) -> list[Candidate]:
    """The BIG-bench candidates worth a probe under the screen block `p`: sizes first (free), then the
    token length of what is left (tokenizing every BIG-bench task is slow)."""
    sized = affordable(candidates, p.min_examples, p.max_task_requests, p.exclude)
    for c in sized:
        ex = examples_of[c.name]
        c.tokens, c.max_tokens = evaluation_tokens(tokenizer, [e.get("input", "") for e in ex],
                                                   [list(e["target_scores"]) for e in ex])
    return affordable(sized, p.min_examples, p.max_task_requests, p.exclude, p.max_request_tokens,
                      p.max_task_tokens)


def size_from_task_folder(pool: list[Candidate], manifest: dict, rows_of: dict[str, list[dict]],
                          tokenizer) -> dict[str, str]:
    """Questions, chance and the majority floor of every pooled task from the task folder built for
    them (its manifest, in pool order, and its rows per lm-eval task), and next-sentence's tokens;
    returns task -> its lm-eval name."""
    lm_names = {}
    for c, entry in zip(pool, manifest["tasks"]):
        c.n_examples, c.chance = int(entry["n_examples"]), float(entry["chance_acc"])
        if c.name == NEXT_SENTENCE:
            c.mean_choices = 4.0
            rows = [r for leaf in sorted(rows_of) if leaf.startswith(NEXT_SENTENCE) for r in rows_of[leaf]]
            c.tokens, c.max_tokens = evaluation_tokens(tokenizer, [r["context"] for r in rows],
                                                       [r["choices"] for r in rows])
        lm_names[c.name] = entry["lm_eval_tasks"][0]
    for c in pool:  # the floor a constant answer reaches, from every question of the task
        c.majority = majority_rate([r for leaf in leaf_tasks(rows_of, lm_names[c.name]) for r in rows_of[leaf]])
    return lm_names


def score(result: dict, preds: list[int] | None = None) -> dict:
    """{"n", "acc", "stderr"} of one lm-eval task result (acc_norm where reported), + constant share."""
    key = "acc_norm" if result.get("acc_norm") is not None else "acc"
    return {"n": int(result.get("n", 0)), "acc": float(result[key]), "stderr": result.get(f"{key}_stderr"),
            "metric": key, "constant_share": constant_share(preds)}


def task_score(results: dict, lm_name: str, rows_of: dict[str, list[dict]]) -> dict:
    """The task's score, with the constant-answer share over the answer texts given (the choices
    of a BIG-bench question are shuffled, so indices would hide "always false")."""
    texts = given_answers(results, lm_name, rows_of)
    return score(results[lm_name], texts or None)


def decide_probe(c: Candidate, probe: dict, probe_min_z: float) -> bool:
    c.probe = {**probe, "z": z_above_chance(probe["acc"], probe["stderr"], c.floor)}
    if c.probe["z"] < probe_min_z:
        c.decision = (f"dropped: probe {c.probe['acc']:.3f} on {probe['n']} questions is < {probe_min_z} se above "
                      f"{_floor_name(c)} {c.floor:.3f}")
        return False
    return True


def decide_full(c: Candidate, full: dict, min_z: float) -> bool:
    c.full = {**full, "z": z_above_chance(full["acc"], full["stderr"], c.floor)}
    share = full.get("constant_share")
    if share is not None and share > CONSTANT_ANSWER:
        c.decision = f"dropped: the same answer on {share:.0%} of questions"
        return False
    if c.full["z"] < min_z:
        c.decision = f"dropped: {c.full['acc']:.3f} is {c.full['z']:.1f} se above {_floor_name(c)} {c.floor:.3f} (< {min_z})"
        return False
    c.decision = "kept"
    return True


def judge_tasks(tasks: dict, rows_of: dict[str, list[dict]], min_z: float) -> dict[str, Candidate]:
    """The screen's full-pass decision, made again on an evaluation that already holds every question
    (the dense row of a sweep): per headline task, a Candidate whose `decision` is "kept" when the
    model is `min_z` standard errors above the better of chance and the majority answer and does not
    give one answer text to more than 95% of questions.

    `tasks` is evaluate's "tasks" block (per-question predictions included), `rows_of` the task
    folder's rows per lm-eval task. A report averages only the kept tasks: the others cannot show
    what pruning destroyed, whatever the screen that chose them decided with an older rule."""
    out = {}
    for name, entry in tasks.items():
        if name.startswith("next_sentence_"):  # the group stands for its per-topic subtasks
            continue
        rows = [r for leaf in leaf_tasks(rows_of, name) for r in rows_of[leaf]]
        require(rows, f"task {name}: no rows in the task folder (rebuild it: dvc repro fetch_data)")
        chance = sum(len(r["gold"]) / len(r["choices"]) for r in rows) / len(rows)
        c = Candidate(name, len(rows), sum(len(r["choices"]) for r in rows) / len(rows), chance, majority_rate(rows))
        texts = given_answers(tasks, name, rows_of)
        decide_full(c, score(entry, texts or None), min_z)
        out[name] = c
    return out


def _floor_name(c: Candidate) -> str:
    return "the majority answer" if (c.majority or 0.0) > c.chance else "chance"


def _cost(c: Candidate) -> int:
    require(c.tokens is not None, f"task {c.name}: its evaluation cost in tokens was not measured")
    return c.tokens


def confirm_within_budget(survivors: list[Candidate], evaluate_full, min_z: float, max_total_tokens: int) -> None:
    """The full pass, in order of probe signal, stopping once kept tasks fill the dev-set budget.

    A task that can no longer enter the dev set is not worth every question of the dense model:
    with 80 candidates, a third pass a 30-question probe, and their full evaluation alone would
    cost hours on CPU. `evaluate_full(candidate)` returns its `score` on every question."""
    spent = 0
    for c in sorted(survivors, key=lambda c: (-c.probe["z"], c.name)):
        if spent + _cost(c) > max_total_tokens:
            c.decision = (f"not screened: passed the probe, but tasks with a stronger probe already filled "
                          f"the dev-set budget ({spent} of {max_total_tokens} tokens)")
            continue
        if decide_full(c, evaluate_full(c), min_z):
            spent += _cost(c)


def choose_dev_set(candidates: list[Candidate], max_total_tokens: int) -> list[str]:
    """Kept tasks by decreasing z until the per-model token budget is spent (names, in that order).
    Tokens, not requests, are what an evaluation costs: BIG-bench tasks range from 1k to 800k tokens
    at similar request counts."""
    require(max_total_tokens > 0, f"screen.max_total_tokens={max_total_tokens} must be positive")
    kept = sorted((c for c in candidates if c.decision == "kept"), key=lambda c: (-c.full["z"], c.name))
    chosen, spent = [], 0
    for c in kept:
        if spent + _cost(c) <= max_total_tokens:
            chosen.append(c.name)
            spent += _cost(c)
            c.in_dev_set = True
        else:
            c.decision = f"kept, not in the dev set: over the budget of {max_total_tokens} tokens"
    return chosen


@dataclass
class ScreenResult:
    model: str
    candidates: list[Candidate] = field(default_factory=list)
    dev_set: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"model": self.model, "settings": self.settings, "dev_set": self.dev_set,
                "dev_set_requests": sum(c.requests for c in self.candidates if c.in_dev_set),
                "dev_set_tokens": sum(c.tokens or 0 for c in self.candidates if c.in_dev_set),
                "candidates": [c.as_dict() for c in self.candidates]}


def markdown(result: dict, screened_only: bool = True) -> str:
    """Table of the screen: task, questions, chance, majority answer, dense accuracy (probe and full), decision."""
    rows = [c for c in result["candidates"] if not (screened_only and c["probe"] is None and c["full"] is None)]
    rows.sort(key=lambda c: (not c["in_dev_set"], -(c["full"] or c["probe"] or {"z": -1e9})["z"], c["name"]))
    lines = ["| task | questions | choices | tokens | chance | majority answer | dense probe | dense full (± se) | z | decision |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in rows:
        probe = f"{c['probe']['acc'] * 100:.1f} (n={c['probe']['n']})" if c["probe"] else "—"
        full = f"{c['full']['acc'] * 100:.1f} ± {c['full']['stderr'] * 100:.1f}" if c["full"] and c["full"]["stderr"] else "—"
        z = f"{c['full']['z']:.1f}" if c["full"] else (f"{c['probe']['z']:.1f} (probe)" if c["probe"] else "—")
        decision = ("**dev set**" if c["in_dev_set"] else c["decision"]).replace("|", "/")
        tokens = f"{c['tokens']:,}" if c.get("tokens") is not None else "—"
        majority = f"{c['majority'] * 100:.1f}" if c.get("majority") is not None else "—"
        lines.append(f"| {c['name']} | {c['n_examples']} | {c['mean_choices']:.1f} | {tokens} | {c['chance'] * 100:.1f} | {majority} | {probe} | "
                     f"{full} | {z} | {decision} |")
    skipped = Counter(c["decision"].split(":")[0] for c in result["candidates"] if c["probe"] is None and c["full"] is None)
    note = (f"{len(result['candidates'])} BIG-bench multiple-choice tasks considered; "
            + ", ".join(f"{n} {k}" for k, n in sorted(skipped.items())) + "." if skipped else "")
    return "\n".join([note, "", *lines]) if note else "\n".join(lines)


def results_note(result: dict) -> str:
    """The screen's rules and its dev set in prose, above its table (screen.md, docs/results.md)."""
    s = result["settings"]
    precision = f" scored in {s['dtype']}" if s.get("dtype") else ""
    return (f"Dense model `{result['model']}`{precision}. Candidates: BIG-bench multiple-choice tasks with at least "
            f"{s['min_examples']} questions, at most {s['max_task_requests']} requests (questions × choices), "
            f"no question + choice over {s['max_request_tokens']} tokens and at most {s['max_task_tokens']:,} tokens "
            f"per evaluation (each question once + every choice), plus next-sentence. Probe on "
            f"{s['probe_examples']} questions (kept if ≥ {s['probe_min_z']} standard errors above chance), then "
            f"every question, by decreasing probe signal until the budget is filled: kept if ≥ {s['min_z']} "
            f"standard errors above the better of chance and the majority answer (always giving the most common correct answer text) and not the same answer text on more than 95% of questions. Dev set = kept "
            f"tasks by decreasing z within {s['max_total_tokens']:,} tokens per evaluated model: "
            f"**{', '.join(result['dev_set']) or 'none'}** ({result.get('dev_set_tokens', 0):,} tokens, "
            f"{result['dev_set_requests']} requests).")


def results_block(result: dict, when: str) -> str:
    """What `fang screen-tasks --results` puts between the screen markers of docs/results.md."""
    return (f"<!-- generated by `fang screen-tasks --results` on {when} from "
            f"artifacts/screen/screen.json; rerun it instead of editing -->\n\n"
            + results_note(result) + "\n\n" + markdown(result))
