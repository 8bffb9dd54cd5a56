"""Files that are either fully written or not there, one writer per folder, and reads that cannot be redirected.

Writing. `StagedFiles` writes every new file of a checkpoint under a temporary name in the target directory
first; `commit` then changes the final names while it holds the directory's exclusive lock. One file is one
os.replace, atomic on POSIX and Windows. Several files (config.json and the weights), or files to remove as
well (weights of another format that would shadow the new ones), are one transaction with a rollback journal,
as SQLite does it: every file that will be replaced or removed first gets a second name (a hard link), then
the journal listing them is written and fsynced, then the final names change; removing the journal is the
commit point. A writer killed before that point leaves the journal, and the next fastconvnext load or save of
the folder puts the old files back before it does anything else; killed after it, the new files are whole.
A config.json staged with `skip_if_unchanged` whose text equals the current file is left alone, so re-saving
new weights with the same config is a single rename (atomic for every reader, journal-aware or not).

Locking. `DirectoryLock` takes flock(2) on the directory itself (no lock file is added to the folder, and a
read-only folder can be locked): exclusive while a commit changes names, shared while a checkpoint of several
files is read (`reading`), so a load never sees one save's weights beside another's config.json, and two saves
into one folder are serialised instead of deleting each other's fresh weights. Where flock is unsupported (no
fcntl, some network file systems) the lock degrades to nothing; loaders still compare what they read with what
is on disk afterwards (checkpoint.py).

Staged names carry a tag of the host and the writer's process id (`.tmp-<host>-<pid>-<random>-<name>`, the
name part shortened so the whole stays within the file system's NAME_MAX), so a later commit can remove what a
killed writer left: files of this host whose process is gone, once any journal they belong to is rolled back.
Files of live processes, of other hosts (a shared file system) and any other name are left alone.

Reading. `open_regular_file` opens a path for reading only if the file it actually opened is a regular file
inside the allowed root: the final component is opened with O_NOFOLLOW and O_NONBLOCK (a FIFO can neither
block nor be read), the descriptor is fstat'ed, and where /proc is available the kernel's path of the open
descriptor must lie inside the root, so a symlink swapped in after the path was checked is refused, not
followed.
"""
from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import time
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"
JOURNAL_NAME = ".fastconvnext-journal.json"
JOURNAL_FORMAT = "fastconvnext-rollback-journal"
MAX_JOURNAL_BYTES = 2**20
MAX_JOURNAL_ENTRIES = 10_000
# The only names a journaled transaction may change (a checkpoint's files), so that a journal planted in a
# downloaded folder can at most put one checkpoint file in place of another, never remove anything else.
JOURNALED_NAMES = (
    "config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
    "pytorch_model.bin.index.json", "model-*-of-*.safetensors", "pytorch_model-*-of-*.bin",
)
# How long a save or a load waits for another process's lock on the folder before it gives up.
LOCK_TIMEOUT_S = 300.0
_DEFAULT_NAME_MAX = 255
_HOST_TAG = hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]
_STAGED_NAME = re.compile(r"\.tmp-(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]{1,10})-[0-9a-f]{12}-")
_KINDS = {
    stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket", stat.S_IFLNK: "a symbolic link",
}


class JournalError(OSError):
    """A rollback journal that cannot be read or applied."""


# ---- staging and committing -------------------------------------------------------------------------


