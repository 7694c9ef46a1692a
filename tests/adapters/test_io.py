import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import malora_lightning.adapters.io as adapter_io
import malora_lightning.atomic as atomic
from malora_lightning.adapters.io import peft_key, read_adapter_folder
from malora_lightning.adapters import (
    AdapterConfig,
    adapter_layers,
    adapter_state_dict,
    inject_adapters,
    load_adapters,
    save_adapters,
)
from tests.helpers import forkserver, tiny_model

ADAPTER_FOLDER = ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def trained_model(method="malora", **overrides):
    settings = dict(method=method, rank=2, shared_rank=4, num_experts=4, train_shared_A=False)
    settings.update(overrides)
    model = inject_adapters(tiny_model("llama"), AdapterConfig(**settings))
    with torch.no_grad():
        for param in adapter_state_dict(model).values():
            param.add_(torch.randn_like(param))  # make every tensor distinct from its initialisation
    return model


@pytest.mark.parametrize("method", ["lora", "molora", "malora"])
def test_round_trip_is_bit_exact_and_holds_adapter_tensors_only(tmp_path, method):
    model = trained_model(method)
    save_adapters(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ADAPTER_FOLDER
    stored = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert set(stored) == {peft_key(key) for key in adapter_state_dict(model)}
    assert not any("base_layer" in key or "embed" in key for key in stored)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == method.upper()

    fresh = load_adapters(tiny_model("llama"), tmp_path / "adapter")
    for key, value in adapter_state_dict(model).items():
        assert torch.equal(adapter_state_dict(fresh)[key], value), key
    ids = torch.randint(3, 200, (2, 6))
    assert torch.equal(fresh(ids).logits, model(ids).logits)
    assert not any(p.requires_grad for p in fresh.parameters())  # loaded for inference


def test_saving_the_same_adapters_twice_writes_the_same_bytes(tmp_path):
    """safetensors wrote the header's metadata in a random order: identical tensors, different file hashes."""
    model = trained_model()
    files = [save_adapters(model, tmp_path / name) / "adapter_model.safetensors" for name in ("first", "second")]
    assert files[0].read_bytes() == files[1].read_bytes()
    with safe_open(str(files[0]), framework="pt") as stored:
        metadata = stored.metadata()
        assert set(stored.keys()) == {peft_key(key) for key in adapter_state_dict(model)}
    length = int.from_bytes(files[0].read_bytes()[:8], "little")
    header = json.loads(files[0].read_bytes()[8:8 + length])
    assert list(header["__metadata__"]) == sorted(metadata) and len(metadata) > 2 and length % 8 == 0


@pytest.mark.parametrize("method", ["lora", "malora"])
def test_a_model_cast_after_injection_reloads_in_the_dtype_it_computed_in(tmp_path, method):
    """Lightning's bf16-true casts the whole module: the saved config now says bfloat16, as the tensors are, where it
    said float32 and the reload computed in float32 (logits off by up to 2.6)."""
    model = trained_model(method).to(torch.bfloat16)
    save_adapters(model, tmp_path / "adapter")
    assert json.loads(read_adapter_folder(tmp_path / "adapter").config.to_json())["adapter_dtype"] == "bfloat16"
    fresh = load_adapters(tiny_model("llama").to(torch.bfloat16), tmp_path / "adapter")
    assert {p.dtype for p in adapter_state_dict(fresh).values()} == {torch.bfloat16}
    ids = torch.randint(3, 200, (2, 6))
    assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_frozen_ablation_tensors_are_saved_and_trainable_reload_respects_switches(tmp_path):
    model = trained_model("malora", train_shared_A=False)
    save_adapters(model, tmp_path / "a")
    assert any(key.endswith("shared_A.weight") for key in load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    fresh = load_adapters(tiny_model("llama"), tmp_path / "a", trainable=True)
    trainable = {name.rsplit(".", 1)[-1] for name, p in fresh.named_parameters() if p.requires_grad}
    assert trainable == {"lora_P", "lora_B", "weight"}  # router.weight; S_A stays frozen


def test_load_into_an_already_injected_model(tmp_path):
    model = trained_model()
    save_adapters(model, tmp_path / "a")
    target = inject_adapters(tiny_model("llama"), read_adapter_folder(tmp_path / "a").config)
    load_adapters(target, tmp_path / "a")
    assert all(torch.equal(adapter_state_dict(target)[k], v) for k, v in adapter_state_dict(model).items())


@pytest.mark.parametrize(("method", "saved", "injected", "named"), [
    ("lora", {"alpha": 32.0}, {"alpha": 4.0}, "scaling (folder 16.0, model 2.0)"),
    ("lora", {}, {"train_A": False}, "train_A (folder True, model False)"),
    ("molora", {"top_k": 1}, {"top_k": 4}, "top_k (folder 1, model 4)"),
    ("malora", {}, {"renormalize_top_k": False}, "renormalize_top_k (folder True, model False)"),
    ("malora", {"train_P": False}, {}, "train_P (folder False, model True)"),
])
def test_loading_into_adapters_that_compute_differently_is_refused_by_setting(tmp_path, method, saved, injected,
                                                                             named):
    """Same shapes, different function: the loaded weights would silently compute something else (logits off by up
    to 6 on this model)."""
    save_adapters(trained_model(method, **saved), tmp_path / "a")
    settings = dict(method=method, rank=2, shared_rank=4, num_experts=4, train_shared_A=False)
    target = inject_adapters(tiny_model("llama"), AdapterConfig(**(settings | injected)))
    with pytest.raises(ValueError, match=r"compute differently from the saved ones: .*" + re.escape(named)):
        load_adapters(target, tmp_path / "a")
    other_kernel = AdapterConfig(**(settings | saved | {"kernel": "sparse", "dropout": 0.2, "aux_loss_coef": 0.1}))
    load_adapters(inject_adapters(tiny_model("llama"), other_kernel), tmp_path / "a")  # kernel and losses may differ


def test_method_mismatch_is_named(tmp_path):
    save_adapters(trained_model("malora"), tmp_path / "a")
    lora_model = inject_adapters(tiny_model("llama"), AdapterConfig(method="lora", rank=2))
    with pytest.raises(ValueError, match="adapter method 'malora' does not match the model's injected adapters 'lora'"):
        load_adapters(lora_model, tmp_path / "a")


def rewrite_tensors(path, edit, keep_sha256=False):
    """Edit the stored tensors (keyed by our names) and write them back with the file's own metadata, as a tool of
    the user's would: without the SHA-256 of the tensors, unless `keep_sha256` (then it is the old tensors')."""
    file = path / "adapter_model.safetensors"
    with safe_open(str(file), framework="pt") as stored:
        metadata = stored.metadata()
    if not keep_sha256:
        del metadata[adapter_io.METADATA_TENSORS_SHA256]
    tensors = {key.removeprefix("base_model.model.").removesuffix(".weight"): value
               for key, value in load_file(str(file)).items()}
    edit(tensors)
    save_file({peft_key(key): value for key, value in tensors.items()}, str(file), metadata=metadata)


def test_tensors_changed_after_saving_are_refused_by_their_sha256(tmp_path):
    """safetensors has no checksum: a weights file damaged after it was written (a few bytes of one tensor zeroed
    here) loaded the changed values silently, unless they became NaN or infinite."""
    model = trained_model()
    save_adapters(model, tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    recorded = read_adapter_folder(tmp_path / "a").tensors_sha256
    stored = load_file(str(weights))
    assert recorded == adapter_io.tensors_sha256(stored, stored.__getitem__)
    load_adapters(tiny_model("llama"), tmp_path / "a")  # as saved: loads

    data = bytearray(weights.read_bytes())
    data[-64:-56] = bytes(8)  # inside the last tensor's values, past the header
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{re.escape(str(weights))}: its tensors are not those it was saved with "
                                         rf"\(their SHA-256 is [0-9a-f]{{64}}, the file records {recorded} under "
                                         r"malora_lightning\.tensors_sha256\): it was damaged or changed"):
        load_adapters(tiny_model("llama"), tmp_path / "a")

    save_adapters(model, tmp_path / "b")
    rewrite_tensors(tmp_path / "b", lambda t: t["model.layers.0.mlp.up_proj.lora_B"].add_(1e-3), keep_sha256=True)
    with pytest.raises(ValueError, match=r"its tensors are not those it was saved with"):
        load_adapters(tiny_model("llama"), tmp_path / "b")


def test_missing_tensor_is_named(tmp_path):
    save_adapters(trained_model(), tmp_path / "a")
    rewrite_tensors(tmp_path / "a", lambda t: t.pop("model.layers.1.mlp.down_proj.lora_P"))
    with pytest.raises(ValueError, match="missing adapter tensor 'base_model.model.model.layers.1.mlp.down_proj.lora_P.weight'"):
        load_adapters(tiny_model("llama"), tmp_path / "a")


@pytest.mark.parametrize("shape", [(4, 16, 3), (16, 2)], ids=["rank", "not-stacked"])
def test_shape_mismatch_is_named(tmp_path, shape):
    """In the folder's layout (each B_t [m, r], as PEFT stores B), whatever the layer holds; a 2-D tensor where the
    stacked experts' B belongs raised IndexError from the transposition."""
    save_adapters(trained_model(), tmp_path / "a")

    def grow(tensors):
        tensors["model.layers.0.self_attn.k_proj.lora_B"] = torch.zeros(shape)

    rewrite_tensors(tmp_path / "a", grow)
    stored = re.escape(str(shape))
    with pytest.raises(ValueError, match=rf"tensor 'base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight' has shape {stored}, "
                                         r"the model expects \(4, 16, 2\)"):
        load_adapters(tiny_model("llama"), tmp_path / "a")


def test_unexpected_tensor_is_named(tmp_path):
    save_adapters(trained_model(), tmp_path / "a")
    rewrite_tensors(tmp_path / "a", lambda t: t.update({"model.layers.7.mlp.up_proj.lora_B": torch.zeros(1)}))
    with pytest.raises(ValueError, match="tensor 'base_model.model.model.layers.7.mlp.up_proj.lora_B.weight' does not belong"):
        load_adapters(tiny_model("llama"), tmp_path / "a")


@pytest.mark.parametrize(("config_text", "error"), [
    ('{"peft_type": "LORA", ', r"adapter_config\.json: not valid JSON \(Expecting property name"),
    ('["LORA"]', r"adapter_config\.json: expected a JSON object, found list"),
    # the weights' metadata (a LoRA) is what loads: a JSON naming another method made the folder two adapters
    ('{"peft_type": "MALORA"}', r"adapter_config\.json: peft_type 'MALORA' does not match the lora adapter in "
                                r"adapter_model\.safetensors \(expected 'LORA'\)"),
])
def test_an_adapter_config_that_is_no_config_object_names_its_file(tmp_path, config_text, error):
    save_adapters(trained_model("lora"), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(config_text)
    with pytest.raises(ValueError, match=error):
        read_adapter_folder(tmp_path / "a")


def test_a_folder_of_neither_layout_is_named(tmp_path):
    folder = tmp_path / "a"
    save_adapters(trained_model("lora"), folder)
    weights = folder / "adapter_model.safetensors"
    save_file(load_file(str(weights)), str(weights))  # no AdapterConfig in the header
    (folder / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))  # no peft_type, no method
    with pytest.raises(ValueError, match=r"adapter_config\.json: neither a PEFT adapter config \(no 'peft_type'\) nor "
                                         r"a malora_lightning one"):
        read_adapter_folder(folder)


def test_a_save_on_a_rank_that_does_not_write_leaves_the_disk_alone(tmp_path):
    """write=False: the rank takes part in gathering the tensors and returns the folder rank zero writes."""
    assert save_adapters(trained_model("lora"), tmp_path / "a", write=False) == tmp_path / "a"
    assert list(tmp_path.iterdir()) == []


def test_adapter_tensors_of_mixed_dtypes_keep_the_configs_dtype():
    """Only one dtype shared by every tensor can stand for the adapters in the stored config."""
    config = AdapterConfig(method="lora", rank=2, adapter_dtype="float16")  # neither of the mixed tensors' dtypes
    mixed = {"a": torch.zeros(2, 2), "b": torch.zeros(2, 2, dtype=torch.bfloat16)}
    assert adapter_io.config_as_stored(config, mixed) == config
    assert adapter_io.config_as_stored(config, {"a": torch.zeros(2, 2, dtype=torch.bfloat16)}).adapter_dtype == \
        "bfloat16"


def test_an_uninstalled_source_tree_records_its_version_as_unknown(monkeypatch):
    from importlib.metadata import PackageNotFoundError

    def not_installed(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(adapter_io, "version", not_installed)
    assert adapter_io.library_version() == "unknown"


def test_missing_files_are_explained(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json not found"):
        load_adapters(tiny_model("llama"), tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"adapter folder .*no-such-parent/a not found \(a folder written by "
                                                r"save_adapters or by PEFT's save_pretrained\)$"):
        load_adapters(tiny_model("llama"), tmp_path / "no-such-parent" / "a")  # no folder to look for a staged save in
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")  # the weights file given for its folder: "not found"
    with pytest.raises(NotADirectoryError, match=r"adapter folder .*adapter_model.safetensors is a file: give the "
                                                 r"folder that holds adapter_config.json"):
        load_adapters(tiny_model("llama"), tmp_path / "adapter_model.safetensors")


def test_save_requires_adapters(tmp_path):
    with pytest.raises(ValueError, match="has no adapters"):
        save_adapters(tiny_model("llama"), tmp_path / "a")


def test_a_crash_while_saving_leaves_the_previous_adapter_intact(tmp_path, monkeypatch):
    first = trained_model()
    save_adapters(first, tmp_path / "a")
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}

    def crash_midway(path, tensors, metadata):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(adapter_io, "write_safetensors", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        save_adapters(trained_model(), tmp_path / "a")
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no staging debris left behind


def test_saving_into_an_adapter_folder_keeps_the_users_other_files(tmp_path):
    save_adapters(trained_model(), tmp_path / "a")
    (tmp_path / "a" / "notes.txt").write_text("my notes")
    (tmp_path / "a" / "scores.csv").write_text("task,acc\n")
    save_adapters(trained_model(), tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "notes.txt", "scores.csv"]
    assert (tmp_path / "a" / "notes.txt").read_text() == "my notes"


@pytest.mark.parametrize("method", ["molora", "malora"])
def test_a_mixtures_up_projections_are_stored_as_peft_stores_b(tmp_path, method):
    """PEFT stores B as [out, r]: the folder holds each expert's B_t as [N, m, r], the transpose of the [N, r, m]
    the layers compute with (B_t = lora_B[t].T, as test_layers' token-by-token Eq. 7 reference reads it), in every
    routed layer. Before, only a shape quoted in a mismatch error pinned this."""
    model = trained_model(method)
    save_adapters(model, tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    layers = adapter_layers(model)
    assert len(layers) == 12
    for name, layer in layers.items():
        stored = saved[peft_key(f"{name}.lora_B")]
        assert stored.shape == (4, layer.out_features, layer.rank), name
        for expert in range(4):
            assert torch.equal(stored[expert], layer.lora_B[expert].t()), f"{name} expert {expert}"


def test_a_folder_of_other_files_or_a_file_is_refused(tmp_path):
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"project holds files that are not an adapter \(notes.txt\)"):
        save_adapters(trained_model(), tmp_path / "project")
    assert [p.name for p in (tmp_path / "project").iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        save_adapters(trained_model(), tmp_path / "file")


def _save_and_die(folder: str, moves_before_kill: int) -> None:
    """Saves a new adapter over `folder` and dies, as if killed (no cleanup, no finally blocks), after that many of
    the commit's file moves (-1: while writing the commit marker), having written the tensors it saves beside it."""
    torch.manual_seed(1)
    model = trained_model()
    save_file({k: v.detach().contiguous() for k, v in adapter_state_dict(model).items()}, folder + ".expected")
    real_replace, moved = os.replace, []

    def replace_then_die(source, target) -> None:
        if "adapter_" in str(source):  # one of the commit's moves (not the commit marker's own atomic write)
            if len(moved) == moves_before_kill:
                os._exit(9)
            moved.append(source)
        real_replace(source, target)

    if moves_before_kill < 0:
        atomic.atomic_write_bytes = lambda *args, **kwargs: os._exit(9)
    else:
        atomic.os.replace = replace_then_die
    save_adapters(model, folder)


def killed_save(folder, moves_before_kill):
    """Save a new adapter over `folder` in a process that dies after that many of the commit's file moves (-1:
    before the commit marker exists); returns the tensors it was saving."""
    process = forkserver().Process(target=_save_and_die, args=(str(folder), moves_before_kill))
    process.start()
    process.join(timeout=120)
    assert process.exitcode == 9
    return load_file(str(folder) + ".expected")


@pytest.mark.parametrize("moves_before_kill", [0, 1])
def test_a_save_killed_during_its_commit_is_completed_by_the_next_load(tmp_path, moves_before_kill):
    save_adapters(trained_model(), tmp_path / "a")
    expected = killed_save(tmp_path / "a", moves_before_kill)
    assert (tmp_path / "a" / ".malora-staging" / "COMMITTED").is_file()  # the kill left the commit half done
    loaded = load_adapters(tiny_model("llama"), tmp_path / "a")
    for key, value in adapter_state_dict(loaded).items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ADAPTER_FOLDER


def test_a_save_killed_before_its_commit_leaves_the_old_adapter(tmp_path):
    first = trained_model()
    save_adapters(first, tmp_path / "a")
    killed_save(tmp_path / "a", -1)
    assert (tmp_path / "a" / ".malora-staging").is_dir()  # staged, never committed
    save_adapters(trained_model(), tmp_path / "b")  # unrelated work goes on
    loaded = load_adapters(tiny_model("llama"), tmp_path / "a")
    for key, value in adapter_state_dict(loaded).items():
        torch.testing.assert_close(value, adapter_state_dict(first)[key], rtol=0, atol=0, msg=key)
    assert not (tmp_path / "a" / ".malora-staging").exists()


def test_leftovers_beside_an_adapter_folder_are_never_moved_or_deleted(tmp_path):
    """The save scheme before 7056a26 swapped whole folders beside the target (`.a.<8 chars>.tmp` staged, `.old`
    the previous one). A load or save touches none of them, nor a user's backup that looks alike; when the folder
    itself is missing, the error names a complete staged adapter to rename."""
    for name, leftover in (("staged", ".a.k3j9x_2q.tmp"), ("old", ".a.8fh2m1zz.old"), ("backup", ".a.v1.old")):
        save_adapters(trained_model(), tmp_path / name)
        (tmp_path / name / "README.md").unlink()  # that scheme wrote the two adapter files only
        (tmp_path / name).rename(tmp_path / leftover)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(FileNotFoundError, match=r"adapter folder .*a not found .*\.a\.k3j9x_2q\.tmp looks like the "
                                                r"complete adapter .* rename it to a"):
        load_adapters(tiny_model("llama"), tmp_path / "a")
    save_adapters(trained_model(), tmp_path / "b")
    load_adapters(tiny_model("llama"), tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["b"])
    (tmp_path / ".a.k3j9x_2q.tmp").rename(tmp_path / "a")
    load_adapters(tiny_model("llama"), tmp_path / "a")


def test_a_users_folder_named_like_the_staging_folder_is_refused_not_deleted(tmp_path):
    """A load or save completed or deleted any `.malora-staging` folder by its name, the user's files inside with it."""
    first = trained_model()
    save_adapters(first, tmp_path / "a")
    (tmp_path / "a" / ".malora-staging").mkdir()
    (tmp_path / "a" / ".malora-staging" / "my_backup.safetensors").write_text("precious")
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir() if p.is_file()}
    message = r"a/\.malora-staging was not made by malora_lightning .* move or rename it"
    with pytest.raises(FileExistsError, match=message):
        load_adapters(tiny_model("llama"), tmp_path / "a")
    with pytest.raises(FileExistsError, match=message):
        save_adapters(trained_model(), tmp_path / "a")
    assert (tmp_path / "a" / ".malora-staging" / "my_backup.safetensors").read_text() == "precious"
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir() if p.is_file()} == before
    (tmp_path / "a" / ".malora-staging").rename(tmp_path / "my-backups")
    loaded = load_adapters(tiny_model("llama"), tmp_path / "a")
    for key, value in adapter_state_dict(loaded).items():
        torch.testing.assert_close(value, adapter_state_dict(first)[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("content", [b"", b"\x00\x01 random bytes, not a header", "truncated"])
def test_an_unreadable_weights_file_is_named(tmp_path, content):
    save_adapters(trained_model(), tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200] if content == "truncated" else content)
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: not a readable safetensors file"):
        load_adapters(tiny_model("llama"), tmp_path / "a")


def edit_stored_config(folder: Path, edit) -> None:
    """Rewrite the AdapterConfig JSON that our weights file's header carries through `edit` (str -> str)."""
    weights = folder / "adapter_model.safetensors"
    with safe_open(str(weights), framework="pt") as stored:
        metadata, tensors = stored.metadata(), {key: stored.get_tensor(key) for key in stored.keys()}
    metadata[adapter_io.METADATA_CONFIG] = edit(metadata[adapter_io.METADATA_CONFIG])
    save_file(tensors, str(weights), metadata=metadata)


@pytest.mark.parametrize("layout, edit, error", [
    ("ours", lambda text: text[:-5], r"Expecting value"),
    ("ours", lambda text: json.dumps({**json.loads(text), "rank": -1}), r"AdapterConfig\.rank=-1 is invalid"),
    ("ours", lambda text: "3", r"AdapterConfig: expected an object of fields \(a dict, a JSON object\), found int 3"),
    ("legacy", lambda stored: {**stored, "rank": 0}, r"AdapterConfig\.rank=0 is invalid"),
    ("peft", lambda stored: {**stored, "r": 0}, r"AdapterConfig\.rank=0 is invalid"),
    # rsLoRA's sqrt(r) ran before the rank was checked: "math domain error", naming neither file nor field
    ("peft", lambda stored: {**stored, "r": -1, "use_rslora": True}, r"AdapterConfig\.rank=-1 is invalid"),
    ("peft", lambda stored: {**stored, "lora_dropout": "high"}, r"lora_dropout='high' is invalid: expected a number"),
    # each was converted: "0.1" became dropout 0.1, true alpha 1.0 (scale 1 / r); null failed naming no field
    ("peft", lambda stored: {**stored, "lora_dropout": "0.1"}, r"lora_dropout='0\.1' is invalid: expected a number"),
    ("peft", lambda stored: {**stored, "lora_dropout": None}, r"lora_dropout=None is invalid: expected a number"),
    ("peft", lambda stored: {**stored, "lora_alpha": True}, r"lora_alpha=True is invalid: expected a number > 0"),
    ("peft", lambda stored: {**stored, "r": 2.0}, r"r=2\.0 is invalid: expected an integer >= 1"),
    # load_adapted_model and adapter_path failed with "'int' object has no attribute 'startswith'"
    ("peft", lambda stored: {**stored, "base_model_name_or_path": 7},
     r"base_model_name_or_path=7 is invalid: expected the base model's folder or hub id, or null"),
    # a truthy string loaded the factors with rsLoRA's scale, alpha / sqrt(r): twice the trained update at r = 4
    ("peft", lambda stored: {**stored, "use_rslora": "false"},
     r"use_rslora='false' is invalid: expected true, false or null"),
])
def test_an_invalid_stored_adapter_config_names_its_file(tmp_path, layout, edit, error):
    """AdapterConfig's own errors name no file: `malora validate --model.adapter_path` printed "error: Expecting
    value: line 29 column 21" or "AdapterConfig.rank=0 is invalid" alone."""
    folder = tmp_path / "a"
    save_adapters(trained_model("lora"), folder)
    config_file = folder / "adapter_config.json"
    if layout == "ours":
        edit_stored_config(folder, edit)
        source = re.escape(f"{folder / 'adapter_model.safetensors'} (its {adapter_io.METADATA_CONFIG} metadata): ")
    else:
        weights = folder / "adapter_model.safetensors"
        save_file(load_file(str(weights)), str(weights))  # no AdapterConfig in the header, as PEFT or we once wrote
        if layout == "legacy":  # the AdapterConfig itself in adapter_config.json
            config_file.write_text(json.dumps(AdapterConfig(method="lora", rank=2).to_dict()))
        config_file.write_text(json.dumps(edit(json.loads(config_file.read_text()))))
        source = re.escape(f"{config_file}: ")
    with pytest.raises(ValueError, match=source + error):
        read_adapter_folder(folder)


@pytest.mark.parametrize("method, field, value", [
    ("lora", "lora_alpha", 8),  # PEFT would rescale the update; we loaded the saved alpha
    ("lora", "r", 3),
    ("lora", "use_rslora", True),
    ("lora", "use_dora", True),
    ("molora", "top_k", 1),
    ("malora", "num_experts", 2),
    ("malora", "shared_rank", 8),
])
def test_an_adapter_config_edited_after_the_save_is_refused_by_field(tmp_path, method, field, value):
    """Our folder loads from the config in its weights' metadata and PEFT from adapter_config.json: a JSON edited after
    the save made one folder two different adapters, without a word."""
    folder = tmp_path / "a"
    save_adapters(trained_model(method), folder)
    config_file = folder / "adapter_config.json"
    stored = json.loads(config_file.read_text())
    read_adapter_folder(folder)  # as saved: the JSON agrees with the metadata
    config_file.write_text(json.dumps({**stored, field: value}))
    expected = "is not supported" if field == "use_dora" else f", but the adapter in adapter_model.safetensors was " \
        f"saved with {field}={stored[field]!r}"
    with pytest.raises(ValueError, match=re.escape(f"{config_file}: {field}={value!r}") + ".*" + re.escape(expected)):
        read_adapter_folder(folder)


@pytest.mark.parametrize("key, value", [(adapter_io.METADATA_BASE_QUANTIZATION, "nf5"),
                                        (adapter_io.METADATA_BASE_COMPUTE_DTYPE, "float8")])
def test_a_recorded_base_setting_no_base_loads_with_names_the_weights_file(tmp_path, key, value):
    """load_adapted_model loads the base as recorded: it failed in load_base_model, naming neither file nor field."""
    folder = tmp_path / "a"
    save_adapters(trained_model("lora"), folder)
    weights = folder / "adapter_model.safetensors"
    with safe_open(str(weights), framework="pt") as stored:
        metadata, tensors = stored.metadata(), {name: stored.get_tensor(name) for name in stored.keys()}
    save_file(tensors, str(weights), metadata={**metadata, key: value})
    with pytest.raises(ValueError, match=re.escape(f"{weights}: its {key} metadata is {value!r}, which is not one of")):
        read_adapter_folder(folder)


def test_an_adapter_config_that_is_not_utf8_names_its_file(tmp_path):
    """A base name saved as Latin-1 (an editor's default) raised UnicodeDecodeError naming no file."""
    folder = tmp_path / "a"
    save_adapters(trained_model("lora"), folder, base_model="cafe")
    config_file = folder / "adapter_config.json"
    config_file.write_bytes(config_file.read_bytes().replace(b'"cafe"', b'"caf\xe9"'))
    with pytest.raises(ValueError, match=re.escape(f"{config_file}: not UTF-8 text (byte ")):
        read_adapter_folder(folder)


@pytest.mark.parametrize("blank", ["", "  "])
def test_a_blank_base_model_is_read_as_not_recorded(tmp_path, blank):
    """It was taken for a model's name: load_adapted_model tried to load model '' instead of asking for base_model=,
    as it does for null."""
    folder = tmp_path / "a"
    save_adapters(trained_model("lora"), folder, base_model="tiny-base")
    config_file = folder / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": blank}))
    assert read_adapter_folder(folder).base_model is None


def test_integer_adapter_tensors_are_refused_by_name(tmp_path):
    """They were copied into the float weights silently (a folder's 7s loaded as 7.0)."""
    save_adapters(trained_model(), tmp_path / "a")
    rewrite_tensors(tmp_path / "a", lambda t: t.update({"model.layers.0.mlp.up_proj.lora_P": torch.full((4, 2, 4), 7)}))
    with pytest.raises(ValueError, match=r"tensor 'base_model.model.model.layers.0.mlp.up_proj.lora_P.weight' is "
                                         r"torch.int64, where adapter weights are floating point"):
        load_adapters(tiny_model("llama"), tmp_path / "a")


def test_a_shape_mismatch_with_a_model_injected_otherwise_names_the_settings(tmp_path):
    """The message asked whether the folder came from another base; here the model's own injection differs."""
    save_adapters(trained_model(shared_rank=4), tmp_path / "a")
    model = inject_adapters(tiny_model("llama"), AdapterConfig(method="malora", rank=2, shared_rank=8, num_experts=4,
                                                               train_shared_A=False))
    with pytest.raises(ValueError, match=r"shared_A.weight' has shape \(4, 32\), the model expects \(8, 32\); the "
                                         r"model's adapters were injected with other settings than the folder's "
                                         r"\(shared_rank: folder 4, model 8\)"):
        load_adapters(model, tmp_path / "a")


def test_a_missing_tensor_with_a_model_injected_otherwise_names_the_settings(tmp_path):
    """A model injected on more modules than the folder's said only which tensor was missing, not why."""
    model = inject_adapters(tiny_model("llama"), AdapterConfig(method="lora", rank=2, target_modules=["q_proj"]))
    save_adapters(model, tmp_path / "a")
    model = inject_adapters(tiny_model("llama"), AdapterConfig(method="lora", rank=2,
                                                               target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match=r"missing adapter tensor 'base_model.model.model.layers.0.self_attn.v_proj"
                                         r".lora_A.weight' \(and 3 more\); the model's adapters were injected with "
                                         r"other settings than the folder's \(target_modules: folder \['q_proj'\], "
                                         r"model \['q_proj', 'v_proj'\]\)"):
        load_adapters(model, tmp_path / "a")


def test_nan_adapter_tensors_are_refused_by_name(tmp_path):
    save_adapters(trained_model(), tmp_path / "a")
    rewrite_tensors(tmp_path / "a", lambda t: t["model.layers.0.mlp.up_proj.lora_B"].fill_(float("nan")))
    with pytest.raises(ValueError, match=r"tensor 'base_model.model.model.layers.0.mlp.up_proj.lora_B.weight' holds NaN or infinite values"):
        load_adapters(tiny_model("llama"), tmp_path / "a")


def test_a_folder_loaded_into_another_architecture_of_the_same_sizes_warns(tmp_path):
    """Llama's and Mistral's modules share names: a Llama folder loaded into a Mistral of the same sizes matched
    every tensor's name and shape and loaded without a word."""
    save_adapters(trained_model("malora"), tmp_path / "adapter")
    assert read_adapter_folder(tmp_path / "adapter").base_model_type == "llama"
    with pytest.warns(UserWarning, match=r"adapter was trained on a 'llama' base model, and this model is a "
                                         r"'mistral': its adapters load by module name and shape.* Load it into a "
                                         r"llama model"):
        load_adapters(tiny_model("mistral"), tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapters(tiny_model("llama", seed=1), tmp_path / "adapter")  # another Llama: the family matches


def test_a_folder_with_adapters_outside_the_text_decoder_loads_without_them(tmp_path, monkeypatch):
    """Adapters went into a multimodal base's vision tower too before they went into its language model alone: such
    a Gemma 3 folder stopped loading ("does not belong to any adapter of this model"). Text never runs the vision
    tower, so its tensors are left out, with a warning, and the logits are the saved model's."""
    import malora_lightning.adapters.inject as inject
    with monkeypatch.context() as patched:  # the previous selection: every linear module of the model
        patched.setattr(inject, "_decoder_prefix", lambda model: "")
        saved = inject_adapters(tiny_model("gemma3"), AdapterConfig(method="malora", rank=2, shared_rank=4,
                                                                    dropout=0.0))
    assert len(adapter_layers(saved)) == 18
    with torch.no_grad():
        for layer in adapter_layers(saved).values():
            for param in layer.adapter_parameters().values():
                param.add_(torch.randn_like(param) * 0.5)
    save_adapters(saved, tmp_path / "a")
    with pytest.warns(UserWarning, match=r"24 tensors of linear modules outside the text decoder \(e.g. "
                                         r"'base_model.model.model.vision_tower.*are not loaded"):
        loaded = load_adapters(tiny_model("gemma3"), tmp_path / "a")
    assert len(adapter_layers(loaded)) == 12
    ids = torch.randint(3, 200, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, saved.eval()(ids).logits, rtol=0, atol=1e-6)


SWITCH_CASES = {  # each value was truthy and taken as True
    "load_adapters trainable": lambda folder: load_adapters(tiny_model("llama"), folder, trainable="false"),
    "save_adapters write": lambda folder: save_adapters(trained_model("lora"), folder, write="False"),
}


@pytest.mark.parametrize("case", SWITCH_CASES, ids=list(SWITCH_CASES))
def test_a_switch_that_is_not_a_bool_is_refused_by_name(tmp_path, case):
    save_adapters(trained_model("lora"), tmp_path / "adapter")
    before = {path.name: path.read_bytes() for path in (tmp_path / "adapter").iterdir()}
    setting = case.split()[1]
    with pytest.raises(ValueError, match=rf"{setting}='[A-Za-z]+' is invalid: expected True or False"):
        SWITCH_CASES[case](tmp_path / "adapter")
    assert {path.name: path.read_bytes() for path in (tmp_path / "adapter").iterdir()} == before


def test_the_model_card_rounds_no_score_to_a_perfect_or_a_zero_one(tmp_path):
    """One decimal wrote 2499 of 2500 items right as "100.0 %" (every item) and 1 of 2500 as "0.0 %"."""
    save_adapters(trained_model(), tmp_path / "a", task_scores={"a": 2499 / 2500, "b": 1 / 2500, "c": 1.0, "d": None})
    card = (tmp_path / "a" / "README.md").read_text()
    assert "| a | 99.96 % |\n| b | 0.04 % |\n| c | 100.0 % |\n| d | – |" in card
