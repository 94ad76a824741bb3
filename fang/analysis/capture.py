"""Streaming capture of calibration features into a Zarr store, one decoder block at a time.

Store layout (T = N x L calibration tokens, row t = sequence t // L, position t % L). Always
written, because later stages read exactly these:
  token_ids        int32 [N, L]                block 0's input is recomputed from them (prune)
  o_proj_in_mean/var, down_in_mean/var  fp64 [n_layers, C]  input statistics for FLAP's structure search
  fc               fp64  [n_layers]            functional complexity of every block (Eq. 8, allocate)
  pca_mean         fp32  [n_layers, d]         PCA of the MLP input (cluster.pca_dim components), fitted
  pca_components   fp32  [n_layers, p, d]      at the end of each block on its T tokens
  ffn_proj         fp32  [n_layers, T, p]      the MLP input projected on them: what KMeans clusters
Written only when named in `keep` (capture.keep), for people who inspect raw activations:
  block_io         [n_layers + 1, T, d]  block_io[l] is block l's input, block_io[l+1] its output
  ffn_in           [n_layers, T, d]      MLP input (after post_attention_layernorm)
  down_in          [n_layers, T, n_ffn]  down_proj input = neuron activations h = act(gate) * up
in the store dtype (fp16 by default). Written when `residual` is on (capture.residual; `auto`, the
default, keeps it when it is small enough: `keep_residual`):
  residual         fp32  [n_layers + 1, T, d]  the residual stream exactly as the blocks made it: residual[l]
                   is block l's input, residual[n_layers] the last block's output. taylor reads it instead
                   of running its own forward (its one-block backward then costs a forward with grad and
                   a backward, not two forwards and a backward). Stored uncompressed with a CRC32C checksum
                   per chunk: (n_layers + 1) x T x d x 4 bytes, 2.3 GB for the default model and calibration.
FC and the PCA are computed from the hidden states rounded
to the store dtype, in the same chunks, so they equal what the full arrays would give downstream.
Arrays are chunked (1 layer, `batch x L` tokens, all features), so one layer reads without the rest.
Peak RAM holds one block's hidden states for the calibration set (fp32) and its MLP inputs in the
store dtype (for the PCA), never the whole store.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import zarr
from torch import nn

from ..core.atomic import atomic_dir
from ..core.device import dtype_record
from ..core.errors import FangError, require
from ..core.memory import check_disk, free_disk_bytes
from ..core.progress import progress
from ..model.layerwise import BlockRunner, batch_slices, input_hooks
from ..model.modeling import attention_geometry, decoder_layers
from ..model.offload import place_model
from .allocate import ComplexityStats
from .cluster import pca_fit_project
from .store import compressors, open_checked, seal

STORE_FORMAT = 2
# per-token arrays a store can keep in full (capture.keep); nothing downstream needs them
FULL_ARRAYS = ("block_io", "ffn_in", "down_in")
RESIDUAL = "residual"  # the float32 residual stream that taylor reads (capture.residual)
# capture.residual: auto keeps it up to this size: 2.2 GiB for the default model and calibration, 132 GiB
# for LLaMA-2-7B at the paper's 128 x 2048 tokens (too much to hash and cache by default: docs/scale.md)
RESIDUAL_AUTO_GIB = 8


def open_capture(path: str | os.PathLike):
    """The capture store, read-only, with every chunk written by the capture checked present."""
    path = Path(path)
    if not (path / "zarr.json").exists():
        raise FangError(f"capture store not found: {path} (run `dvc repro capture` first)")
    group = open_checked(path, "capture", "capture")
    if group.attrs.get("format") != STORE_FORMAT:
        raise FangError(f"{path} is not a fang capture store of format {STORE_FORMAT}; rerun the capture stage")
    return group


def require_array(group: zarr.Group, name: str, path: str | os.PathLike) -> zarr.Array:
    """An array of a capture store, or a clear error saying how to get it."""
    if name not in group:
        how = f"add {name} to capture.keep" if name in FULL_ARRAYS else "rerun the capture stage with cluster.pca_dim set"
        raise FangError(f"{path} has no {name} array: {how}")
    return group[name]


def capture_residual(cap: zarr.Group, input_ids: torch.Tensor, compute_dtype: str) -> zarr.Array | None:
    """The store's residual stream if it was made from these tokens in this compute dtype, else None (taylor
    then runs its own forward). A store from other tokens is an error: it belongs to another calibration set."""
    if RESIDUAL not in cap:
        return None
    ids = cap["token_ids"][:]
    require(ids.shape == tuple(input_ids.shape) and bool((ids == input_ids.numpy()).all()),
            "the capture store was made from other calibration tokens: rerun capture")
    # the store records its compute dtype by dtype_record's rule (nothing for float32): compare records
    same_dtype = cap.attrs.get("compute_dtype") == dtype_record(compute_dtype).get("compute_dtype")
    return cap[RESIDUAL] if same_dtype else None


class _Moments:
    """Per-channel mean and population variance: each batch's mean and centred sum of squares in float32
    (two passes over the shifted batch, so no cancellation), merged batch by batch (Chan et al.) in float64.

    A batch is one block's activations for batch_size x seq_len tokens; float32 keeps its statistics within
    ~1e-7 (relative) of a float64 pass at a third of the cost (issue 26: float64 here was a sixth of capture)."""

    def __init__(self, channels: int, device: torch.device):
        self.n = 0
        self.mean = torch.zeros(channels, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(channels, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        nb = x.shape[0]
        # shifted by the running mean (the first batch: its first token), so the float32 sums see values of
        # the size of the spread, not of the mean: a channel with mean 300 and std 0.01 keeps its variance
        shift = self.mean.float() if self.n else x[0]
        y = x - shift  # a new tensor: x is the block's own activation
        my = y.mean(0)
        # centred and squared in place: the values of ((y - my) ** 2) without two batch-sized temporaries
        m2b = y.sub_(my).square_().sum(0).double()
        mb = shift.double() + my.double()
        delta = mb - self.mean
        total = self.n + nb
        self.mean += delta * nb / total
        self.m2 += m2b + delta**2 * self.n * nb / total
        self.n = total

    @property
    def variance(self) -> torch.Tensor:
        return self.m2 / max(self.n, 1)


def functional_complexities(cap: zarr.Group, path: str | os.PathLike) -> list[float]:
    """FC_l = 1 - mean cos(X_l, X_l+1) over calibration tokens (Eq. 8), accumulated by capture."""
    return [float(v) for v in require_array(cap, "fc", path)[:]]


def capture_ram_bytes(n_tok: int, seq_len: int, batch_size: int, hidden: int, n_ffn: int) -> int:
    """RAM the capture needs, roughly: one block's hidden states for the whole calibration set (float32),
    plus a batch's features."""
    return n_tok * hidden * 4 + batch_size * seq_len * (2 * hidden + n_ffn) * 8


