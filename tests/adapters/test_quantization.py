import importlib.util
import re

import bitsandbytes as bnb
import lightning as L
import pytest
import torch
from torch import nn

from malora_lightning.adapters import (
    AdapterConfig,
    aux_loss,
    count_parameters,
    disable_bnb_cpu_weight_packing,
    inject_adapters,
    load_base_model,
)
from malora_lightning.adapters.layers import MALoRALinear
from malora_lightning.adapters.quantization import as_dtype, base_compute_dtype
from tests.helpers import tiny_model


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    return path


@pytest.mark.parametrize("quantization", ["nf4", "fp4"])
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_4bit_forward_and_backward_on_cpu(tiny_llama_dir, quantization, compute_dtype):
    model = load_base_model(str(tiny_llama_dir), quantization=quantization, compute_dtype=compute_dtype)
    linear4bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4bit) == 14  # every projection; the head stays unquantized
    assert all(not m.support_avx512bf16_for_cpu for m in linear4bit)
    unquantized = [p for p in model.parameters() if not isinstance(p, bnb.nn.Params4bit)]
    assert unquantized and all(p.dtype == torch.float32 for p in unquantized)  # as PEFT's k-bit preparation does
    assert not any(p.requires_grad for p in model.parameters())

    ids = torch.randint(3, 200, (2, 8))
    before = model(ids).logits
    inject_adapters(model, AdapterConfig(rank=2, shared_rank=8, num_experts=4, dropout=0.0))
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, MALoRALinear) and isinstance(layer.base_layer, bnb.nn.Linear4bit)
    assert layer.lora_B.dtype == torch.float32
    model.train()
    output = model(ids, attention_mask=torch.ones_like(ids), labels=ids)
    torch.testing.assert_close(output.logits, before)  # zero-initialised B: the base function is unchanged
    (output.loss + aux_loss(model)).backward()
    first = model.model.layers[0].self_attn.q_proj
    assert first.lora_B.grad is not None and first.lora_B.grad.abs().sum() > 0
    assert first.router.weight.grad is not None  # from the aux loss at step 0


def test_4bit_parameter_count_equals_the_unquantized_count(tiny_llama_dir):
    plain = count_parameters(load_base_model(str(tiny_llama_dir)))
    quantized = count_parameters(load_base_model(str(tiny_llama_dir), quantization="nf4"))
    assert quantized.total == plain.total == count_parameters(tiny_model("llama")).total


def test_int8_base_trains_adapters(tiny_llama_dir):
    model = load_base_model(str(tiny_llama_dir), quantization="int8")
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())
    inject_adapters(model, AdapterConfig(method="lora", rank=2))
    model.train()
    ids = torch.randint(3, 200, (2, 8))
    model(ids, labels=ids).loss.backward()
    grads = [m.lora_B.grad for m in model.modules() if hasattr(m, "lora_B")]
    assert len(grads) == 12 and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_bad_quantization_mode_and_missing_model_are_explained(tmp_path):
    with pytest.raises(ValueError, match=r"quantization='nf8' is invalid: expected None or one of \('nf4', 'fp4', 'int8'\)"):
        load_base_model("anything", quantization="nf8")
    with pytest.raises(ValueError, match="compute_dtype='float8' is invalid"):
        load_base_model("anything", quantization="nf4", compute_dtype="float8")
    for value in ("false", None):  # transformers ran a folder's own code for "false", and asked stdin for None
        with pytest.raises(ValueError, match=f"trust_remote_code={value!r} is invalid: expected True or False"):
            load_base_model("anything", trust_remote_code=value)
    with pytest.raises(OSError, match="could not load model .*no-such-model"):
        load_base_model(str(tmp_path / "no-such-model"))