class StagedFiles:
    """Temporary files in `directory` that become `name` on `commit`, in the order they were staged."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self._staged = []  # (temporary path, final path, skip_if_unchanged)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.discard()
        return False

    def stage(self, name, skip_if_unchanged=False):
        """An empty new file beside `name`, created with the usual permissions (0666 minus umask).

        skip_if_unchanged: at commit, leave the current `name` in place when its bytes equal the staged file's
        (for small files such as config.json; the comparison is made under the directory lock).
        """
        final = self.directory / name
        temporary = self.directory / staged_name(self.directory, name)
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        os.close(descriptor)
        self._staged.append((temporary, final, skip_if_unchanged))
        return temporary

    def commit(self, remove=()):
        """fsync the staged files, then, holding the directory's exclusive lock, roll back what a killed writer
        left, and move every staged file over its final name and remove the entries of the directory that match
        `remove` (names or fnmatch patterns; files and links only, never a staged name), as one transaction.
        Returns the final paths written."""
        for temporary, _, _ in self._staged:
            _fsync_path(temporary)
        with DirectoryLock(self.directory, exclusive=True):
            _recover_before_writing(self.directory)
            remove_stale_staging(self.directory)
            replacements, removals = self._plan(remove)
            if len(replacements) + len(removals) == 1 and replacements:
                temporary, final = replacements[0]
                os.replace(temporary, final)
                _fsync_directory(self.directory)
            elif replacements or removals:
                _Transaction(self.directory, replacements, removals).run()
        written = [final for _, final in replacements]
        self._staged = []
        return written

    def _plan(self, remove):
        """([(temporary, final)] to move, [final] to delete), under the lock."""
        replacements = []
        for temporary, final, skip_if_unchanged in self._staged:
            if skip_if_unchanged and _same_bytes(temporary, final):
                _unlink_quietly(temporary)
                continue
            replacements.append((temporary, final))
        staged_names = {final.name for _, final, _ in self._staged}
        removals = []
        patterns = list(remove)
        if patterns:
            with os.scandir(self.directory) as entries:
                for entry in entries:
                    if entry.name in staged_names or entry.name in (JOURNAL_NAME,) or _STAGED_NAME.match(entry.name):
                        continue
                    if not any(fnmatch.fnmatchcase(entry.name, p) for p in patterns):
                        continue
                    if entry.is_symlink() or entry.is_file(follow_symlinks=False):
                        removals.append(self.directory / entry.name)
        return replacements, sorted(removals)

    def discard(self):
        for temporary, _, _ in self._staged:
            _unlink_quietly(temporary)
        self._staged = []


class _Transaction:
    """Several final names changed as one: backups, journal, renames and removals, journal removed (the commit
    point), backups removed. Any failure before the commit point puts every final name back."""

    def __init__(self, directory, replacements, removals):
        self.directory = directory
        self.replacements, self.removals = replacements, removals
        self.entries = []  # [final name, backup name or None]

    def run(self):
        finals = [final for _, final in self.replacements] + self.removals
        unjournaled = [f.name for f in finals if not _journaled_name(f.name)]
        if unjournaled:
            raise ValueError(f"a transaction of several files may only change {JOURNALED_NAMES}, not {unjournaled}")
        try:
            for final in finals:
                backup = _backup(self.directory, final)
                self.entries.append([final.name, None if backup is None else backup.name])
            _write_journal(self.directory, self.entries)
        except BaseException:
            self._drop_backups()
            raise
        try:
            for temporary, final in self.replacements:
                os.replace(temporary, final)
            for final in self.removals:
                try:
                    os.unlink(final)
                except FileNotFoundError:
                    pass
            _fsync_directory(self.directory)
        except BaseException:
            try:
                _roll_back(self.directory, self.entries)
                _remove_journal(self.directory)
            except BaseException as err:  # the journal stays: the next load or save of the folder rolls back
                logger.error("rolling back a failed commit in %s failed (%s); the journal %s stays for the next "
                             "load or save to apply", self.directory, err, JOURNAL_NAME)
            raise
        _remove_journal(self.directory)
        self._drop_backups()

    def _drop_backups(self):
        for _, backup in self.entries:
            if backup is not None:
                _unlink_quietly(self.directory / backup)


def _backup(directory, final):
    """A second name for the current `final` (a hard link; a copy where links are unsupported), or None when there
    is no such file. A symbolic link is backed up as a link, not followed."""
    try:
        info = os.lstat(final)
    except FileNotFoundError:
        return None
    backup = directory / staged_name(directory, f"old-{final.name}")
    if stat.S_ISLNK(info.st_mode):
        os.symlink(os.readlink(final), backup)
        return backup
    try:
        os.link(final, backup, follow_symlinks=False)
    except OSError:
        shutil.copy2(final, backup)
    return backup


def _roll_back(directory, entries):
    """Give every final name of `entries` its backup back (or remove it when it had none), last entry first.

    Idempotent, so a rollback interrupted by another crash is finished by the next: a backup that is gone was
    already moved back (nothing else removes a journal's backups: stale staged files are removed only after the
    journal is rolled back)."""
    for final_name, backup_name in reversed(entries):
        final = directory / final_name
        if backup_name is None:
            try:
                os.unlink(final)
            except FileNotFoundError:
                pass
            continue
        backup = directory / backup_name
        if not os.path.lexists(backup):
            continue
        if _same_file(backup, final):  # not replaced yet: rename() of two links to one file does nothing
            os.unlink(backup)
        else:
            os.replace(backup, final)
    _fsync_directory(directory)


def _write_journal(directory, entries):
    record = {"format": JOURNAL_FORMAT, "version": 1, "host": _HOST_TAG, "pid": os.getpid(), "entries": entries}
    temporary = directory / staged_name(directory, JOURNAL_NAME)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(json.dumps(record).encode("utf-8"))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, directory / JOURNAL_NAME)
    except BaseException:
        _unlink_quietly(temporary)
        raise
    _fsync_directory(directory)


def _remove_journal(directory):
    os.unlink(directory / JOURNAL_NAME)
    _fsync_directory(directory)


def read_journal(directory):
    """The entries of `directory`'s rollback journal, checked: plain names inside the directory, backups staged names.
    JournalError when the journal is unreadable or malformed."""
    path = Path(directory) / JOURNAL_NAME
    try:
        with open_regular_file(path, Path(directory).resolve()) as file:
            data = file.read(MAX_JOURNAL_BYTES + 1)
        record = json.loads(data) if len(data) <= MAX_JOURNAL_BYTES else None
    except (OSError, ValueError, RecursionError) as err:
        raise JournalError(f"cannot read the rollback journal {path}: {err}") from None
    entries = record.get("entries") if isinstance(record, dict) and record.get("format") == JOURNAL_FORMAT else None
    if not isinstance(entries, list) or len(entries) > MAX_JOURNAL_ENTRIES or not all(
        isinstance(e, list) and len(e) == 2 and _plain_name(e[0]) and _journaled_name(e[0])
        and (e[1] is None or (_plain_name(e[1]) and _STAGED_NAME.match(e[1])))
        for e in entries
    ):
        raise JournalError(f"{path} is not a rollback journal fastconvnext wrote (expected {{'format': "
                           f"{JOURNAL_FORMAT!r}, 'entries': [[checkpoint file name, staged backup name or null], "
                           f"...]}})")
    return entries, record


def recover(directory):
    """Roll back the transaction a killed commit left in `directory`, if any; call it holding the exclusive lock.
    Returns True when there was one. JournalError when the journal cannot be read (then nothing is changed)."""
    directory = Path(directory)
    if not os.path.lexists(directory / JOURNAL_NAME):
        return False
    entries, _ = read_journal(directory)
    _roll_back(directory, entries)
    _remove_journal(directory)
    logger.warning("%s: rolled back the interrupted save recorded in %s", directory, JOURNAL_NAME)
    return True


def _recover_before_writing(directory):
    """A writer about to commit rolls back a killed writer's transaction; a journal it cannot apply is set aside
    (renamed, with a warning): the commit that follows replaces config.json and the weights and removes stale ones,
    so it leaves a whole checkpoint either way."""
    try:
        recover(directory)
    except JournalError as err:
        aside = directory / staged_name(directory, f"unusable-{JOURNAL_NAME}")
        os.replace(directory / JOURNAL_NAME, aside)
        logger.warning("%s; moved it aside to %s", err, aside.name)


# ---- locking ----------------------------------------------------------------------------------------


def _on_lock_busy(directory, exclusive):
    """Called once each time a lock is found held by another process or thread, before waiting for it. Does
    nothing; tests replace it to learn, without sleeping, that a save or load is waiting."""


class DirectoryLock:
    """flock(2) on the directory itself: shared (loads) or exclusive (commits), waited for up to `timeout` s.

    Each instance opens the directory anew, so two threads of one process exclude each other too. `held` is the
    mode held (fcntl.LOCK_SH / LOCK_EX), or None where the platform or file system cannot lock.
    """

    def __init__(self, directory, exclusive=False, timeout=None):
        self.directory = Path(directory)
        self.exclusive = exclusive
        self.timeout = LOCK_TIMEOUT_S if timeout is None else timeout
        self.held = None
        self._descriptor = None
        self.supported = True

    def __enter__(self):
        self.acquire(self.exclusive)
        return self

    def __exit__(self, *exc_info):
        self.release()
        return False

    def acquire(self, exclusive):
        try:
            import fcntl
        except ImportError:
            self.supported = False
            return
        if self._descriptor is None:
            flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
            try:
                self._descriptor = os.open(self.directory, flags)
            except OSError as err:  # a directory we may traverse but not open: no lock to take
                logger.debug("cannot open %s to lock it (%s); going on without a lock", self.directory, err)
                self.supported = False
                return
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        deadline, delay, waited = time.monotonic() + self.timeout, 0.001, False
        while True:
            try:
                fcntl.flock(self._descriptor, mode | fcntl.LOCK_NB)
                self.held = mode
                return
            except BlockingIOError:
                pass
            except InterruptedError:
                continue
            except OSError as err:  # ENOLCK, EOPNOTSUPP, EINVAL: a file system without flock
                logger.debug("cannot flock %s (%s); going on without a lock", self.directory, err)
                self.supported = False
                return
            if not waited:
                _on_lock_busy(self.directory, exclusive)
                waited = True
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    errno.ETIMEDOUT,
                    f"waited {self.timeout:g} s for another process to finish "
                    f"{'reading or saving' if exclusive else 'saving'} the checkpoint in {self.directory} (it holds "
                    f"the folder's lock); retry once it is done",
                )
            time.sleep(delay)
            delay = min(2 * delay, 0.05)

    def release(self):
        if self._descriptor is not None:
            os.close(self._descriptor)  # closing the only descriptor of this open file releases its flock
            self._descriptor = None
        self.held = None


@contextmanager
def reading(directory, timeout=None):
    """Hold `directory`'s shared lock while a checkpoint of several files is read from it.

    A journal left by a killed save is rolled back first (with the exclusive lock, which needs write access); a
    folder whose journal cannot be rolled back raises OSError naming it, instead of serving a mix of two saves.
    """
    directory = Path(directory)
    lock = DirectoryLock(directory, timeout=timeout)
    try:
        lock.acquire(exclusive=False)
        while os.path.lexists(directory / JOURNAL_NAME):
            if not lock.supported:
                _check_journal_writer_gone(directory)
            lock.release()
            lock.acquire(exclusive=True)
            try:
                recover(directory)
            except OSError as err:
                raise OSError(
                    err.errno,
                    f"{directory} holds the journal of an interrupted save ({JOURNAL_NAME}): its files are a mix "
                    f"of two saves, and rolling back to the previous checkpoint failed ({err}). Open the folder "
                    f"with write access so that loading it rolls back, or save the model into it again",
                ) from None
            lock.release()
            lock.acquire(exclusive=False)
        yield lock
    finally:
        lock.release()


def _check_journal_writer_gone(directory):
    """Without locks, a journal whose writer is alive on this host means a save is under way."""
    try:
        _, record = read_journal(directory)
    except JournalError:
        return
    if record.get("host") == _HOST_TAG and isinstance(record.get("pid"), int) and not _process_is_gone(record["pid"]):
        raise BlockingIOError(errno.EAGAIN, f"a save into {directory} is under way (process {record['pid']}); "
                                            f"retry once it is done")


# ---- staged names -----------------------------------------------------------------------------------


def staged_name(directory, name):
    """`.tmp-<host>-<pid>-<random>-<name>`, with `name` shortened (never the prefix) to fit NAME_MAX."""
    prefix = f"{TEMP_PREFIX}{_HOST_TAG}-{os.getpid()}-{secrets.token_hex(6)}-"
    room = _name_max(directory) - len(os.fsencode(prefix))
    used, kept = 0, []
    for character in name:
        size = len(os.fsencode(character))
        if used + size > room:
            break
        used += size
        kept.append(character)
    return prefix + "".join(kept)


def _name_max(directory):
    try:
        return int(os.pathconf(directory, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return _DEFAULT_NAME_MAX


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
    """Remove the staged files a killed writer on this host left in `directory` (not its subfolders); returns the
    names removed. Never follows links and never raises for what it cannot read or remove. Call it holding the
    exclusive lock, after `recover`: a journal's backups are staged names of its (dead) writer."""
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
            if entry.is_file(follow_symlinks=False) or entry.is_symlink():
                os.unlink(entry.path)
                removed.append(entry.name)
        except OSError:
            pass
    return removed