def residual_bytes(n_layers: int, n_tok: int, hidden: int) -> int:
    """Disk the float32 residual stream takes (capture.residual): every block's input and the last output."""
    return (n_layers + 1) * n_tok * hidden * 4


def keep_residual(setting: bool | str, size: int, where: str | os.PathLike) -> bool:
    """Whether capture writes the residual stream: capture.residual true (an error when the disk cannot
    hold it), false, or auto: when it is at most RESIDUAL_AUTO_GIB and half the free disk at `where`."""
    if setting is True:
        check_disk(size, where, "the residual stream (capture.residual)",
                   "free some, or set capture.residual: false (taylor then recomputes it)")
        return True
    return setting == "auto" and size <= RESIDUAL_AUTO_GIB * 2**30 and size <= free_disk_bytes(where) // 2


def to_store_rows(x: torch.Tensor, np_dtype: type) -> np.ndarray:
    """[..., C] features as a fresh [rows, C] numpy array of the store's dtype.

    Converted by torch, which does fp32 -> fp16 vectorised (numpy's astype does not) with the
    same round-to-nearest-even, so the stored bytes are numpy's. Always a copy: the caller
    reuses `x`'s memory while the write is still queued.
    """
    dtype = {np.float16: torch.float16, np.float32: torch.float32}[np_dtype]
    return x.detach().reshape(-1, x.shape[-1]).to(dtype=dtype, copy=True).cpu().numpy()


