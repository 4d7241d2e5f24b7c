"""Atomic writes: outputs appear whole or not at all; and the checks on paths before any work."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import NormfuseError, UsageError

# errors of a write that no path could have prevented: the device or quota is full, or read-only
NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def unwritable(path: str | os.PathLike, folder: bool = False) -> str | None:
    """Why `path` cannot be written as a file (or, with `folder`, created or filled as a folder), or
    None. Commands check their outputs with this before any work, so a bad output path fails at once
    in one line, not after minutes of export and timing, or halfway through writing several files."""
    path = Path(path)
    if path.exists():
        if folder and not path.is_dir():
            return "is a file, not a folder"
        if not folder and path.is_dir():
            return "is a folder, not a file"
    # the nearest thing that exists on the way: it must be a folder we may create entries in
    nearest = path if folder and path.is_dir() else path.parent
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    if not nearest.is_dir():
        return f"cannot be created: {nearest} is a file"
    if not os.access(nearest, os.W_OK | os.X_OK):
        return f"cannot be written: no write permission in {nearest}"
    return None


def models_in(folder: Path) -> list[Path]:
    """The ONNX models of a folder (an Optimum export, say), by name; none is a one-line UsageError."""
    models = sorted(path for path in Path(folder).iterdir() if path.suffix == ".onnx" and path.is_file())
    if not models:
        raise UsageError(f"{folder}: no .onnx model in this folder")
    return models


def paired_models(reference: Path, candidate: Path, role: str = "candidate") -> list[Path]:
    """The models of folder `reference`, each to be paired with the one of the same name in
    `candidate` (as export.rewrite writes a folder); a one-line error where `candidate` is no
    folder or lacks one of them."""
    if not Path(candidate).is_dir():
        raise UsageError(f"{candidate}: the reference {reference} is a folder, so the {role} must be one too "
                         "(the fused models under the same names, as export.rewrite writes them)")
    models = models_in(reference)
    missing = [m.name for m in models if not (Path(candidate) / m.name).is_file()]
    if missing:
        raise NormfuseError(f"{candidate}: no {missing[0]} (each model of {reference} is paired with the one of the "
                            "same name)")
    return models


def require_file(path: str | os.PathLike) -> Path:
    """`path` as a Path if it is a file to read, else a NormfuseError naming it and saying what is there."""
    path = Path(path)
    if not path.is_file():
        raise NormfuseError(f"{path}: {'is a folder, not a file' if path.is_dir() else 'no such file'}")
    return path


def require_writable(path: str | os.PathLike, folder: bool = False) -> Path:
    """`path`, or a NormfuseError naming it and saying why it cannot be written."""
    reason = unwritable(path, folder)
    if reason:
        raise NormfuseError(f"{path}: {reason}")
    return Path(path)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, optional: bool = False):
    """Yield a temporary path beside `target`; rename it onto `target` only if the block succeeds.
    `optional`: the block may remove the temporary file and write none, and then nothing is renamed."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise NormfuseError(f"{target}: cannot write ({_why_not_written(target, exc)})") from None
    os.close(fd)
    try:
        with no_room_names(target):
            yield Path(tmp)
        if optional and not os.path.exists(tmp):
            return
        put_in_place(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def put_in_place(written: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename a finished file onto `target`, with the permissions any new file gets."""
    os.chmod(written, 0o666 & ~_UMASK)  # mkstemp's 0600 would outlive the rename
    try:
        os.replace(written, target)
    except OSError as exc:
        raise NormfuseError(f"{target}: cannot write ({_why_not_written(Path(target), exc)})") from None


@contextlib.contextmanager
def staged_beside(target: str | os.PathLike):
    """A `staging_folder` beside `target` for a tool that writes files of its own (torch's
    exporters), to be put in place from there; it goes, with whatever is left in it, when the block
    ends. Beside, not in the system's temporary folder: that may be small, and a rename from it may
    be a copy."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        folder = staging_folder(target.parent, f".{target.name}.")
    except OSError as exc:
        raise NormfuseError(f"{target}: cannot write ({_why_not_written(target, exc)})") from None
    try:
        with no_room_names(target):
            yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def no_room_names(target: str | os.PathLike):
    """A full disk or quota (or a read-only one) met while writing `target`, through whatever
    temporary or staged files, is a one-line error naming `target`: the system's names the
    temporary file, or for a copy the file copied."""
    try:
        yield
    except OSError as exc:
        if exc.errno in NO_ROOM:
            raise NormfuseError(f"{target}: cannot write ({exc.strerror})") from None
        raise


@contextlib.contextmanager
def folder_made_for(folder: str | os.PathLike):
    """`folder`, created if missing (with its missing parents); where the block fails, the folders
    it created go again, with whatever was written into them, so a failed command leaves no empty
    or half-filled output folder."""
    folder = Path(folder)
    first_made = next((f for f in reversed([folder, *folder.parents]) if not f.exists()), None)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a folder must be, a read-only place
        raise NormfuseError(f"{folder}: cannot write ({_why_not_written(folder, exc)})") from None
    try:
        yield folder
    except BaseException:
        if first_made is not None:
            shutil.rmtree(first_made, ignore_errors=True)
        raise


def _why_not_written(target: Path, exc: OSError) -> str:
    """The clearer of our own diagnosis and the system's message."""
    return unwritable(target) or exc.strerror or str(exc)


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # once, at import: os.umask is process-wide, so not while threads write files


def copy_as_new(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy a file (its times too, as shutil.copy2) with the permissions any new file gets, not
    the source's: a user's model saved 0600 would be unreadable to a server running as another user."""
    shutil.copy2(source, target)
    os.chmod(target, 0o666 & ~_UMASK)


def staging_folder(parent: Path, prefix: str) -> Path:
    """A new folder in `parent` to fill and then rename into place, with the permissions a plain
    mkdir gives (mkdtemp's 0700 would outlive the rename: a Triton server running as another user
    could not read the model it serves)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(folder, 0o777 & ~_UMASK)
    return folder


def replace_folder(staging: Path, target: Path) -> None:
    """Put a filled `staging_folder` where `target` is: an earlier folder there goes only once the
    new one is in place, so a reader finds one or the other, never a half-written one. On Linux the
    two are swapped in one step; elsewhere the earlier one is moved aside first (a moment with
    neither), and put back if the new one cannot take its place."""
    if not target.exists():
        os.replace(staging, target)
        return
    if target.is_dir() and not target.is_symlink() and _exchange(staging, target):
        # the new folder is in place; `staging` holds the earlier one (what cannot be removed stays hidden)
        shutil.rmtree(staging, ignore_errors=True)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    os.replace(target, old / target.name)
    try:
        os.replace(staging, target)
    except OSError:
        os.replace(old / target.name, target)  # should that fail too, the earlier folder stays in `old`
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _exchange(one: Path, other: Path) -> bool:
    """Swap two paths atomically (Linux's renameat2 with RENAME_EXCHANGE); False where the system
    or the file system cannot."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc 2.28+ (macOS, musl): no such call
        return False
    at_cwd, rename_exchange = -100, 2
    if renameat2(at_cwd, os.fsencode(one), at_cwd, os.fsencode(other), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    # a kernel or file system without it, or a sandbox's filter of the call (seccomp answers EPERM)
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(other))


def write_text(target, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def write_json(target, data) -> None:
    write_text(target, json_text(data))


def json_text(data) -> str:
    """`data` as the JSON files normfuse writes hold it (numpy values and paths as plain ones)."""
    return json.dumps(data, indent=2, default=_json_default) + "\n"


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