def write_text_atomically(path, text):
    """Replace the file at `path` with `text` (UTF-8) in one rename: readers see the old or the new file."""
    path = Path(path)
    with StagedFiles(path.parent) as staged:
        try:
            staged.stage(path.name).write_text(text, encoding="utf-8")
        except OSError as err:
            raise write_error(path, err) from None
        staged.commit()
    return path


def write_error(final, err):
    """An OSError naming the file being written (`final`, not its staged name), with the cause's errno."""
    code = getattr(err, "errno", None)
    if code is None:  # safetensors and torch report I/O errors in their message: "... Os { code: 28, ..."
        found = re.search(r"(?:code: |os error |errno )(\d+)", str(err))
        code = int(found.group(1)) if found else None
    if code:
        return OSError(code, f"cannot write {final}: {os.strerror(code)}")
    return OSError(f"cannot write {final}: {type(err).__name__}: {err}")


# ---- reading ----------------------------------------------------------------------------------------


def open_regular_file(path, root=None, what=None):
    """`path` opened for binary reading, refused unless what was opened is a regular file inside `root` (a resolved
    directory; None: anywhere). Raises FileNotFoundError, PermissionError (outside `root`, or a symlink swapped in
    after the check), IsADirectoryError or OSError (a FIFO, device or socket), each naming `what` (default: path).
    """
    what = str(path) if what is None else what
    try:
        resolved = Path(path).resolve(strict=True)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, f"no such file: {what}") from None
    except (OSError, RuntimeError) as err:  # a symlink loop, a component that is not a directory
        raise OSError(getattr(err, "errno", None) or errno.ELOOP, f"{what} cannot be resolved ({err})") from None
    if root is not None and not resolved.is_relative_to(root):
        raise PermissionError(f"refusing to read {what}: it resolves to {resolved}, outside the model directory {root}")
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_BINARY", 0)
    try:
        descriptor = os.open(resolved, flags)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise PermissionError(f"refusing to read {what}: {resolved} became a symbolic link after it was checked") \
                from None
        raise OSError(err.errno, f"cannot open {what}: {err.strerror}") from None
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            kind = _KINDS.get(stat.S_IFMT(info.st_mode), "not a regular file")
            error = IsADirectoryError if stat.S_ISDIR(info.st_mode) else OSError
            raise error(f"{what} is {kind}, expected a regular file")
        if root is not None:
            _check_opened_inside(descriptor, info, resolved, root, what)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def descriptor_path(file):
    """A path that reopens the very file `file` has open (/proc/self/fd/N), or None where there is no such path."""
    candidate = f"/proc/self/fd/{file.fileno()}"
    return candidate if os.path.exists(candidate) else None


