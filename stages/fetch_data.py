"""fetch_data: corpus -> article-level train/validation/test JSONL; evaluation tasks -> local lm-eval folder."""

import collections

from fang.core import paths
from fang.core.atomic import atomic_dir, write_json
from fang.core.params import load_block
from fang.core.progress import console
from fang.core.outputs import take_lock
from fang.data.corpus import SPLITS, split_rows, write_jsonl
from fang.data.text_sources import corpus_rows


def run(params_path: str = "params.yaml") -> None:
    from fang.data.tasks import build_task_folder

    p = load_block("data", path=params_path)
    take_lock(paths.DATA)  # one writer at a time (fang.core.outputs)
    rows = corpus_rows(p.corpus)
    splits = split_rows(rows, p.split_seed, p.validation_fraction, p.test_fraction)
    summary = {
        name: {"articles": len(r), "by_topic": dict(sorted(collections.Counter(x["topic"] for x in r).items()))}
        for name, r in splits.items()
    }
    # the whole folder at once: a bad task name must not leave new splits beside the old tasks
    with atomic_dir(paths.DATA) as tmp:
        for name in SPLITS:
            write_jsonl(tmp / f"{name}.jsonl", splits[name])
        write_json(tmp / "corpus.json", {"source": p.corpus, "split_seed": p.split_seed, "splits": summary})
        build_task_folder(p.tasks, p.bigbench or None, splits["test"], tmp / paths.TASKS.relative_to(paths.DATA),
                          p.next_sentence_per_topic, p.split_seed, p.task_source)
    console.print(
        f"corpus: {len(rows)} articles -> " + ", ".join(f"{k} {v['articles']}" for k, v in summary.items())
        + f"; tasks -> {paths.TASKS}"
    )
