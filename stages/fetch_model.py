"""fetch_model: save `model.name` as a float safetensors checkpoint with its tokenizer."""

from fang.core import paths
from fang.core.params import load_block
from fang.core.progress import console
from fang.core.outputs import take_lock
from fang.data.fetch import fetch_model


def run(params_path: str = "params.yaml") -> None:
    p = load_block("model", path=params_path)
    take_lock(paths.MODEL)  # one writer at a time (fang.core.outputs)
    summary = fetch_model(p.name, paths.MODEL, p.dtype, p.offload)  # offload disk: copied tensor by tensor
    console.print(f"saved {summary['model_type']} model ({summary['parameters']:,} parameters) to {paths.MODEL}")
