"""Each rank converts the offline model into a cache of its own, as the first process of each node does in Lightning's
prepare_data once the process group is up (node-local disks): rank one stands for the second node's. The GGUF reading
is replaced by the tiny model; the conversion's writing is the real one. Each rank writes what its folder holds."""

import json
import os
from pathlib import Path

import transformers

from malora_lightning import offline_models
from tests.helpers import tiny_model, tiny_tokenizer


def read_gguf(*args, **kwargs) -> transformers.PreTrainedModel:
    model = tiny_model("llama")
    model.config.quantization_config = None  # what a GGUF-loaded model carries, and the conversion drops
    return model


def run(rank: int, out: str) -> None:
    offline_models._package_dir = lambda model: Path(out, "package")
    transformers.AutoModelForCausalLM.from_pretrained = read_gguf
    transformers.AutoTokenizer.from_pretrained = lambda *args, **kwargs: tiny_tokenizer()
    os.environ["MALORA_CACHE"] = str(Path(out, f"node{rank}"))
    folder = Path(offline_models.resolve_model_path("offline:SmolLM2-135M-Instruct"))
    Path(out, f"rank{rank}.json").write_text(json.dumps(sorted(path.name for path in folder.iterdir())))
