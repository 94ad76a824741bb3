"""capture: one forward pass of the dense model over the calibration set, streamed block by block to Zarr."""

from safetensors.torch import load_file

from fang import paths
from fang.capture import capture_features
from fang.device import pick_device
from fang.errors import FangError
from fang.modeling import load_dense
from fang.params import load_block
from fang.progress import console


def load_calibration(source: str | None = None):
    f = paths.calibration_artifacts(source).calib / "calib.safetensors"
    if not f.exists():
        stage = "calibrate" if source is None else f"bias_calibrate@{source}"
        raise FangError(f"missing calibration set {f}: run `dvc repro {stage}` first")
    return load_file(f)["input_ids"]


def run(params_path: str = "params.yaml", source: str | None = None) -> None:
    p = load_block("capture", path=params_path)
    pca_dim = load_block("cluster", path=params_path).pca_dim  # the PCA is fitted while capturing
    out = paths.calibration_artifacts(source).capture
    device = pick_device()
    model, _ = load_dense(paths.MODEL, device)
    info = capture_features(model, load_calibration(source), out, p.batch_size, p.dtype, device,
                            pca_dim=pca_dim, keep=p.keep)
    console.print(f"captured {info['tokens']:,} tokens x {info['layers']} layers -> {out} ({info['bytes'] / 2**20:.0f} MiB)")
