"""Files and folders we write atomically behave as plain writes: the permissions a plain write would give, not the
owner-only ones of the temporary file or folder they are staged in (a teammate or a server could not read an exported
adapter), a symbolic link written through; and a folder of the staging folder's name is touched only if it is ours."""

import errno
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from malora_lightning import atomic
from malora_lightning.atomic import (COMMIT_MARKER, OWNER_MARKER, STAGING_FOLDER, STAGING_MARKER, apply_default_modes,
                                     atomic_write_text, recover_replace, rename_into_place, replace_files,
                                     staging_folder)
from tests.helpers import forkserver


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


def test_owner_only_files_of_a_staged_folder_get_the_umask_permissions(tmp_path, umask_022):
    (tmp_path / "model" / "sub").mkdir(parents=True)
    for path in (tmp_path / "model" / "weights.safetensors", tmp_path / "model" / "sub" / "shard.bin"):
        path.write_text("x")
        path.chmod(0o600)
    (tmp_path / "model" / "sub").chmod(0o700)
    apply_default_modes(tmp_path / "model")
    assert {str(path.relative_to(tmp_path)): mode(path) for path in tmp_path.rglob("*")} == {
        "model": 0o755, "model/sub": 0o755, "model/weights.safetensors": 0o644, "model/sub/shard.bin": 0o644}


def test_a_symbolic_link_is_written_through_like_open_does(tmp_path, umask_022):
    """The link used to be replaced by a regular file, and the user's linked file kept its old content."""
    (tmp_path / "real").mkdir()
    real = tmp_path / "real" / "report.md"
    real.write_text("user's content")
    real.chmod(0o600)
    link = tmp_path / "report.md"
    link.symlink_to(Path("real") / "report.md")
    atomic_write_text(link, "new")
    assert link.is_symlink() and (real.read_text(), mode(real)) == ("new", 0o600)
    dangling = tmp_path / "later.md"
    dangling.symlink_to(tmp_path / "real" / "later.md")
    atomic_write_text(dangling, "created")
    assert dangling.is_symlink() and (tmp_path / "real" / "later.md").read_text() == "created"
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["later.md", "later.md", "real", "report.md",
                                                                  "report.md"]  # no temporary files left


def test_a_folder_as_the_target_is_named(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with pytest.raises(IsADirectoryError) as error:
        atomic_write_text(tmp_path / "out", "new")
    assert str(error.value) == f"{tmp_path / 'out'} is a folder: nothing was written; expected the path of a file"
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["keep", "out"]


def test_a_users_folder_named_like_the_staging_folder_is_never_deleted(tmp_path):
    """It was recognised by its name alone: the next replace (or adapter load) deleted it with the files inside."""
    folder = tmp_path / "adapter"
    (folder / STAGING_FOLDER).mkdir(parents=True)
    (folder / STAGING_FOLDER / "my_backup.safetensors").write_text("precious")
    (folder / "a.json").write_text("old")
    message = rf"{STAGING_FOLDER} was not made by malora_lightning .* move or rename it"
    with pytest.raises(FileExistsError, match=message):
        with replace_files(folder) as staging:
            (staging / "a.json").write_text("new")
    with pytest.raises(FileExistsError, match=message):
        recover_replace(folder)
    assert (folder / STAGING_FOLDER / "my_backup.safetensors").read_text() == "precious"
    assert (folder / "a.json").read_text() == "old"
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "notes.txt").write_text("mine")
    (folder / STAGING_FOLDER).rename(tmp_path / "moved")
    (folder / STAGING_FOLDER).symlink_to(tmp_path / "elsewhere")  # a link to a user's folder is not ours either
    with pytest.raises(FileExistsError, match=message):
        recover_replace(folder)
    assert (tmp_path / "elsewhere" / "notes.txt").read_text() == "mine"


def test_an_empty_staging_folder_left_before_its_marker_is_removed(tmp_path):
    """A kill between the staging folder's mkdir and its marker leaves it empty: nothing to lose, nothing to refuse."""
    folder = tmp_path / "adapter"
    (folder / STAGING_FOLDER).mkdir(parents=True)
    (folder / "a.json").write_text("old")
    with replace_files(folder) as staging:
        (staging / "a.json").write_text("new")
    assert sorted(path.name for path in folder.iterdir()) == ["a.json"] and (folder / "a.json").read_text() == "new"


def _recover_with_slow_renames(folder: str, barrier, results) -> None:
    """One rank of a job opening the folder: os.replace slowed so that two processes' recoveries overlap."""
    rename = os.replace

    def slow_rename(source, target) -> None:
        time.sleep(0.2)
        rename(source, target)

    os.replace = slow_rename
    barrier.wait()
    try:
        recover_replace(folder)
        results.put("recovered")
    except Exception as error:  # reported to the test, which names it
        results.put(f"{type(error).__name__}: {error}")


