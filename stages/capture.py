"""capture: one forward pass of the dense model over the calibration set, streamed block by block to Zarr."""

from fang.analysis.capture import capture_features, capture_ram_bytes, keep_residual, residual_bytes
from fang.core import paths
from fang.core.device import pick_device
from fang.core.integrity import read_config
from fang.core.memory import check_fits
from fang.core.params import load_block
from fang.core.progress import console
from fang.core.outputs import take_lock
from fang.data.corpus import load_calibration
from fang.model.offload import load_for_block_passes


def run(params_path: str = "params.yaml", source: str | None = None, analysis: str | None = None) -> None:
    p = load_block("capture", path=params_path)
    model_p = load_block("model", path=params_path)  # offload: where block weights wait; compute_dtype: what they run in
    pca_dim = load_block("cluster", path=params_path).pca_dim  # the PCA is fitted while capturing
    out = paths.calibration_artifacts(source, analysis).capture
    take_lock(out)  # one writer at a time (fang.core.outputs)
    device = pick_device()
    input_ids = load_calibration(source, analysis)
    cfg = read_config(paths.MODEL)  # the sizes, before the model is loaded
    n_tok, hidden, n_ffn = input_ids.numel(), cfg.get("hidden_size", 0), cfg.get("intermediate_size", 0)
    batch = min(p.batch_size, input_ids.shape[0])  # a batch never holds more than every sequence
    samples = "calibrate.n_samples" if source is None else "bias.n_samples"
    # the whole set's hidden states first (only fewer samples help), then with a batch's features
    check_fits(capture_ram_bytes(n_tok, input_ids.shape[1], 0, hidden, n_ffn),
               f"{n_tok:,} calibration tokens' hidden states", f"{samples}={input_ids.shape[0]}")
    check_fits(capture_ram_bytes(n_tok, input_ids.shape[1], batch, hidden, n_ffn),
               f"{n_tok:,} calibration tokens' hidden states and a batch's features", f"capture.batch_size={p.batch_size}")
    residual = keep_residual(p.residual, residual_bytes(cfg.get("num_hidden_layers", 0), n_tok, hidden), out.parent)
    model, _, dtype = load_for_block_passes(paths.MODEL, device, model_p)
    info = capture_features(model, input_ids, out, p.batch_size, p.dtype, device, pca_dim=pca_dim, keep=p.keep,
                             residual=residual)
    console.print(f"captured {info['tokens']:,} tokens x {info['layers']} layers -> {out} ({info['bytes'] / 2**20:.0f} MiB)")
