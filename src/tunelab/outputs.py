"""Writing outputs without losing anything: claim, write beside, make durable, rename into place.

Every command that writes a file or directory the user named goes through here:

1. :func:`claim_output` refuses a path that already exists (unless the user passed
   ``--overwrite``) and, always, a path that is or contains one of the command's inputs (``tunelab
   merge --out`` on the training run it reads from would otherwise delete it).
2. :func:`atomic_output` yields a temporary sibling (``.NAME.tmp-PID``) to write into; when the
   block ends without error the files are flushed to disk (fsync) and renamed into place, so the
   path holds either the old content or the complete new one, never half of it.
3. :func:`write_errors` turns a full disk, a quota, a file-size limit or a permission error (raised
   by Python, torch or safetensors) into one :class:`~tunelab.errors.TunelabError` that names the
   path and says what was kept.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tunelab.errors import TunelabError

# errno values that mean "the disk (or the user's share of it) cannot take this write".
_NO_SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
             errno.EFBIG: "file too large for this file system or the process's file-size limit"}
_NO_PERMISSION = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                  errno.EROFS: "read-only file system"}
_BAD_PATH = {errno.ENOTDIR: "a part of the path is a file, not a directory",
             errno.EEXIST: "a part of the path is a file, not a directory",
             errno.ENAMETOOLONG: "the file name is too long", errno.EISDIR: "it is a directory"}
# What torch and safetensors say when the OS refused a write (they drop the errno).
_WRITER_FAILURES = ("unexpected pos", "PytorchStreamWriter failed", "file write failed", "I/O error",
                    "Error while serializing")


class OutputError(TunelabError):
    """An output cannot be written where the user asked (exists, would replace an input, disk full, no permission)."""


def _is_within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def claim_output(out: str | Path, overwrite: bool = False, flag: str = "--out",
                 inputs: Sequence[tuple[str, str | Path | None]] = ()) -> Path:
    """Check that a command may write ``out``; return it as a Path.

    Args:
        out: the file or directory the command will write.
        overwrite: the user passed ``--overwrite``: an existing ``out`` may be replaced.
        flag: how the user named ``out`` (for the message), e.g. ``--out`` or ``output_dir``.
        inputs: ``(what, path)`` the command reads; ``out`` may never be one of them or contain one.

    Raises:
        OutputError: ``out`` exists (without ``overwrite``) or would replace an input.
    """
    path = Path(out).expanduser()
    resolved = path.resolve()
    for what, source in inputs:
        if source is None or not Path(source).expanduser().exists():
            continue
        source_path = Path(source).expanduser().resolve()
        if _is_within(source_path, resolved):
            relation = "is" if source_path == resolved else "contains"
            raise OutputError(f"{flag} {out}: {relation} the {what} {source} that this command reads; writing there "
                              f"would delete it. Choose another {flag}.")
    if path.is_symlink() or (path.exists() and not (path.is_dir() and not any(path.iterdir()))):
        if not overwrite:
            raise OutputError(f"{flag} {out} already exists; choose a new path, or pass --overwrite to replace it")
    return path


def claim_files(paths: Sequence[str | Path], overwrite: bool = False, flag: str = "--out",
                inputs: Sequence[str | Path] = ()) -> None:
    """Check that a command may write every file in ``paths`` (its output and the files it writes beside it).

    Args:
        paths: the files the command writes.
        overwrite: the user passed ``--overwrite``: existing files may be replaced.
        flag: the option that named where they go, for the message.
        inputs: files the command reads; none of ``paths`` may be one of them, even with ``overwrite``.

    Raises:
        OutputError: a file exists (without ``overwrite``), is a directory, or is an input.
    """
    sources = {Path(source).expanduser().resolve() for source in inputs if Path(source).expanduser().exists()}
    existing = []
    for path in map(lambda p: Path(p).expanduser(), paths):
        if path.resolve() in sources:
            raise OutputError(f"{flag}: {path} is also an input of this command; writing it would destroy the "
                              "data being read. Choose another output path.")
        if path.is_dir():
            raise OutputError(f"{flag}: {path} is a directory; name a file")
        if path.exists():
            existing.append(str(path))
    if existing and not overwrite:
        raise OutputError(f"{flag}: {', '.join(existing)} already exist{'s' if len(existing) == 1 else ''} (from an "
                          "earlier run?); choose another path, or pass --overwrite to replace "
                          f"{'it' if len(existing) == 1 else 'them'}")


def fsync_path(path: Path) -> None:
    """Flush one file, or a directory entry table, to disk."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems cannot fsync a directory; the data files were synced
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` (or ``path`` itself when it is a file), then the directories."""
    if path.is_file():
        fsync_path(path)
        return
    directories = [path]
    for root, dirs, files in os.walk(path):
        for name in files:
            fsync_path(Path(root) / name)
        directories += [Path(root) / name for name in dirs]
    for directory in reversed(directories):
        fsync_path(directory)


def temporary_sibling(out: Path, tag: str = "tmp") -> Path:
    """``DIR/.NAME.TAG-PID``: where ``out`` is written before it is renamed into place."""
    return out.with_name(f".{out.name}.{tag}-{os.getpid()}")


def remove(path: Path) -> None:
    """Delete a file or a directory tree (nothing when it is absent)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def replace_with(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out`` durably; an existing ``out`` is moved aside first and deleted only afterwards."""
    fsync_tree(tmp)
    old = None
    if out.exists() and not out.is_symlink() and (out.is_dir() or tmp.is_dir()):
        old = temporary_sibling(out, "old")  # a directory cannot be replaced in one rename
        remove(old)
        out.rename(old)
    os.replace(tmp, out)
    fsync_path(out.parent)
    if old is not None:
        remove(old)


@contextmanager
def atomic_output(out: str | Path, directory: bool = True, what: str = "output") -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to write into; on success it replaces ``out`` durably.

    On an error the temporary is deleted and ``out`` is left as it was; write failures of the disk
    (full, quota, permission) become an :class:`OutputError` naming ``out`` (see :func:`write_errors`).

    Args:
        out: the final path.
        directory: ``out`` is a directory (the temporary is created empty); else a file.
        what: what ``out`` is, for messages ("merged model", "ONNX export").
    """
    out = Path(out).expanduser()
    tmp = temporary_sibling(out)
    with write_errors(out, what, kept=f"{out} is unchanged" if out.exists() else "nothing was written"):
        out.parent.mkdir(parents=True, exist_ok=True)
        remove(tmp)
        if directory:
            tmp.mkdir()
        try:
            yield tmp
            replace_with(tmp, out)
        finally:
            remove(tmp)


def write_text_output(out: str | Path, text: str, what: str = "output") -> Path:
    """Write ``text`` to the file ``out`` beside it, flushed and renamed into place (see :func:`atomic_output`)."""
    with atomic_output(out, directory=False, what=what) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(out)


def _space_left(path: Path) -> str:
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                free = shutil.disk_usage(candidate).free
            except OSError:
                return ""
            return f"; {free / 2**20:,.1f} MiB free on that file system"
    return ""


def describe_write_failure(exc: BaseException) -> str | None:
    """Why a write failed, in words, when ``exc`` is a disk-space, permission or path failure (else None)."""
    number = exc.errno if isinstance(exc, OSError) else None
    if number in _NO_SPACE:
        return _NO_SPACE[number]
    if number in _NO_PERMISSION:
        return _NO_PERMISSION[number]
    if number in _BAD_PATH:
        return _BAD_PATH[number]
    text = str(exc)
    if isinstance(exc, OSError) and number is None and "No space left" in text:
        return "no space left on device"
    if type(exc).__name__ in ("RuntimeError", "SafetensorError") and any(s in text for s in _WRITER_FAILURES):
        for code, reason in {**_NO_SPACE, **_NO_PERMISSION}.items():
            if os.strerror(code) in text:
                return reason
        return "the write failed (is the disk full?)"
    return None


@contextmanager
def write_errors(path: str | Path, what: str, kept: str | Callable[[], str] | None = None) -> Iterator[None]:
    """Turn a failed write (disk full, quota, file-size limit, no permission, a file in the path) into an error.

    Args:
        path: what was being written (named in the message, with the file the OS named if it differs).
        what: what it is, e.g. "checkpoint step-8".
        kept: what is still intact, e.g. "checkpoints/step-6 is the newest intact checkpoint" (or a function
            returning it, called only when a write failed).
    """
    try:
        yield
    except Exception as exc:  # OSError, torch's RuntimeError, safetensors' SafetensorError
        reason = describe_write_failure(exc)
        if reason is None:
            raise
        target = Path(path)
        named = getattr(exc, "filename", None)
        detail = f" (at {named})" if named and str(named) != str(target) else ""
        space = _space_left(target) if "space" in reason or "quota" in reason or "failed" in reason else ""
        message = f"{target}: cannot write the {what}: {reason}{detail}{space}."
        kept_text = kept() if callable(kept) else kept
        if kept_text:
            message += f" Kept: {kept_text}."
        raise OutputError(message) from None
