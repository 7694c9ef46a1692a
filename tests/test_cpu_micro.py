"""benchmarks/cpu_micro.py's AdamW group: one optimizer per kind over exactly a quality configuration's trainable
tensors on SmolLM2 (shapes from the meta device; never timed here)."""

from benchmarks.cpu_micro import adamw_group
from benchmarks.quality import trainable_parameters


def test_adamw_group_steps_over_the_configurations_trainable_tensors():
    variants = adamw_group("lora_r16")
    assert set(variants) == {f"lora_r16 AdamW {kind}" for kind in ("loop", "foreach", "fused")}
    for step in variants.values():
        optimizer = step.__self__
        params = optimizer.param_groups[0]["params"]
        assert sum(p.numel() for p in params) == trainable_parameters("lora_r16")  # 4.33 M
        before = params[0].detach().clone()
        step()
        assert not params[0].detach().equal(before)
