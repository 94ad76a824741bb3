"""capture: one forward pass of the dense model over the calibration set, streamed block by block to Zarr."""

from safetensors.torch import load_file

from fang import paths
from fang.capture import capture_features
from fang.device import pick_device
from fang.errors import FangError
from fang.integrity import check_safetensors
from fang.memory import check_fits
from fang.modeling import load_dense
from fang.params import load_block
from fang.progress import console


def load_calibration(source: str | None = None):
    f = paths.calibration_artifacts(source).calib / "calib.safetensors"
    if not f.exists():
        stage = "calibrate" if source is None else f"bias_calibrate@{source}"
        raise FangError(f"missing calibration set {f}: run `dvc repro {stage}` first")
    check_safetensors(f)
    try:
        return load_file(f)["input_ids"]
    except Exception as exc:  # SafetensorError, or a file without input_ids
        raise FangError(f"could not read {f} ({type(exc).__name__}: {str(exc)[:200]}): rerun calibrate") from None


def run(params_path: str = "params.yaml", source: str | None = None) -> None:
    p = load_block("capture", path=params_path)
    pca_dim = load_block("cluster", path=params_path).pca_dim  # the PCA is fitted while capturing
    out = paths.calibration_artifacts(source).capture
    device = pick_device()
    input_ids = load_calibration(source)
    model, _ = load_dense(paths.MODEL, device)
    # one block's hidden states for the whole calibration set stay in RAM (float32), plus a batch's features
    n_tok, cfg = input_ids.numel(), model.config
    needed = n_tok * cfg.hidden_size * 4 + p.batch_size * input_ids.shape[1] * (2 * cfg.hidden_size + cfg.intermediate_size) * 8
    samples = "calibrate.n_samples" if source is None else "bias.n_samples"
    check_fits(needed, f"{n_tok:,} calibration tokens' hidden states", f"{samples}={input_ids.shape[0]}")
    info = capture_features(model, input_ids, out, p.batch_size, p.dtype, device, pca_dim=pca_dim, keep=p.keep)
    console.print(f"captured {info['tokens']:,} tokens x {info['layers']} layers -> {out} ({info['bytes'] / 2**20:.0f} MiB)")