@torch.no_grad()
def capture_features(
    model: nn.Module,
    input_ids: torch.Tensor,
    out_path: str | os.PathLike,
    batch_size: int = 8,
    dtype: str = "float16",
    device: torch.device | str = "cpu",
    *,
    pca_dim: int | None = None,
    keep: Sequence[str] = FULL_ARRAYS,
    residual: bool = False,
) -> dict:
    """One forward pass of the dense model over `input_ids` [N, L], streamed block by block to Zarr.

    `pca_dim` (cluster.pca_dim) adds the per-block PCA and projected MLP inputs that `cluster`
    reads; `keep` names the full per-token arrays to store as well, `residual` the float32 residual stream
    that taylor reads (see the module docstring).
    """
    device = torch.device(device)
    place_model(model, device)
    layers = decoder_layers(model)
    cfg = model.config
    n_layers, d, n_ffn = len(layers), cfg.hidden_size, cfg.intermediate_size
    n_heads, _, head_dim = attention_geometry(cfg)
    n_seq, seq_len = input_ids.shape
    n_tok = n_seq * seq_len
    keep = tuple(keep)
    unknown = sorted(set(keep) - set(FULL_ARRAYS))
    require(not unknown, f"capture.keep: unknown arrays {unknown}; choose from {list(FULL_ARRAYS)}")
    if pca_dim is not None:
        require(0 < pca_dim <= d, f"cluster.pca_dim={pca_dim} must be in 1..{d} (the model's hidden size)")
        require(pca_dim <= n_tok, f"cluster.pca_dim={pca_dim} exceeds the {n_tok} calibration tokens")
    np_dtype = {"float16": np.float16, "float32": np.float32, "bfloat16": np.float32}[dtype]
    torch_store = {np.float16: torch.float16, np.float32: torch.float32}[np_dtype]
    chunk_tok = min(n_tok, batch_size * seq_len)
    runner = BlockRunner(model, device)

    def stored(x: torch.Tensor) -> torch.Tensor:
        """x as the store would hold it: FC and the PCA see exactly the values a full store gives."""
        return x.detach().reshape(-1, x.shape[-1]).to(torch_store)

    with atomic_dir(out_path) as tmp:
        root = zarr.open_group(str(tmp), mode="w")
        root.attrs.update(
            format=STORE_FORMAT,
            model_type=cfg.model_type,
            n_layers=n_layers,
            hidden_size=d,
            intermediate_size=n_ffn,
            n_heads=n_heads,
            head_dim=head_dim,
            n_samples=n_seq,
            seq_len=seq_len,
            dtype=dtype,
            # what the blocks ran in (model.compute_dtype); float32 is left out, so a float32 store keeps its bytes
            **dtype_record(str(runner.dtype).removeprefix("torch.")),
            keep=list(keep),
            residual=residual,
            pca_dim=pca_dim,
        )
        root.create_array("token_ids", data=input_ids.to(torch.int32).numpy(), chunks=(n_seq, seq_len),
                          compressors=compressors())
        widths = {"block_io": (n_layers + 1, d), "ffn_in": (n_layers, d), "down_in": (n_layers, n_ffn)}
        arrays = {
            name: root.create_array(name, shape=(widths[name][0], n_tok, widths[name][1]),
                                    chunks=(1, chunk_tok, widths[name][1]), dtype=np_dtype, compressors=compressors())
            for name in keep
        }
        if residual:
            # activations barely compress: a checksum only, so a read costs a copy, not a decompression
            arrays[RESIDUAL] = root.create_array(RESIDUAL, shape=(n_layers + 1, n_tok, d), chunks=(1, chunk_tok, d),
                                                 dtype=np.float32, compressors=zarr.codecs.Crc32cCodec())
        if pca_dim is not None:
            # compressed with a checksum like every other array, so damaged bytes fail on read
            arrays["ffn_proj"] = root.create_array("ffn_proj", shape=(n_layers, n_tok, pca_dim),
                                                   chunks=(1, n_tok, pca_dim), dtype=np.float32,
                                                   compressors=compressors())
        stats = {name: np.zeros((n_layers, c), dtype=np.float64) for name, c in
                 [("o_proj_in_mean", n_heads * head_dim), ("o_proj_in_var", n_heads * head_dim),
                  ("down_in_mean", n_ffn), ("down_in_var", n_ffn)]}
        fc = np.zeros(n_layers, dtype=np.float64)
        pca = {"pca_mean": np.zeros((n_layers, d), np.float32),
               "pca_components": np.zeros((n_layers, pca_dim or 0, d), np.float32)}

        def rows(sl: slice) -> slice:
            return slice(sl.start * seq_len, sl.stop * seq_len)

        # Zarr compresses and writes in a background thread while the next batch runs through the
        # block. Each batch first waits for the previous batch's writes, so at most one batch of
        # copies is in flight and RAM stays at one block's activations.
        in_flight: list[Future] = []

        def put(name: str, layer: int, sl: slice, x: torch.Tensor) -> None:
            if name in arrays:
                data = to_store_rows(x, np.float32 if name == RESIDUAL else np_dtype)
                in_flight.append(writer.submit(arrays[name].__setitem__, (layer, rows(sl)), data))

        def drain() -> None:
            while in_flight:
                in_flight.pop(0).result()  # re-raises a failed write here

        # on an error the pool still finishes its queued writes before atomic_dir discards the store
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="capture-write") as writer:
            # Block 0's input: token embeddings. Kept in RAM for the whole set: one block's worth.
            hidden = torch.empty(n_seq, seq_len, d, dtype=torch.float32)
            for sl in batch_slices(n_seq, batch_size):
                hidden[sl] = runner.embed(input_ids[sl]).float().cpu()
                drain()
                put("block_io", 0, sl, hidden[sl])
                put(RESIDUAL, 0, sl, hidden[sl])
            # one block's MLP inputs in the store dtype, for the PCA fitted once the block has seen every token
            ffn_buf = torch.empty(n_tok, d, dtype=torch_store) if pca_dim is not None else None

            with progress() as bar:
                task = bar.add_task("capture", total=n_layers * n_seq)
                for li, layer in enumerate(layers):
                    o_mom = _Moments(n_heads * head_dim, device)
                    d_mom = _Moments(n_ffn, device)
                    complexity = ComplexityStats()
                    feats: dict[str, torch.Tensor] = {}
                    hooks = {"ffn_in": layer.mlp, "down_in": layer.mlp.down_proj, "o_proj_in": layer.self_attn.o_proj}
                    # one block's weights on the device at a time when the model streams them (model.offload)
                    with runner.on_device(li), input_hooks(hooks, lambda name, x: feats.__setitem__(name, x)):
                        for sl in batch_slices(n_seq, batch_size):
                            out = runner(layer, hidden[sl])
                            drain()
                            put("ffn_in", li, sl, feats["ffn_in"])
                            put("down_in", li, sl, feats["down_in"])
                            if ffn_buf is not None:
                                ffn_buf[rows(sl)] = stored(feats["ffn_in"]).cpu()
                            o_mom.add(feats["o_proj_in"])
                            d_mom.add(feats["down_in"])
                            out = out.float().cpu()
                            complexity.add_batch(stored(hidden[sl]), stored(out))
                            hidden[sl] = out
                            put("block_io", li + 1, sl, hidden[sl])
                            put(RESIDUAL, li + 1, sl, hidden[sl])
                            bar.advance(task, sl.stop - sl.start)
                    stats["o_proj_in_mean"][li], stats["o_proj_in_var"][li] = o_mom.mean.cpu().numpy(), o_mom.variance.cpu().numpy()
                    stats["down_in_mean"][li], stats["down_in_var"][li] = d_mom.mean.cpu().numpy(), d_mom.variance.cpu().numpy()
                    fc[li] = complexity.value
                    if ffn_buf is not None:
                        x = ffn_buf.to(device).float()
                        mean, comps, proj = pca_fit_project(x, pca_dim)
                        proj = proj.cpu().numpy()
                        del x
                        pca["pca_mean"][li], pca["pca_components"][li] = mean.cpu().numpy(), comps.cpu().numpy()
                        drain()
                        in_flight.append(writer.submit(arrays["ffn_proj"].__setitem__, li, proj))
            drain()
        for name, value in stats.items():
            root.create_array(name, data=value, chunks=value.shape, compressors=compressors())
        root.create_array("fc", data=fc, chunks=fc.shape, compressors=compressors())
        if pca_dim is not None:
            for name, value in pca.items():
                root.create_array(name, data=value, chunks=value.shape, compressors=compressors())
        seal(root, tmp)
    return {"tokens": n_tok, "layers": n_layers, "bytes": _dir_size(Path(out_path))}


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
