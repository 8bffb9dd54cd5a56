"""Files that are either fully written or not there: stage beside the target, fsync, then rename.

`StagedFiles` writes every new file of a checkpoint under a temporary name in the target directory
first; only when all of them are complete and on disk does `commit` move them over the old names.
A failure before `commit` (an exception, a full disk, a kill) leaves the old files untouched and at
most a `.tmp-*` file behind; os.replace makes each rename atomic on POSIX and Windows.

Staged names carry a tag of the host and the writer's process id (`.tmp-<host>-<pid>-<random>-<name>`), so
the next save into the directory can remove what a killed writer left: files of this host whose process is
gone. Files of live processes, of other hosts (a shared file system) and any other name are left alone.
"""
from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import socket
from pathlib import Path

TEMP_PREFIX = ".tmp-"
_HOST_TAG = hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]
_STAGED_NAME = re.compile(r"\.tmp-(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]{1,10})-[0-9a-f]{12}-")


class StagedFiles:
    """Temporary files in `directory` that become `name` on `commit`, in the order they were staged."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self._staged = []  # (temporary path, final path)
        remove_stale_staging(self.directory)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.discard()
        return False

    def stage(self, name):
        """An empty new file beside `name`, created with the usual permissions (0666 minus umask)."""
        final = self.directory / name
        temporary = self.directory / f"{_staging_prefix()}{name}"
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        os.close(descriptor)
        self._staged.append((temporary, final))
        return temporary

    def commit(self):
        """fsync every staged file, rename each over its final name, then fsync the directory.

        Each rename is atomic; should a later one raise, the files already renamed are put back from
        hard-link backups taken just before, so the old set of files stays consistent (a kill between
        two renames, microseconds apart, is the one case this cannot cover).
        """
        for temporary, _ in self._staged:
            _fsync_path(temporary)
        backups, replaced = [], []  # backups: (backup of the old file or None, final path)
        try:
            for temporary, final in self._staged:
                backups.append((self._backup(final), final))
                os.replace(temporary, final)
                replaced.append(backups[-1])
        except BaseException:
            _restore(replaced)
            raise
        finally:
            for backup, _ in backups:
                if backup is not None and backup.exists():
                    backup.unlink()
        committed = [final for _, final in self._staged]
        self._staged = []
        _fsync_directory(self.directory)
        return committed

    def _backup(self, final):
        """A second name for the current `final` file (a hard link, a copy where links are unsupported)."""
        if not final.is_file():
            return None
        backup = self.directory / f"{_staging_prefix()}old-{final.name}"
        try:
            os.link(final, backup)
        except OSError:
            shutil.copy2(final, backup)
        return backup

    def discard(self):
        for temporary, _ in self._staged:
            try:
                temporary.unlink()
            except FileNotFoundError:
                pass
        self._staged = []


def _staging_prefix() -> str:
    return f"{TEMP_PREFIX}{_HOST_TAG}-{os.getpid()}-{secrets.token_hex(6)}-"


def _process_is_gone(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OverflowError, OSError):  # PermissionError among them
        return False  # alive under another user, or not a pid this platform can probe: keep the file
    return False


def remove_stale_staging(directory) -> list:
    """Remove the staged files a killed writer on this host left in `directory` (not its subfolders); returns
    the names removed. Never follows links and never raises for what it cannot read or remove."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = _STAGED_NAME.match(entry.name)
        if not match or match["host"] != _HOST_TAG or not _process_is_gone(int(match["pid"])):
            continue
        try:
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(entry.name)
        except OSError:
            pass
    return removed


def write_text_atomically(path, text):
    """Replace the file at `path` with `text` (UTF-8) in one rename: readers see the old or the new file."""
    path = Path(path)
    with StagedFiles(path.parent) as staged:
        staged.stage(path.name).write_text(text, encoding="utf-8")
        staged.commit()
    return path


def _restore(backups):
    for backup, final in reversed(backups):
        if backup is None:
            final.unlink(missing_ok=True)
        else:
            os.replace(backup, final)


def _fsync_path(path):
    with open(path, "rb+") as file:
        os.fsync(file.fileno())


def _fsync_directory(directory):
    """Make the renames durable; some platforms (Windows) cannot open a directory, which is harmless."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
