"""bench: stage cost against the compute floor, memory footprint and estimate, inference speed of pruned models.

Writes artifacts/bench/bench.json, bench.md and readme_fragment.md (the benchmark section of
docs/results.md, pasted between the bench markers with --results). Not a DVC stage: it measures the machine, and
it reads artifacts/timings.jsonl, which every stage (this one included) appends to.
"""

from __future__ import annotations

import time

import torch

from fang.core import paths
from fang.core.atomic import atomic_file, write_json
from fang.core.device import pick_device, resolve_compute_dtype
from fang.core.errors import require
from fang.core.params import load_block
from fang.core.progress import console
from fang.model.offload import load_dense_offloaded
from fang.tools.bench.floor import measure_floor
from fang.tools.bench.inference import find_models, measure_inference
from fang.tools.bench.machine import machine_info
from fang.tools.bench.memory import capture_footprint, memory_part
from fang.tools.bench.parts import DEFAULT_PARTS, chosen_parts, ints, keep_previous, names
from fang.tools.bench.render import BENCH_FORMAT, render_fragment, render_markdown, update_readme
from fang.tools.bench.stage_profile import profile_stages
from fang.tools.bench.timings import NOT_PIPELINE, check_targets, read_timings

BENCH = paths.ARTIFACTS / "bench"
TIMINGS = paths.ARTIFACTS / "timings.jsonl"