def test_processes_recovering_one_folder_at_once_all_succeed_and_leave_it_complete(tmp_path):
    """Every rank of a torchrun/SLURM job reads the adapter folder, so all completed an interrupted save at once: one
    moved a staged file, and the other's move of it raised FileNotFoundError."""
    folder = tmp_path / "adapter"
    staging = folder / STAGING_FOLDER
    staging.mkdir(parents=True)
    new = {name: f"new {name}" for name in ("adapter_config.json", "adapter_model.safetensors", "README.md")}
    for name, text in new.items():
        (folder / name).write_text("old")
        (staging / name).write_text(text)
    (staging / STAGING_MARKER).touch()
    (staging / COMMIT_MARKER).touch()
    context = forkserver()
    barrier, results = context.Barrier(2), context.Queue()
    processes = [context.Process(target=_recover_with_slow_renames, args=(str(folder), barrier, results))
                 for _ in range(2)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    assert outcomes == ["recovered", "recovered"]
    assert {path.name: path.read_text() for path in folder.iterdir()} == new  # the new set, no staging folder left


def record_fsyncs_and_replaces(monkeypatch) -> list[tuple[str, ...]]:
    """The order of the fsyncs (("fsync", path)) and renames (("replace", source, target)) that follow, as they run."""
    events: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda source, target: (events.append(("replace", str(source), str(target))),
                                                               real_replace(source, target))[1])
    return events


def test_a_staged_folder_is_on_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """The offline model's conversion and task export renamed their staging folder without an fsync: after a power
    loss a complete-looking folder could hold empty weights."""
    from malora_lightning.atomic import rename_into_place, staging_folder

    events = record_fsyncs_and_replaces(monkeypatch)
    target = tmp_path / "model"
    with staging_folder(target) as staging:
        (staging / "sub").mkdir()
        (staging / "weights.bin").write_bytes(b"w")
        (staging / "sub" / "config.json").write_text("{}")
        rename_into_place(staging, target)
    (renamed,) = [index for index, event in enumerate(events) if event[0] == "replace" and event[2] == str(target)]
    synced_before = {Path(event[1]).name for event in events[:renamed] if event[0] == "fsync"}
    assert {"weights.bin", "config.json", "sub"} <= synced_before
    assert ("fsync", str(tmp_path)) in events[renamed:]
    assert (target / "sub" / "config.json").read_text() == "{}"


def test_a_written_file_is_on_disk_before_it_replaces_the_old_one_and_its_folder_after(tmp_path, monkeypatch):
    """Without the file's fsync a power loss after the rename could leave the new name on empty content; without the
    folder's, the old file."""
    events = record_fsyncs_and_replaces(monkeypatch)
    atomic_write_text(tmp_path / "report.md", "new")
    (replaced,) = [index for index, event in enumerate(events) if event[0] == "replace"]
    temporary = events[replaced][1]
    assert Path(temporary).parent == tmp_path and Path(temporary).name.startswith(".report.md.")
    assert ("fsync", temporary) in events[:replaced]
    assert ("fsync", str(tmp_path)) in events[replaced:]
    assert (tmp_path / "report.md").read_text() == "new"


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
    (tmp_path / "report.md").write_text("old")

    def full_disk(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(tmp_path / "report.md", "new")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["report.md"]
    assert (tmp_path / "report.md").read_text() == "old"


def test_an_uncommitted_replace_is_undone_and_the_old_files_stay(tmp_path):
    """A save killed while writing its staged files (no COMMIT_MARKER yet): its partial files never replace the
    complete old ones."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "weights.bin").write_text("old weights")
    (folder / "config.json").write_text("old config")
    staging = folder / STAGING_FOLDER
    staging.mkdir()
    (staging / STAGING_MARKER).touch()
    (staging / "weights.bin").write_text("new wei")  # cut off
    recover_replace(folder)
    assert sorted(path.name for path in folder.iterdir()) == ["config.json", "weights.bin"]
    assert (folder / "weights.bin").read_text() == "old weights"


def test_an_uncommitted_staging_folder_is_removed_with_a_folder_inside_it(tmp_path):
    """Only files are staged, but a folder inside one of ours (its marker says so) goes with it, not a crash."""
    folder = tmp_path / "adapter"
    staging = folder / STAGING_FOLDER
    (staging / "nested" / "deeper").mkdir(parents=True)
    (staging / STAGING_MARKER).touch()
    (staging / "nested" / "deeper" / "shard.bin").write_text("partial")
    (folder / "config.json").write_text("old config")
    recover_replace(folder)
    assert [path.name for path in folder.iterdir()] == ["config.json"]
    assert (folder / "config.json").read_text() == "old config"


def test_a_process_of_another_user_counts_as_running(monkeypatch):
    """Signalling it is refused: its staging folders are not abandoned."""
    def refused(pid, signal):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", refused)
    assert atomic._running(1)


def test_default_modes_leave_what_a_symbolic_link_points_to_alone(tmp_path, umask_022):
    outside = tmp_path / "secret.txt"
    outside.write_text("x")
    outside.chmod(0o600)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "link").symlink_to(outside)
    apply_default_modes(folder)
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600


def test_a_staging_folder_a_killed_process_left_is_removed_by_the_next_one(tmp_path):
    """The offline model's conversion and a merged task export, killed midway, left their staging folder (a model's
    size) for good. The next staging folder for the same target removes those whose writer no longer runs on this
    host, and no other: a live writer's, another host's (a shared cache), a user's folder without our marker."""
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)

    def left(name: str, owner: str | None) -> Path:
        folder = tmp_path / f".model.{name}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"weights")
        if owner is not None:
            (folder / OWNER_MARKER).write_text(owner)
        return folder

    abandoned = left("abandoned", f"{socket.gethostname()} {dead}")
    running = left("running", f"{socket.gethostname()} {os.getpid()}")
    elsewhere = left("elsewhere", f"another-host {dead}")
    users = left("users", None)
    target = tmp_path / "model"
    with staging_folder(target) as staging:
        assert (staging / OWNER_MARKER).read_text() == f"{socket.gethostname()} {os.getpid()}"
        (staging / "config.json").write_text("{}")
        rename_into_place(staging, target)
    assert not abandoned.exists() and running.exists() and elsewhere.exists() and users.exists()
    assert sorted(path.name for path in target.iterdir()) == ["config.json"]  # the marker is not part of the result