def _check_opened_inside(descriptor, info, resolved, root, what):
    """The file behind `descriptor` must be inside `root`: by the kernel's own path of the descriptor where /proc
    has it, else by comparing it with what `resolved` names now (a narrower check: no swap after the open)."""
    try:
        actual = os.readlink(f"/proc/self/fd/{descriptor}")
    except OSError:
        actual = None
    if actual is not None and actual.startswith("/"):
        actual = actual.removesuffix(" (deleted)")
        if not Path(actual).is_relative_to(root):
            raise PermissionError(f"refusing to read {what}: the file opened is {actual}, outside the model directory "
                                  f"{root} (a symbolic link was swapped in after the check)")
        return
    try:
        now = os.stat(resolved, follow_symlinks=False)
    except OSError:
        now = None
    if now is None or (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
        raise PermissionError(f"refusing to read {what}: {resolved} changed while it was being opened")


def model_root(folder):
    """The folder nothing of a model in `folder` may be read outside of: `folder` resolved, or, for a Hugging Face
    cache snapshot (.../models--org--name/snapshots/<revision>, whose files link to ../../blobs/<hash>), the
    models--org--name folder."""
    resolved = Path(folder).resolve()
    if resolved.parent.name == "snapshots" and resolved.parent.parent.name.startswith("models--"):
        return resolved.parent.parent
    return resolved


# ---- small helpers ----------------------------------------------------------------------------------


def _plain_name(name):
    return (isinstance(name, str) and 0 < len(name) <= 4096 and name not in (".", "..")
            and not any(c in name for c in ("/", "\\", "\x00")))


def _journaled_name(name):
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in JOURNALED_NAMES)


def _same_file(a, b):
    try:
        return os.path.samestat(os.lstat(a), os.lstat(b))
    except OSError:
        return False


def _same_bytes(temporary, final):
    """Whether `final` is a regular file (not a link) holding exactly the bytes of `temporary`."""
    try:
        info = os.lstat(final)
        if not stat.S_ISREG(info.st_mode) or info.st_size != os.path.getsize(temporary):
            return False
        with open(temporary, "rb") as new, open_regular_file(final, final.parent.resolve()) as old:
            return new.read() == old.read()
    except OSError:
        return False


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


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