def run(
    params_path: str = "params.yaml",
    parts: str = ",".join(DEFAULT_PARTS),
    tokens: int | None = None,
    max_seqs: int | None = None,
    models: str | None = None,
    batch_sizes: str = "1,8",
    prompt_len: int = 512,
    new_tokens: int = 128,
    repeats: int = 3,
    results: str | None = None,
    keep: bool = False,
    scale_plan: str = "default",
    scale_dtypes: str = "float32",
    scale_jobs: int = 1,
    scale_refit: bool = False,
) -> None:
    wanted = chosen_parts(parts)
    if "scale" in wanted:
        run_scale_part(params_path, scale_plan, names(scale_dtypes), scale_jobs, results, scale_refit)
        wanted = [p for p in wanted if p != "scale"]
        if not wanted:  # bench.json holds the other parts: left as it is
            return
    sizes = ints(batch_sizes, "--batch-sizes")
    device = pick_device()
    # model.offload: the floor's forward, the profile's capture and taylor and the inference runs stream the blocks
    offload = load_block("model", path=params_path).offload
    # model.compute_dtype: the floor and the profile run the blocks in what the stages ran them in
    dtype = resolve_compute_dtype(load_block("model", path=params_path).compute_dtype, device)
    # the bench's own entries are not pipeline stages
    # runs at the thread count the floor will be measured at (this process's), so every ratio compares like with like
    timings = [e for e in read_timings(TIMINGS, threads=torch.get_num_threads()) if e["stage"] not in NOT_PIPELINE]
    result: dict = {
        "format": BENCH_FORMAT,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": machine_info(device),
        "options": {"parts": wanted, "tokens": tokens, "max_seqs": max_seqs, "models": names(models) or None,
                    "batch_sizes": sizes, "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats},
    }
    measured = {part: result["time"] for part in wanted}

    if "pipeline" in wanted:
        from fang.data.corpus import load_calibration

        # the floor runs at the batch sizes the stages it is compared with use
        capture_batch = load_block("capture", path=params_path).batch_size
        taylor_batch = load_block("taylor", path=params_path).batch_size
        input_ids = load_calibration()
        # the floor runs in the dtype the stages ran their blocks in (model.compute_dtype)
        model, _ = load_dense_offloaded(paths.MODEL, device, dtype, offload=offload)
        floor = measure_floor(model, input_ids, capture_batch, taylor_batch, device, max_seqs, tokens)
        del model
        result["pipeline"] = {"timings_file": str(TIMINGS), "stages": timings, "floor": floor,
                              "targets": check_targets(timings, floor)}

    if "memory" in wanted:
        result["memory"] = memory_part(capture_footprint(paths.CAPTURE), timings,
                                       load_block("capture", path=params_path).batch_size)

    if "inference" in wanted:
        entries = find_models(paths.ARTIFACTS, names(models) or None)
        if len(entries) == 1:
            console.print("[yellow]bench: no pruned model found (artifacts/pruned, artifacts/sweep/*); "
                          "measuring the dense model only[/yellow]")
        result["inference"] = measure_inference(entries, sizes, prompt_len, new_tokens, repeats, device, offload=offload)

    if "profile" in wanted:
        result["profile"] = profile_stages(params_path, device, max_seqs or 8, offload)

    if keep:
        keep_previous(result, measured, wanted, BENCH / "bench.json")
    result["measured"] = measured
    write_json(BENCH / "bench.json", result)
    with atomic_file(BENCH / "bench.md") as fh:
        fh.write(render_markdown(result))
    fragment = render_fragment(result)
    with atomic_file(BENCH / "readme_fragment.md") as fh:
        fh.write(fragment)
    if results:
        update_readme(results, fragment)
    summary = []
    if "pipeline" in result:
        t = result["pipeline"]["targets"]
        summary.append(f"targets met {sum(x['status'] == 'met' for x in t)}/{len(t)}"
                       f" ({sum(x['status'] == 'no data' for x in t)} without data)")
    if "inference" in result:
        summary.append(f"{len(result['inference']['models'])} models timed")
    console.print(f"bench: {', '.join(summary) or 'done'} -> {BENCH}/bench.md" + (f", {results} updated" if results else ""))


def run_scale_part(params_path: str, plan: str, dtypes: list[str], jobs: int, results: str | None,
                   refit: bool = False) -> dict:
    """`--parts scale`: measure, fit and estimate (fang.tools.bench.scale); artifacts/bench/scale.json, scale.md, and
    the scale block of `results` (docs/results.md) when given. `refit`: no measurement, the fits and estimates of
    the saved scale.json's measurements are recomputed (after a change of the fitted terms or the assumptions)."""
    from fang.core.markdown import replace_between_markers
    from fang.tools.bench.machine import machine_line
    from fang.tools.bench.scale import SCALE_END, SCALE_START, refit as refit_scale, render_scale, run_scale

    if refit:
        result = refit_scale(BENCH / "scale.json")
        when = result["time"]
    else:
        require(bool(dtypes), "--scale-dtypes is empty: give float32 (and bfloat16 where model.compute_dtype exists)")
        when = time.strftime("%Y-%m-%dT%H:%M:%S")
        work = BENCH / "scale_work"
        result = run_scale(params_path, work, plan, tuple(dtypes), jobs, log=console.print)
        result.update(time=when, machine=machine_info(pick_device()))
    write_json(BENCH / "scale.json", result)
    block = render_scale(result, when, machine_line(result["machine"]))
    with atomic_file(BENCH / "scale.md") as fh:
        fh.write("# fang bench: cost growth\n\n" + block)
    if results:
        replace_between_markers(results, block, SCALE_START, SCALE_END)
    console.print(f"bench scale: {len(result['configs'])} configurations, "
                  f"{result['total_cpu_seconds'] / 60:.1f} CPU-min -> {BENCH}/scale.json" + (f", {results} updated" if results else ""))
    return result


# ------------------------------------------------------------------------------ `--parts scale`: the server's stages


def run_stage_by_name(stage: str, params: str) -> None:
    """Run one pipeline stage in the scale bench's forked child: "capture", "taylor", ..., or "prune:<method>"."""
    import importlib

    name, _, method = stage.partition(":")
    module = importlib.import_module(f"stages.{name}")
    if name == "prune":
        module.run(params, method=method, out=f"artifacts/scale_pruned/{method}")
    else:
        module.run(params)


def serve_scale() -> None:
    """fang.tools.bench.scale's per-configuration server, with the stages it measures imported once before it forks.

    The stages are loaded by name, as the CLI runs them (`run_stage_by_name`): this stage uses no code of theirs,
    it times them."""
    import importlib

    from fang.tools.bench.scale import serve

    for name in ("capture", "cluster", "taylor", "group", "allocate", "prune"):
        importlib.import_module(f"stages.{name}")

    serve(run_stage_by_name)