def _stage_and_die_in_fsync(target: str) -> None:
    with staging_folder(Path(target)) as staging:
        (staging / "model.safetensors").write_bytes(b"weights")
        atomic._fsync_file = lambda path: os.kill(os.getpid(), signal.SIGKILL)
        rename_into_place(staging, Path(target))


def test_a_process_killed_while_its_staged_files_reach_disk_leaves_a_folder_the_next_one_removes(tmp_path):
    """The owner marker was removed before the fsyncs (seconds for a model): a process killed during them left a
    model-sized folder without it, which no later run removed."""
    target = tmp_path / "model"
    process = forkserver().Process(target=_stage_and_die_in_fsync, args=(str(target),))
    process.start()
    process.join(timeout=60)
    assert process.exitcode == -signal.SIGKILL
    assert len(list(tmp_path.iterdir())) == 1 and not target.exists()  # its staging folder, left
    with staging_folder(target) as staging:
        (staging / "config.json").write_text("{}")
        rename_into_place(staging, target)
    assert [path.name for path in tmp_path.iterdir()] == ["model"]


def test_a_full_disk_names_the_file_or_folder_being_written_and_loses_nothing(tmp_path, monkeypatch):
    """A failed write or fsync raises an OSError that names no file: `malora fit` ended on "error: [Errno 28] No
    space left on device" alone, saying neither which file nor which disk."""
    (tmp_path / "report.md").write_text("old")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "weights").write_text("old")

    def full_disk(*args) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def named(path: Path) -> str:
        return rf"^\[Errno 28\] No space left on device: '{re.escape(str(path))}'$"

    with pytest.raises(OSError, match=named(tmp_path / "adapter")):
        with replace_files(tmp_path / "adapter"):
            full_disk()
    with pytest.raises(OSError, match=named(tmp_path / "model")):
        with staging_folder(tmp_path / "model"):
            full_disk()
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match=named(tmp_path / "report.md")):
        atomic_write_text(tmp_path / "report.md", "new")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter", "report.md"]
    assert [path.name for path in (tmp_path / "adapter").iterdir()] == ["weights"]
    assert (tmp_path / "report.md").read_text() == (tmp_path / "adapter" / "weights").read_text() == "old"


@pytest.mark.parametrize("error", [OSError("the storage plugin refused the write"),
                                   PermissionError(errno.EACCES, "Permission denied", "/elsewhere/shard.bin")])
def test_an_os_error_that_says_its_own_file_or_has_no_errno_is_raised_as_it_came(tmp_path, error):
    """Only an errno error naming no file is raised again with the path: one without an errno lost its message
    ("[Errno None] None"), and one naming its own file was made to name another."""
    def fail(*args) -> None:
        raise error

    with pytest.raises(type(error)) as raised:
        with staging_folder(tmp_path / "model"):
            fail()
    assert raised.value is error