class FirstLayerThenFrozen4bit(L.LightningModule):
    """Linear -> frozen 4-bit Linear -> head: the first layer's gradient must cross the 4-bit layer."""

    def __init__(self, apply_fix: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(64, 64)
        dense = nn.Linear(64, 64, bias=False)
        self.frozen = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        self.frozen.load_state_dict(dense.state_dict())
        self.frozen = self.frozen.to("cpu")  # quantizes
        self.frozen.weight.requires_grad_(False)
        self.head = nn.Linear(64, 1)
        if apply_fix:
            disable_bnb_cpu_weight_packing(self)
        self.missing_gradients = 0

    def forward(self, x):
        return self.head(self.frozen(self.first(x)))

    def training_step(self, batch, batch_index):
        return self(batch[0]).square().mean()

    def on_after_backward(self):
        self.missing_gradients += self.first.weight.grad is None

    def validation_step(self, batch, batch_index):
        self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.01)


def fit(module: L.LightningModule) -> None:
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 64)), batch_size=4)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, num_sanity_val_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data, data)


HAS_AVX512_BF16 = bool(bnb.functional.has_avx512bf16())


def test_fixed_model_keeps_gradients_after_the_sanity_check():
    fixed = FirstLayerThenFrozen4bit(apply_fix=True)
    fit(fixed)
    assert fixed.missing_gradients == 0
    assert not getattr(fixed.frozen.weight.quant_state, "packing_format_for_cpu", False)


@pytest.mark.skipif(not HAS_AVX512_BF16, reason="the trap needs a CPU with AVX512-BF16 (bitsandbytes packs only there)")
def test_regression_without_the_fix_the_sanity_check_kills_gradients():
    unfixed = FirstLayerThenFrozen4bit(apply_fix=False)
    with pytest.warns(UserWarning, match="autograd kernel was not registered"):
        fit(unfixed)
    assert unfixed.missing_gradients == 4  # every step lost its gradient after the sanity check


def test_fix_stops_eval_forwards_from_packing_even_where_packing_is_supported():
    """Hardware-independent: force the flag bitsandbytes sets on AVX512-BF16 CPUs, then check the fix disarms it."""
    layer = FirstLayerThenFrozen4bit(apply_fix=False).frozen
    layer.support_avx512bf16_for_cpu = True
    disable_bnb_cpu_weight_packing(layer)
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(3, 64))
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)


@pytest.mark.skipif(not HAS_AVX512_BF16, reason="the packed kernel is only correct on AVX512-BF16 CPUs")
def test_fix_unpacks_a_layer_that_was_already_packed():
    layer = FirstLayerThenFrozen4bit(apply_fix=False).frozen.eval()
    x = torch.randn(3, 64)
    with torch.no_grad():
        before = layer(x)
    assert layer.weight.quant_state.packing_format_for_cpu
    disable_bnb_cpu_weight_packing(layer)
    layer.train()
    inputs = x.clone().requires_grad_(True)
    out = layer(inputs)
    out.sum().backward()
    assert inputs.grad is not None
    torch.testing.assert_close(out, before, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_unpacking_gives_each_block_its_own_absmax_without_double_quantization(quant_type):
    """bitsandbytes' inverse of its CPU packing left a plain (not double-quantized) absmax transposed: each 64-weight
    block dequantized with another block's scale (max error 0.005 on weights of 0.09). Reference: the stored 4-bit
    codes times the documented code table and each block's absmax, rounded to bfloat16 as the packing stores it."""
    torch.manual_seed(0)
    dense = nn.Linear(128, 64, bias=False)
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type=quant_type,
                              compress_statistics=False)
    layer.load_state_dict(dense.state_dict())
    layer = layer.to("cpu")  # quantizes
    codes, state = layer.weight.data.flatten().long(), layer.weight.quant_state
    table = bnb.functional.get_4bit_type(quant_type, device="cpu").double()
    values = table[torch.stack([codes >> 4, codes & 15], dim=1).flatten()]  # first weight in the high nibble
    absmax = state.absmax.bfloat16().double().repeat_interleave(state.blocksize)
    expected = (values * absmax).reshape(64, 128)
    # what an eval forward without gradients does on an AVX512-BF16 CPU (forced, so that any CPU checks it)
    layer.weight.data, layer.weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(layer.weight.data,
                                                                                               state)
    disable_bnb_cpu_weight_packing(layer)
    unpacked = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    torch.testing.assert_close(unpacked.double(), expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_unpacking_a_double_quantized_layer_gives_back_its_weights(quant_type):
    """With double quantization (the default, QLoRA's) bitsandbytes' inverse re-quantizes the absmax itself, in the
    stored order: the weights dequantize as before the packing, up to its bfloat16 rounding of the absmax (2**-9 of a
    weight; a block read with another block's scale is off by ~0.005 on these weights of ~0.09)."""
    torch.manual_seed(0)
    dense = nn.Linear(128, 64, bias=False)
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type=quant_type)
    layer.load_state_dict(dense.state_dict())
    layer = layer.to("cpu")  # quantizes
    state = layer.weight.quant_state
    assert state.nested
    before = bnb.functional.dequantize_4bit(layer.weight.data, state)
    layer.weight.data, layer.weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(layer.weight.data,
                                                                                               state)
    assert disable_bnb_cpu_weight_packing(layer) == 1
    assert layer.weight.quant_state.nested and not layer.weight.quant_state.packing_format_for_cpu
    unpacked = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    torch.testing.assert_close(unpacked, before, rtol=2 ** -8, atol=1e-6)


