"""Atomic file and folder writes: a crash leaves either the old content or the new, never half of either."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read the umask is to set it; done once, at import, before any threads
    os.umask(mask)
    return mask


_UMASK = _read_umask()

# where folders and processes behave otherwise (each use says how); a module setting, so tests can take that path
WINDOWS = os.name == "nt"


def default_mode(folder: bool = False) -> int:
    """The permissions a plain `open(..., "w")` (or `mkdir`) gives under the process's umask."""
    return (0o777 if folder else 0o666) & ~_UMASK


def _fsync_dir(path: Path) -> None:
    """Make the renames and new names in folder `path` durable. Not on Windows: a folder cannot be opened there
    (`os.open` raises PermissionError, which failed every write after its file was in place), and NTFS journals its
    names itself."""
    if WINDOWS:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def apply_default_modes(folder: Path) -> None:
    """Give `folder`, and every folder and file under it, the permissions a plain mkdir or write would give: some
    writers (safetensors, hence `save_pretrained`) create owner-only files that a teammate or a server running as
    another user could not read. Symbolic links are left alone (chmod would change what they point to)."""
    os.chmod(folder, default_mode(folder=True))
    for root, folders, files in os.walk(folder):
        for name in folders + files:
            child = Path(root) / name
            if not child.is_symlink():
                os.chmod(child, default_mode(folder=name in folders))


def _raise_naming(error: BaseException, path: Path) -> None:
    """Raise `error` again naming `path` when it is an OSError that names no file, as a failed write or fsync raises
    ("[Errno 28] No space left on device"): the command printed that line alone, saying neither which file nor which
    disk. Return otherwise (the caller re-raises `error` as it is)."""
    if isinstance(error, OSError) and error.errno is not None and error.filename is None:
        raise type(error)(error.errno, error.strerror, str(path)) from error


