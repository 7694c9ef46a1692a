"""Files and folders we write atomically get the permissions a plain write would give, not the owner-only ones of
the temporary file or folder they are staged in (a teammate or a server could not read an exported adapter)."""

import os
import stat

import pytest

from malora_lightning.atomic import atomic_write_text, staging_folder


@pytest.fixture
def umask_022():
    """The umask as `atomic` read it at import (the usual 022 here), checked rather than assumed."""
    mask = os.umask(0o022)
    os.umask(mask)
    if mask != 0o022:
        pytest.skip(f"this process runs with umask {mask:03o}; the expectations below are for 022")


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_new_file_gets_the_umask_permissions(tmp_path, umask_022):
    atomic_write_text(tmp_path / "report.md", "text")
    with open(tmp_path / "plain.md", "w") as handle:
        handle.write("text")
    assert mode(tmp_path / "report.md") == mode(tmp_path / "plain.md") == 0o644


def test_a_replaced_file_keeps_its_permissions(tmp_path, umask_022):
    path = tmp_path / "private.json"
    path.write_text("old")
    path.chmod(0o600)
    atomic_write_text(path, "new")
    assert (path.read_text(), mode(path)) == ("new", 0o600)


def test_a_staging_folder_has_mkdir_permissions_and_is_removed(tmp_path, umask_022):
    target = tmp_path / "out" / "model"
    with staging_folder(target) as staging:
        assert staging.parent == target.parent and staging.name.startswith(".model.")
        assert mode(staging) == 0o755
        (staging / "config.json").write_text("{}")
    assert not staging.exists()
    with staging_folder(target) as staging:
        staging.rename(target)  # renamed away: nothing left to remove
    assert mode(target) == 0o755 and list(target.parent.iterdir()) == [target]


def test_an_adapter_folder_is_readable_like_any_saved_file(tmp_path, umask_022):
    """safetensors writes its file owner-only; an exported adapter must be as readable as its config."""
    from malora_lightning.adapters import AdapterConfig, inject_adapters, save_adapters
    from tests.helpers import tiny_model

    model = inject_adapters(tiny_model("llama"), AdapterConfig(method="lora", rank=2))
    save_adapters(model, tmp_path / "adapter")
    assert {path.name: mode(path) for path in (tmp_path / "adapter").iterdir()} == {
        "adapter_config.json": 0o644, "adapter_model.safetensors": 0o644, "README.md": 0o644}