def test_without_bitsandbytes_nothing_is_touched(monkeypatch):
    from malora_lightning.adapters import bnb_cpu

    def not_installed():
        raise ImportError("No module named 'bitsandbytes'")

    monkeypatch.setattr(bnb_cpu, "import_bitsandbytes", not_installed)
    assert disable_bnb_cpu_weight_packing(tiny_model("llama")) == 0


def test_a_folder_stored_in_4bit_refuses_another_quantization(tiny_llama_dir, tmp_path):
    """transformers loads such a folder as stored and only warns; the run would not be what its settings say."""
    stored = tmp_path / "stored-nf4"
    load_base_model(str(tiny_llama_dir), quantization="nf4", compute_dtype="float32",
                    prepare_for_training=False).save_pretrained(stored)
    with pytest.raises(ValueError, match=r"stored quantized with bitsandbytes 'nf4', but quantization='int8'"):
        load_base_model(str(stored), quantization="int8")
    with pytest.raises(ValueError, match=r"'nf4', but quantization=None"):
        load_base_model(str(stored), quantization=None)
    load_base_model(str(stored), quantization="nf4", compute_dtype="float32")  # as stored: fine
    # its packed storage too: FSDP needs the one asked for, and transformers loads the stored one with a warning
    with pytest.raises(ValueError, match=r"stored in 4-bit packed as uint8, but quant_storage='bfloat16' was asked"):
        load_base_model(str(stored), quantization="nf4", quant_storage="bfloat16")
    load_base_model(str(stored), quantization="nf4", quant_storage="uint8", compute_dtype="float32")


@pytest.mark.parametrize(("saved", "asked"), [("float32", "bfloat16"), ("bfloat16", "float32")])
def test_a_folder_stored_in_4bit_computes_in_the_compute_dtype_asked_for(tiny_llama_dir, tmp_path, saved, asked):
    """transformers loads a stored 4-bit folder with the compute dtype it was saved with and ignores the one asked
    for (a warning only): compute_dtype='bfloat16' on a folder saved computing in float32 ran in float32. Reference:
    the dequantized weight and the input rounded to the asked dtype, multiplied in float64."""
    stored = tmp_path / "stored-nf4"
    load_base_model(str(tiny_llama_dir), quantization="nf4", compute_dtype=saved, dtype="float32",
                    prepare_for_training=False).save_pretrained(stored)
    model = load_base_model(str(stored), quantization="nf4", compute_dtype=asked, dtype="float32")
    compute = getattr(torch, asked)
    assert base_compute_dtype(model) == asked
    layer = model.model.layers[0].mlp.down_proj
    weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(compute).double()
    x = torch.randn(5, layer.in_features, requires_grad=True)
    output = layer(x)
    output.sum().backward()
    expected = x.detach().to(compute).double() @ weight.T
    expected_grad = weight.sum(0).expand(5, -1)
    if compute is torch.bfloat16:  # computed in bfloat16, returned in the input's float32: bfloat16 values
        assert torch.equal(output, output.bfloat16().float()) and torch.equal(x.grad, x.grad.bfloat16().float())
        tolerance = {"rtol": 2**-7, "atol": 1e-3}
    else:
        tolerance = {"rtol": 0, "atol": 1e-5}
    torch.testing.assert_close(output.double(), expected, **tolerance)
    torch.testing.assert_close(x.grad.double(), expected_grad, **tolerance)