def atomic_write_bytes(path: str | Path, data: bytes, replace_link: bool = False,
                       temporary_prefix: str | None = None) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`.

    Behaves as a plain `open(path, "w")` would: the file gets its permissions (those of the file it replaces, else the
    umask's), not the owner-only ones of the temporary file, and a symbolic link is written through (the file it
    points to gets the content; the link stays), unless `replace_link`: then the rename replaces the link itself.
    The temporary file is named `.<name>.<random>.tmp`, or `<temporary_prefix><random>.tmp` where a file left by a
    kill must not carry the name (`CheckedCheckpointIO`).
    """
    path = Path(path)
    target = path.resolve() if path.is_symlink() and not replace_link else path
    if target.is_dir():
        linked = f" (a link to {target})" if target != path else ""
        raise IsADirectoryError(f"{path}{linked} is a folder: nothing was written; expected the path of a file")
    target.parent.mkdir(parents=True, exist_ok=True)
    mode = target.stat().st_mode & 0o7777 if target.is_file() else default_mode()
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}." if temporary_prefix is None else temporary_prefix,
                                     suffix=".tmp", dir=target.parent)
    try:
        os.chmod(temporary, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        _raise_naming(error, path)
        raise
    _fsync_dir(target.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def first_line(path: Path) -> str | None:
    """The first line of a text file, without its newline; None when there is no file. The files we write into a
    folder the user may share (the model card, the run report) start with a marker line, read back with this, so
    that a file of the same name we did not write is never replaced."""
    if not path.exists():
        return None
    with path.open(encoding="utf-8", errors="replace") as text:
        return text.readline().rstrip("\n")


def check_writable(folder: Path) -> None:
    """Raise the OSError that making a folder inside the existing `folder` raises, and leave none: a trial, since
    permission bits alone miss read-only mounts and ACLs (and root may write past them)."""
    os.rmdir(tempfile.mkdtemp(prefix=".malora-write-check.", dir=folder))


# in a `staging_folder` while it is written: "<host> <pid>" of the writing process, so that a folder a killed
# process left can be told from one another process is writing
OWNER_MARKER = "MALORA_OWNER"


@contextlib.contextmanager
def staging_folder(target: Path) -> Iterator[Path]:
    """A new hidden folder beside `target` (the same file system, so it can be renamed onto `target`), with the
    permissions a plain mkdir would give; removed on exit unless it was renamed away. Staging folders for `target`
    that a killed process left on this host are removed first (`remove_abandoned_staging`)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        os.chmod(staging, default_mode(folder=True))
        (staging / OWNER_MARKER).write_text(f"{socket.gethostname()} {os.getpid()}", encoding="utf-8")
        yield staging
    except BaseException as error:
        _raise_naming(error, target)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_abandoned_staging(target: Path) -> None:
    """Remove the `staging_folder`s of `target` whose writer has died: each holds our `OWNER_MARKER` naming this host
    and a process that no longer runs. A folder without the marker (a user's, or being renamed into place), another
    host's (a shared cache) or a live process's is left as it is. A killed conversion or merged export left one
    the size of a model each time."""
    for folder in target.parent.glob(f".{glob.escape(target.name)}.*"):
        try:
            host, pid = (folder / OWNER_MARKER).read_text(encoding="utf-8").split()
        except (OSError, ValueError):
            continue
        if host == socket.gethostname() and pid.isdigit() and not _running(int(pid)):
            logger.info("Removing %s, left by a process that no longer runs", folder)
            shutil.rmtree(folder, ignore_errors=True)


def _running(pid: int) -> bool:
    """Whether process `pid` (of this host) still runs. Always so on Windows, whose `os.kill(pid, 0)` does not probe
    but terminates the process (TerminateProcess, for any signal but the console ones): it killed the process writing
    the folder, or whatever process now had its number. Its folders stay there, as they did before they were
    removed at all."""
    if WINDOWS:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def rename_into_place(staging: Path, target: Path) -> None:
    """Rename a `staging_folder` onto `target` (absent or an empty folder) once its files are on disk: fsynced files,
    then the rename, then the parent fsynced, so that a power loss leaves either no `target` or a complete one. The
    `OWNER_MARKER` goes only after the fsyncs (seconds for a model), just before the rename: a process killed during
    them leaves a folder that `remove_abandoned_staging` still recognizes."""
    for root, _, files in os.walk(staging):
        for name in files:
            if name != OWNER_MARKER:
                _fsync_file(Path(root) / name)
    (staging / OWNER_MARKER).unlink(missing_ok=True)  # not part of what is written
    for root, _, _ in os.walk(staging):
        _fsync_dir(Path(root))
    if WINDOWS and target.is_dir():  # Windows renames no folder onto an existing one: the empty one goes first
        target.rmdir()  # a folder that is not empty raises, as the rename itself does elsewhere
    os.replace(staging, target)
    _fsync_dir(target.parent)


STAGING_FOLDER = ".malora-staging"  # inside the folder whose files are being replaced
# created first inside every staging folder: only a folder holding it is ours to complete or delete
STAGING_MARKER = "MALORA_STAGING"
COMMIT_MARKER = "COMMITTED"  # written last into the staging folder: from then on its files are complete


def _fsync_file(path: Path) -> None:
    """Make the content of file `path` durable. On Windows opened for writing (not truncated): there fsync flushes
    only a handle with write access, and raised EBADF for a file opened read-only."""
    with open(path, "r+b" if WINDOWS else "rb") as handle:
        os.fsync(handle.fileno())


def _foreign_staging(folder: Path, staging: Path) -> FileExistsError:
    """A folder named like ours but without our marker is a user's (or an older version's): never touched."""
    return FileExistsError(
        f"{staging} was not made by malora_lightning (it lacks the {STAGING_MARKER} file every staging folder gets "
        f"first), so it is left as it is; malora_lightning needs this name to replace files in {folder}: move or "
        f"rename it. If an earlier malora_lightning left it and it holds {COMMIT_MARKER}, its other files are a "
        f"complete new set to move into {folder}; without {COMMIT_MARKER} it can be deleted")


def _entries(folder: Path) -> list[Path]:
    """The entries of `folder`; none once another process removed it."""
    try:
        return list(folder.iterdir())
    except FileNotFoundError:
        return []


def _remove_staging(staging: Path) -> None:
    """Remove our staging folder, its `STAGING_MARKER` last: a process looking at the same time sees the folder ours
    (marked), empty, or gone, never a foreign one. Entries another process removed first count as removed."""
    for child in _entries(staging):
        if child.name == STAGING_MARKER:
            continue
        with contextlib.suppress(FileNotFoundError):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)  # never staged by us; a user's, in a staging folder of ours
            else:
                child.unlink()
    (staging / STAGING_MARKER).unlink(missing_ok=True)
    with contextlib.suppress(FileNotFoundError):
        staging.rmdir()


def recover_replace(folder: str | Path) -> None:
    """Finish or undo a `replace_files` that a crash interrupted: a committed staging folder's remaining files move
    into place, an uncommitted one is removed (the old files were never touched). A no-op without leftovers.

    Only a staging folder holding `STAGING_MARKER` is ours; an empty one (a kill between its mkdir and its marker) is
    removed, any other raises `FileExistsError` naming it.

    Several readers may recover one folder at once (every rank of a torchrun or SLURM job reads the same adapter
    folder): a staged file that is gone was moved into place by another (a committed folder's files leave only that
    way, and `COMMIT_MARKER` only once they all have), so it counts as done, and so does a folder another removed.
    Not covered: a recovery running beside a save into the same folder (it would take that save's staging folder
    for a leftover); saves are one process's, rank zero's, after every rank has read the folder.
    """
    folder = Path(folder)
    staging = folder / STAGING_FOLDER
    if not staging.is_dir():
        return
    # the marker before the listing: another process removes it last, once the folder is empty
    if staging.is_symlink() or not (staging / STAGING_MARKER).is_file():
        if staging.is_symlink() or _entries(staging):
            raise _foreign_staging(folder, staging)
    elif (staging / COMMIT_MARKER).is_file():
        for child in _entries(staging):
            if child.name not in (COMMIT_MARKER, STAGING_MARKER):
                with contextlib.suppress(FileNotFoundError):  # another process moved it
                    os.replace(child, folder / child.name)
        _fsync_dir(folder)
        (staging / COMMIT_MARKER).unlink(missing_ok=True)
    _remove_staging(staging)
    _fsync_dir(folder)


@contextlib.contextmanager
def replace_files(folder: str | Path) -> Iterator[Path]:
    """Yield a new staging folder inside `folder`; on success each file written there replaces the file of that name
    in `folder`, and every other file of `folder` stays as it is.

    Recoverable at every instant: the staged files are fsynced and the staging folder marked committed before the
    first one moves, and `recover_replace` (run here first, and by readers) completes a committed replace or drops an
    uncommitted one. So `folder` holds the whole old set, the whole new set, or a committed staging folder that the
    next save or load completes; never a mix that is taken for either.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    recover_replace(folder)
    staging = folder / STAGING_FOLDER
    staging.mkdir()
    try:
        open(staging / STAGING_MARKER, "x").close()  # before anything else: from here on the folder is provably ours
        _fsync_dir(staging)
        yield staging
        for child in staging.iterdir():
            _fsync_file(child)
        atomic_write_bytes(staging / COMMIT_MARKER, b"")
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        _raise_naming(error, folder)
        raise
    recover_replace(folder)  # the commit itself: move every staged file into place, then drop the staging folder
