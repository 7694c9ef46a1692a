"""FSDP1 (`FSDPStrategy`) units: what it would flatten is checked before it wraps, and the FSDP-QLoRA recipe's
units wrap and train (with torch's FSDP on 2 CPU processes: Lightning builds FSDPStrategy only on GPUs)."""

import json

import bitsandbytes as bnb
import pytest
import torch
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from malora_lightning.adapters import AdapterConfig, inject_adapters, load_base_model
from malora_lightning.fsdp_units import check_fsdp1_units, wrapped_classes
from tests.helpers import run_ranks
from tests.ranks import fsdp1_adapter_export, fsdp1_qlora_step


@pytest.fixture
def qlora_model(tiny_model_dir):
    """The FSDP-QLoRA recipe's base settings: nf4, bf16 compute and storage; float32 norms, embeddings, adapters."""
    model = load_base_model(str(tiny_model_dir), quantization="nf4", compute_dtype="bfloat16",
                            quant_storage="bfloat16")
    inject_adapters(model, AdapterConfig(method="malora", rank=2, shared_rank=4, num_experts=4))
    return model


def test_a_unit_of_several_dtypes_is_refused_naming_it(qlora_model):
    """The recipe's former policy, decoder layers only: torch raised "Must flatten tensors with uniform dtype" at
    wrap time, naming no module."""
    with pytest.raises(ValueError, match=r"parameters of model\.layers\.0 \(LlamaDecoderLayer\) into one buffer, but "
                                         r"they have several dtypes: torch\.float32 \(.*\), torch\.bfloat16 \(.*\)"):
        check_fsdp1_units(qlora_model, (LlamaDecoderLayer,), torch.bfloat16)
    with pytest.raises(ValueError, match="the root module"):  # no policy: one unit
        check_fsdp1_units(qlora_model, (), torch.bfloat16)
    check_fsdp1_units(qlora_model, (LlamaDecoderLayer, bnb.nn.Linear4bit), torch.bfloat16)
    check_fsdp1_units(qlora_model, None, torch.bfloat16)  # a callable policy: its units are unknown
    adapted_layers = [module for name, module in qlora_model.named_modules() if name.endswith("layers.0")
                      or name.endswith("layers.1")]
    check_fsdp1_units(qlora_model, (LlamaDecoderLayer,), torch.bfloat16, ignored=adapted_layers)  # left unsharded


def test_mixed_precision_may_not_cast_packed_4bit_weights(qlora_model):
    with pytest.raises(ValueError, match=r"casts parameters to torch.float32, but the 4-bit weight .* is packed in "
                                         r"torch.bfloat16 storage, .* set model.quant_storage to float32"):
        check_fsdp1_units(qlora_model, (LlamaDecoderLayer, bnb.nn.Linear4bit), torch.float32)
    check_fsdp1_units(qlora_model, (LlamaDecoderLayer, bnb.nn.Linear4bit), torch.bfloat16)  # the storage dtype
    check_fsdp1_units(qlora_model, (LlamaDecoderLayer, bnb.nn.Linear4bit), None)  # no mixed precision: no cast


def test_the_policy_classes_are_read_as_lightning_hands_them_over():
    classes = {LlamaDecoderLayer, bnb.nn.Linear4bit}
    assert set(wrapped_classes(ModuleWrapPolicy(classes))) == classes
    assert set(wrapped_classes(classes)) == classes
    assert wrapped_classes(list(classes)) is None  # Lightning passes a list on as it is, which FSDP refuses
    assert wrapped_classes(None) == ()
    assert wrapped_classes(lambda module, recurse, nonwrapped_numel: False) is None


@pytest.mark.slow
def test_the_fsdp_qlora_recipes_units_wrap_and_train(tiny_model_dir, tmp_path):
    """One step on 2 ranks with the recipe's auto_wrap_policy: every adapter tensor gets the gradient of the
    unwrapped model with the same (bf16) parameters, up to bf16 rounding; a corrupted 4-bit weight or a lost
    gradient would be far off."""
    out = tmp_path / "step.json"
    run_ranks(fsdp1_qlora_step.run, str(tiny_model_dir), str(out))
    step = json.loads(out.read_text())
    assert step["loss"] == pytest.approx(step["reference_loss"], abs=5e-3)
    differences = step["relative_grad_differences"]
    assert sorted(differences) == step["reference_grads"] and len(differences) == 48  # 12 layers x 4 tensors
    assert max(differences.values()) < 0.1
    # the recipe's setting clips (gradient_clip_val 1.0), which FSDPPrecision refuses: the module calls this instead
    assert step["norm_before_clipping"] > 1e-2 and step["norm_after_clipping"] == pytest.approx(1e-3, rel=1e-2)


@pytest.mark.slow
def test_under_fsdp1_checkpoints_and_the_adapter_folder_name_and_hold_the_unwrapped_tensors(tiny_model_dir, tmp_path):
    """FSDP1 puts `_fsdp_wrapped_module` into the names of every unit's modules and makes each adapter tensor a view of
    this rank's shard: checkpoints kept no tensor (their filter named the wrapped modules), and the exported folder held
    48 empty tensors under the wrapped names. A save that is not given the root unit holding the adapters wrote empty
    tensors too; it is refused. The save unsharded the whole model at once; now one unit at a time."""
    run_ranks(fsdp1_adapter_export.run, str(tiny_model_dir), str(tmp_path))
    outcome = json.loads((tmp_path / "result.json").read_text())
    assert "_fsdp_wrapped_module" in outcome["wrapped_name"]  # the wrapping happened as Lightning's does
    assert outcome["checkpoint_keys_equal"]
    complete = {"saved_keys_equal": True, "saved_tensors_equal": True, "tensors": 48, "empty_tensors": 0}
    assert outcome["units"] == complete
    # one unit whole at a time, never the whole model: it unsharded everything at once, its 4-bit base included
    assert outcome["elements"]["most_whole_while_saving"] < outcome["elements"]["model"]
    # without an auto_wrap_policy the root unit holds the adapters: AdapterExport passes it (trainer.strategy.model)
    assert outcome["root_unit"] == complete
    # why: unsharding model alone leaves the root unit's adapters sharded, which the save refuses, writing nothing
    assert "is this rank's shard of an FSDP1 flat parameter" in outcome["root_not_passed_error"]
    assert "sharded_root" in outcome["root_not_passed_error"] and not outcome["root_not_passed_folder"]


def test_under_fsdp1_the_module_clips_through_the_root_units_clip_grad_norm():
    """Lightning's FSDPPrecision raises for clipping by norm, and the LLaMA-2 settings clip at 1.0: the FSDP-QLoRA
    run failed at its first optimizer step."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from malora_lightning.module import MALoRAModule

    clipped = []
    strategy = FSDPStrategy()
    strategy.model = SimpleNamespace(clip_grad_norm_=clipped.append)
    module = MALoRAModule(quantization=None)
    module._trainer = SimpleNamespace(strategy=strategy)
    module.configure_gradient_clipping(None, 1.0, "norm")
    assert clipped == [1.0]