@pytest.mark.parametrize("field", ["compute_dtype", "dtype"])
def test_uint8_is_a_storage_dtype_only(tiny_llama_dir, field):
    """It was offered for all three settings, and as compute_dtype or dtype failed inside transformers."""
    with pytest.raises(ValueError, match=rf"{field}='uint8' is invalid: expected one of \('bfloat16', 'float16', "
                                         r"'float32'\)"):
        load_base_model(str(tiny_llama_dir), quantization="nf4", **{field: "uint8"})


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_a_storage_dtype_without_a_4bit_base_is_refused(tiny_llama_dir, quantization):
    """It was accepted and did nothing (MALoRAModule refused it; load_base_model did not)."""
    with pytest.raises(ValueError, match=rf"quant_storage='bfloat16' is the storage dtype of packed 4-bit weights, "
                                         rf"and quantization is {quantization!r}: set quantization to one of"):
        load_base_model(str(tiny_llama_dir), quantization=quantization, quant_storage="bfloat16")


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_an_attention_kernel_whose_package_is_missing_is_named(tiny_llama_dir):
    """transformers' ImportError named no setting, and the command printed it as a traceback."""
    with pytest.raises(ValueError, match=r"attn_implementation='flash_attention_2' cannot load model .*FlashAttention2 "
                                         r".*use 'sdpa', 'eager' or None"):
        load_base_model(str(tiny_llama_dir), quantization=None, attn_implementation="flash_attention_2")


def test_an_import_error_without_an_attention_setting_is_transformers_own(tiny_llama_dir, monkeypatch):
    """Only an attention kernel's missing package is explained as attn_implementation's; any other ImportError (a
    package the model's code needs) reaches the caller as transformers raised it."""
    import transformers

    def missing_package(*args, **kwargs):
        raise ImportError("this model needs the package 'einops'")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", missing_package)
    with pytest.raises(ImportError, match=r"^this model needs the package 'einops'$"):
        load_base_model(str(tiny_llama_dir), quantization=None)


@pytest.mark.parametrize("trust_remote_code", [False, True])
def test_a_value_error_not_about_remote_code_is_transformers_own(tmp_path, trust_remote_code):
    """A config transformers cannot read is not explained as needing trust_remote_code, asked for or not."""
    (tmp_path / "config.json").write_text('{"model_type": "no_such_family"}')
    with pytest.raises(ValueError, match=r"^The checkpoint you are trying to load has model type `no_such_family` "
                                         r"but Transformers does not recognize this architecture"):
        load_base_model(str(tmp_path), trust_remote_code=trust_remote_code)


@pytest.mark.parametrize(("value", "field", "expected"), [
    ("bfloat16", "compute_dtype", torch.bfloat16), (torch.float16, "dtype", torch.float16),
    (torch.uint8, "quant_storage", torch.uint8), ("uint8", "quant_storage", torch.uint8),
])
def test_a_dtype_setting_takes_a_name_or_a_torch_dtype_of_the_fields_kinds(value, field, expected):
    assert as_dtype(value, field) is expected


@pytest.mark.parametrize(("value", "field"), [(torch.int8, "compute_dtype"), (torch.uint8, "dtype"),
                                              (torch.float64, "compute_dtype"), ("int4", "quant_storage")])
def test_a_dtype_setting_of_another_kind_is_refused_by_name_even_as_a_torch_dtype(value, field):
    """A torch.dtype went through unchecked: `compute_dtype=torch.int8` failed inside bitsandbytes, naming nothing."""
    with pytest.raises(ValueError, match=rf"^{field}={re.escape(repr(value))} is invalid: expected one of \("):
        as_dtype(value, field)