@pytest.mark.parametrize("error", [OSError("the storage plugin refused the write"),
                                   PermissionError(errno.EACCES, "Permission denied", "/elsewhere/report.md"),
                                   KeyboardInterrupt()])
def test_a_file_write_that_fails_otherwise_raises_the_error_as_it_came_and_keeps_the_old_file(tmp_path, monkeypatch,
                                                                                             error):
    (tmp_path / "report.md").write_text("old")

    def fail(fd) -> None:
        raise error

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(type(error)) as raised:
        atomic_write_text(tmp_path / "report.md", "new")
    assert raised.value is error
    assert [path.name for path in tmp_path.iterdir()] == ["report.md"] and (tmp_path / "report.md").read_text() == "old"


@pytest.fixture
def windows(monkeypatch):
    """This machine made to refuse what Windows refuses, with `atomic` taking its Windows paths: opening a folder
    (`os.open` of a directory raises PermissionError there), fsyncing a file opened read-only (EBADF: Windows
    flushes only a handle with write access) and renaming a folder onto an existing one (os.replace: access
    denied)."""
    import fcntl

    real_open, real_fsync, real_replace = os.open, os.fsync, os.replace

    def open_file(path, flags, *args, **kwargs):
        if os.path.isdir(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    def fsync(fd):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        real_fsync(fd)

    def replace(source, target):
        if os.path.isdir(source) and os.path.exists(target):
            raise PermissionError(errno.EACCES, "Access is denied", str(source), None, str(target))
        real_replace(source, target)

    def rmtree(path, *args, **kwargs):
        # Windows' rmtree opens no folder, so it removes what it is given; the fd-based one here opens each folder,
        # which `open_file` refuses, and rmtree(ignore_errors=True) then silently removed nothing
        monkeypatch.setattr(os, "open", real_open)
        try:
            real_rmtree(path, *args, **kwargs)
        finally:
            monkeypatch.setattr(os, "open", open_file)

    real_rmtree = shutil.rmtree
    monkeypatch.setattr(atomic, "WINDOWS", True)
    monkeypatch.setattr(os, "open", open_file)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)


def test_every_atomic_write_works_where_folders_and_read_only_files_cannot_be_fsynced(tmp_path, windows):
    """On Windows every write failed after its file was in place: the folder's fsync opened the folder (refused
    there), and the staged files were fsynced through read-only handles (EBADF there)."""
    atomic_write_text(tmp_path / "report.md", "old")
    atomic_write_text(tmp_path / "report.md", "new")
    with replace_files(tmp_path / "adapter") as staging:
        (staging / "weights").write_text("weights")
    with staging_folder(tmp_path / "model") as staging:
        (staging / "config.json").write_text("{}")
        rename_into_place(staging, tmp_path / "model")
    assert (tmp_path / "report.md").read_text() == "new"
    assert [path.name for path in (tmp_path / "adapter").iterdir()] == ["weights"]
    assert [path.name for path in (tmp_path / "model").iterdir()] == ["config.json"]


def test_no_process_is_signalled_on_windows_to_tell_whether_it_runs(tmp_path, windows, monkeypatch):
    """Windows' os.kill(pid, 0) terminates process `pid`: the next staging folder killed the process writing another
    one for the same target (or whatever process had its number now). There every writer counts as running."""
    signalled = []
    monkeypatch.setattr(os, "kill", lambda pid, signal: signalled.append(pid))
    other = tmp_path / ".model.other"
    other.mkdir()
    (other / OWNER_MARKER).write_text(f"{socket.gethostname()} {os.getpid() + 1}")
    with staging_folder(tmp_path / "model") as staging:
        (staging / "config.json").write_text("{}")
        rename_into_place(staging, tmp_path / "model")
    assert signalled == [] and other.exists()  # left as a live writer's folder, not removed as an abandoned one


def test_a_staged_folder_replaces_an_empty_folder_on_windows_too_and_never_a_full_one(tmp_path, windows):
    """`rename_into_place` takes an empty folder as the target (a task export into an --output folder made ahead), but
    Windows renames no folder onto an existing one: the export failed there after every task was profiled."""
    (tmp_path / "model").mkdir()
    with staging_folder(tmp_path / "model") as staging:
        (staging / "config.json").write_text("{}")
        rename_into_place(staging, tmp_path / "model")
    assert [path.name for path in (tmp_path / "model").iterdir()] == ["config.json"]
    with pytest.raises(OSError):
        with staging_folder(tmp_path / "model") as staging:
            (staging / "config.json").write_text("new")
            rename_into_place(staging, tmp_path / "model")
    assert (tmp_path / "model" / "config.json").read_text() == "{}"
