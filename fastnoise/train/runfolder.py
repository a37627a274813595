"""A run folder that a kill, a full disk or a second writer cannot corrupt.

The promises (each held by a test named in docs/reliability.md):

- **Atomic files.** :func:`atomic_path` (and :func:`write_text`, :func:`write_bytes`,
  :func:`save_torch` on top of it) writes a temporary file in the same folder, flushes and
  fsyncs it, renames it over the target and fsyncs the folder: a reader sees the old file or
  the new one, never a part. :func:`remove_stray_temps` deletes what a killed writer left.
- **Appended logs** (:func:`append_row`) are cut back to their last complete row on resume
  (:func:`repair_csv`), and :func:`sync_file` makes them durable before the checkpoint that
  covers them is written.
- **One writer.** :class:`RunLock` holds ``fcntl.flock`` on ``.fastnoise.lock`` in the folder
  for the whole run; the holder writes its pid, host, command and start time into it, and a
  second writer is refused with that text (:class:`FolderBusyError`).
- **Settings.** :func:`read_run` reads a run folder's settings: a ``config.yaml`` must list every
  setting (a truncated one is refused, never filled from defaults) and agree with the settings
  saved in ``last.pt``, which are the truth (the weights were trained with them).
- **Clear errors.** A full disk is :class:`DiskFullError` ("no space left on device", naming the
  file); any other failed write is :class:`RunFolderError`; a diverged run is
  :class:`DivergedError`. All are :class:`~fastnoise.train.recipes.ConfigError`, which the CLI
  prints as one ``fastnoise: error: ...`` line with exit status 2.

Fault injection (tests): ``FASTNOISE_FAULT=POINT[:N][:ACTION]`` makes the process act at the
``N``-th (default 1st) time it reaches ``POINT``. Points are ``before:FILE``, ``temp:FILE`` (the
temporary file is written and synced, not yet renamed), ``after:FILE`` (renamed, folder synced),
``torn:FILE`` (half of an appended row is written), ``delete:FILE`` (``--overwrite`` is about to
delete it) and ``step`` (after each optimizer step);
``FILE`` is a base name (``last.pt``) or ``FOLDER/NAME`` (``teacher/last.pt``). Actions: ``kill``
(default: SIGKILL itself), ``stop`` (SIGSTOP itself, so a test can act while it holds the lock,
then SIGCONT it) and ``enospc`` (fail the write as a full disk would). With
``FASTNOISE_FAULT_TRACE=FILE`` every point reached is appended to ``FILE``.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import errno
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional

import torch
import yaml

from .errors import ConfigError, first_line
from .recipes import DEFAULTS, _merge, load_config_file, validate

__all__ = ["LOCK_NAME", "RunFolderError", "DiskFullError", "FolderBusyError", "DivergedError", "fault",
           "atomic_path", "write_text", "write_bytes", "save_torch", "append_row", "sync_file",
           "remove_stray_temps", "user_entries", "repair_csv", "RunLock", "check_not_busy", "flatten",
           "settings_diff", "load_complete_config", "SavedRun", "read_run", "first_nonfinite", "first_line",
           "dump_config", "load_file"]

LOCK_NAME = ".fastnoise.lock"
_TEMP_RE = re.compile(r"^\..+\.tmp-\d+$|^.+\.tmp\d+$")  # ours, and older versions' NAME.tmpPID


class RunFolderError(ConfigError):
    """A file of a run folder could not be written (permissions, a read-only disk, ...)."""


class DiskFullError(RunFolderError):
    """No space left on the device of a run folder."""


class FolderBusyError(ConfigError):
    """Another process holds the run folder's lock."""


class DivergedError(ConfigError):
    """The loss or the weights became non-finite; no checkpoint was written from them."""


# ----------------------------------------------------------------------------- fault injection
_hits: Counter = Counter()
_ACTIONS = ("kill", "stop", "enospc")


def _parse_fault(text: str) -> tuple[str, int, str]:
    parts = text.strip().split(":")
    action = parts.pop() if parts[-1] in _ACTIONS else "kill"
    n = int(parts.pop()) if len(parts) > 1 and parts[-1].isdigit() else 1
    return ":".join(parts), n, action


def fault(point: str, path: Optional[str] = None) -> None:
    """A fault-injection point (see the module docstring); does nothing unless asked.

    ``point`` is a stage (``before``, ``temp``, ``after``, ``torn``) when ``path`` is given, the
    whole point name (``step``) otherwise.
    """
    names = [point]
    if path is not None:
        base = os.path.basename(path)
        parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
        names = [f"{point}:{base}", f"{point}:{parent}/{base}"]
    trace = os.environ.get("FASTNOISE_FAULT_TRACE")
    if trace:
        with open(trace, "a") as f:
            f.write(names[-1] + "\n")
    spec = os.environ.get("FASTNOISE_FAULT")
    if not spec:
        return
    target, n, action = _parse_fault(spec)
    if target not in names:
        return
    _hits[target] += 1
    if _hits[target] != n:
        return
    if action == "kill":
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "stop":
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGSTOP)
    else:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (FASTNOISE_FAULT={spec})", path)


# ----------------------------------------------------------------------------- atomic writes
def _write_error(e: OSError, path: str) -> RunFolderError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"no space left on device while writing {path!r}; the run folder keeps its "
                             "last complete checkpoint: free some space and resume it (--resume, or "
                             "resume=True)")
    return RunFolderError(f"cannot write {path!r}: {e.strerror or e}")


def fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder
        pass
    finally:
        os.close(fd)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name(path: str) -> str:
    folder, base = os.path.split(path)
    return os.path.join(folder, f".{base}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str):
    """``with atomic_path(p) as tmp: write(tmp)``: ``p`` appears whole or not at all.

    The temporary file is in ``p``'s folder (a rename is atomic only within one file system);
    it is flushed to disk before the rename and the folder after it. A failed write removes it
    and raises :class:`DiskFullError` / :class:`RunFolderError` naming ``p``.
    """
    path = os.fspath(path)
    tmp = _temp_name(path)
    try:
        fault("before", path)
        yield tmp
        _fsync_path(tmp)
        fault("temp", path)
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path))
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise _write_error(e, path) from e
        raise
    fault("after", path)


def write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def dump_config(cfg: dict, path: str) -> None:
    """Write ``cfg`` as YAML, atomically."""
    write_text(path, yaml.safe_dump(cfg, sort_keys=False))


class _RecordingFile:
    """A binary file for ``torch.save`` that keeps the OSError of a failed write (torch turns it
    into a RuntimeError that does not say why)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_torch(obj, path: str) -> None:
    """``torch.save`` through :func:`atomic_path`; a full disk is reported as one."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        rec = _RecordingFile(f)
        try:
            torch.save(obj, rec)
            f.flush()
        except OSError:
            raise
        except Exception:
            if rec.error is not None:
                raise rec.error from None
            raise


def append_row(path: str, row: dict) -> None:
    """Append one CSV row (with a header if the file is new or empty) and flush it.

    A kill can leave half a row; :func:`repair_csv` removes it on resume.
    """
    new = not os.path.isfile(path) or os.path.getsize(path) == 0
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(row))
    if new:
        w.writeheader()
    w.writerow(row)
    data = buf.getvalue()
    try:
        fault("before", path)
        with open(path, "a", newline="") as f:
            half = len(data) // 2
            f.write(data[:half])
            f.flush()
            fault("torn", path)
            f.write(data[half:])
            f.flush()
    except OSError as e:
        raise _write_error(e, path) from e
    fault("after", path)


def sync_file(path: str) -> None:
    """fsync an appended file (before the checkpoint that covers its rows is written)."""
    if os.path.isfile(path):
        try:
            _fsync_path(path)
        except OSError as e:
            raise _write_error(e, path) from e


def remove_stray_temps(folder: str) -> list[str]:
    """Delete the temporary files a killed writer left in ``folder`` (and a folder that was being
    deleted, ``.NAME.tmp-PID``); call it under the lock."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in sorted(os.listdir(folder)):
        p = os.path.join(folder, name)
        if not _TEMP_RE.match(name) or os.path.islink(p):
            continue
        if os.path.isfile(p):
            with contextlib.suppress(FileNotFoundError):
                os.remove(p)
                removed.append(name)
        elif os.path.isdir(p) and name.startswith("."):  # a folder renamed away to be deleted
            shutil.rmtree(p, ignore_errors=True)
            removed.append(name)
    return removed


def user_entries(folder: str) -> list[str]:
    """``os.listdir(folder)`` without the lock file and stray temporary files."""
    if not os.path.isdir(folder):
        return []
    return sorted(n for n in os.listdir(folder) if n != LOCK_NAME and not _TEMP_RE.match(n))


def repair_csv(path: str, key: str, limit: int) -> Optional[tuple[int, int]]:
    """Cut an appended CSV log back to its complete rows with ``key <= limit``.

    Drops the torn part after the last newline, every line that does not parse as a row of the
    header's width, rows whose ``key`` is not an int above the previous row's, and rows past
    ``limit``; rewrites the file atomically if anything changed (removes it if no row is left,
    or if its header is unreadable). Returns ``(rows kept, lines dropped)``, or None if there is
    no file.
    """
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    torn = lines.pop()  # after the last newline: empty, or a row cut short
    header, kept, dropped = None, [], 1 if torn.strip() else 0
    for i, raw in enumerate(lines):
        try:
            cells = next(csv.reader([raw.decode("utf-8").rstrip("\r")]))
        except (UnicodeDecodeError, csv.Error, StopIteration):
            cells = None
        if i == 0:
            if cells is None or key not in cells:
                dropped += len([r for r in lines if r.strip()])
                break
            header, col = cells, cells.index(key)
            continue
        try:
            k = int(cells[col]) if cells is not None and len(cells) == len(header) else None
        except ValueError:
            k = None
        if k is None or k > limit or (kept and k <= int(kept[-1][col])):
            dropped += 1 if raw.strip() else 0
            continue
        kept.append(cells)
    if header is not None and dropped == 0:
        return len(kept), 0
    if not kept:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        fsync_dir(os.path.dirname(path))
    else:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(header)
        w.writerows(kept)
        write_text(path, buf.getvalue())
    return len(kept), dropped


# ----------------------------------------------------------------------------- one writer
_held_fds: set = set()  # lock descriptors of this process


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker, say): close the parent's lock descriptors. A flock
    belongs to the open file, which a fork shares: a worker that outlives its run (persistent
    workers, a failed run's loader not yet collected) would otherwise keep the folder locked."""
    for fd in list(_held_fds):
        try:
            os.close(fd)
        except OSError:
            pass
    _held_fds.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


class RunLock:
    """An exclusive ``fcntl.flock`` on ``FOLDER/.fastnoise.lock``, held until :meth:`release`.

    The lock file is never deleted (deleting it would let two processes lock two different
    files); the kernel releases the lock when the holder exits, however it exits.
    """

    def __init__(self, folder: str):
        self.folder = os.fspath(folder)
        self.path = os.path.join(self.folder, LOCK_NAME)
        self._fd: Optional[int] = None

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock (documented)
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _write_error(e, self.path) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _describe_holder(fd)
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise _write_error(e, self.path) from e
            raise FolderBusyError(_busy_message(self.folder, holder)) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": shlex.join(sys.argv),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            raise _write_error(e, self.path) from e
        self._fd = fd
        _held_fds.add(fd)
        return self

    def release(self) -> None:
        if self._fd is not None and self._fd in _held_fds:  # (not in a fork, which closed it)
            _held_fds.discard(self._fd)
            os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None and self._fd in _held_fds

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_not_busy(folder: str) -> None:
    """Raise :class:`FolderBusyError` if another process holds ``folder``'s lock. Writes nothing
    (a read-only probe: the lock is taken and dropped at once), so it can run before any check."""
    try:
        import fcntl
        fd = os.open(os.path.join(folder, LOCK_NAME), os.O_RDONLY)
    except (ImportError, OSError):
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise FolderBusyError(_busy_message(folder, _describe_holder(fd))) from None
    finally:
        os.close(fd)


def _busy_message(folder: str, holder: str) -> str:
    return (f"run folder {folder!r} is in use by {holder}; only one process may write a run folder: "
            "wait for it to finish (or stop it) and try again")


def _describe_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "{}")
        return (f"process {info['pid']} on {info['host']} (started {info['started']}: "
                f"{info['command']})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its lock file does not say which)"


# ----------------------------------------------------------------------------- settings
def flatten(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def settings_diff(a: dict, b: dict, ignore: Iterable[str] = ()) -> Optional[tuple[str, object, object]]:
    """The first dotted key (sorted) whose value differs between ``a`` and ``b``, with both values."""
    fa, fb, skip = flatten(a), flatten(b), set(ignore)
    for key in sorted(set(fa) | set(fb)):
        if key not in skip and fa.get(key) != fb.get(key):
            return key, fa.get(key), fb.get(key)
    return None


def load_complete_config(path: str, required: Optional[dict] = None) -> dict:
    """A run folder's ``config.yaml``: every setting must be there (``required``: the keys of
    ``last.pt``'s settings, default every key of :data:`DEFAULTS`), none filled from defaults."""
    raw = load_config_file(path)
    cfg = copy.deepcopy(DEFAULTS)
    try:
        _merge(cfg, raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    have = flatten(raw)
    missing = [k for k in flatten(required if required is not None else DEFAULTS) if k not in have]
    if missing:
        default = flatten(DEFAULTS).get(missing[0])
        raise ConfigError(f"{path} is damaged or incomplete: it lacks {missing[0]} (default {default!r})"
                          f"{f' and {len(missing) - 1} more settings' if len(missing) > 1 else ''}; a run "
                          "folder's config.yaml lists every setting, so nothing is filled in from defaults")
    try:
        return validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


@dataclass
class SavedRun:
    """What :func:`read_run` found in a run folder."""

    config: Optional[dict]          # the run's settings (last.pt's if there is one), None if none
    has_config_file: bool
    checkpoint: Optional[dict]      # last.pt's small fields (epoch, global_step, ...), None if none


def read_run(folder: str, version: int, resumable: Iterable[str] = ()) -> SavedRun:
    """Read and cross-check a run folder's ``config.yaml`` and ``last.pt``.

    Raises :class:`ConfigError` for a damaged or partial ``config.yaml``, a ``last.pt`` that is
    not a checkpoint of this ``version``, or the two disagreeing on a setting outside
    ``resumable`` (the settings a resume may change).
    """
    cfg_path, last_path = os.path.join(folder, "config.yaml"), os.path.join(folder, "last.pt")
    info = None
    last_cfg = None
    raw_last = None
    if os.path.exists(last_path):
        state = load_file(last_path, "checkpoint", mmap=True)
        if not isinstance(state, dict) or state.get("version") != version or not isinstance(
                state.get("config"), dict):
            got = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise ConfigError(f"{last_path!r} is not a fastnoise run checkpoint of version {version} "
                              f"(found {got!r}); it was written by another program or an older fastnoise")
        raw_last = state["config"]
        info = {k: state.get(k) for k in ("epoch", "step_in_epoch", "global_step", "best", "best_epoch",
                                          "data_sizes")}
        last_cfg = copy.deepcopy(DEFAULTS)
        try:
            _merge(last_cfg, state["config"])  # settings added after it was written take defaults
            validate(last_cfg)
        except ConfigError as e:
            raise ConfigError(f"{last_path!r} holds invalid settings: {e}") from None
        del state
    has_file = os.path.exists(cfg_path)
    file_cfg = None
    if has_file:
        file_cfg = load_complete_config(cfg_path, required=raw_last)
    if last_cfg is not None and file_cfg is not None:
        diff = settings_diff(file_cfg, last_cfg, resumable)
        if diff is not None:
            key, a, b = diff
            raise ConfigError(f"{cfg_path} does not match {last_path}: {key} is {a!r} in config.yaml but "
                              f"{b!r} in last.pt (the settings its weights were trained with); restore "
                              "config.yaml, or delete it to have it written again from last.pt")
    return SavedRun(last_cfg if last_cfg is not None else file_cfg, has_file, info)


# ----------------------------------------------------------------------------- reading torch files
def load_file(path: str, what: str = "checkpoint", mmap: bool = False):
    """``torch.load(path, weights_only=True)`` onto the CPU; a missing, unreadable or damaged
    file is a :class:`ConfigError` naming it. ``mmap=True`` maps the tensors instead of reading
    them (cheap when only a few small fields are wanted)."""
    if not os.path.exists(path):
        raise ConfigError(f"{what} file {path!r} does not exist")
    if not os.path.isfile(path):
        raise ConfigError(f"{what} file {path!r} is not a file")
    if mmap:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # not mappable: read it, which also gives the clearer error
            pass
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several kinds for a file that is not a checkpoint
        raise ConfigError(f"{what} file {path!r} could not be read as a torch file: it is damaged, "
                          f"truncated or not a checkpoint ({first_line(e)})") from e


# ----------------------------------------------------------------------------- finite weights
def _all_finite(t: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool tensor: no NaN or inf in ``t``. One pass of ``aminmax`` (NaN propagates into
    both, +-inf are the extremes), about 10x faster on the CPU than ``isfinite().all()``, which
    writes a bool tensor of t's size first. Complex tensors are read as their real pairs; dtypes
    without aminmax (float8, whose isfinite is missing too) are read in float32, which holds them."""
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    if t.is_complex():
        t = torch.view_as_real(t.resolve_conj())
    try:
        lo, hi = torch.aminmax(t)
    except (RuntimeError, NotImplementedError):
        lo, hi = torch.aminmax(t.float())
    return lo.isfinite() & hi.isfinite()


def first_nonfinite(tensors) -> Optional[str]:
    """The name of the first floating tensor with a NaN or inf in ``tensors`` (a dict, possibly
    nested, e.g. a model's or an optimizer's ``state_dict``), or None. One device sync."""
    flat: list[tuple[str, torch.Tensor]] = []

    def walk(obj, name):
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point() or obj.is_complex():
                flat.append((name, obj))
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{name}.{i}" if name else str(i))
        elif isinstance(obj, float) and not math.isfinite(obj):
            flat.append((name, torch.tensor(obj)))

    walk(tensors, "")
    if not flat:
        return None
    by_device: dict = {}
    for i, (_, t) in enumerate(flat):
        by_device.setdefault(t.device, []).append(i)
    bad = []
    for idx in by_device.values():
        ok = torch.stack([_all_finite(flat[i][1].detach()) for i in idx]).cpu()
        bad.extend(idx[j] for j in range(len(idx)) if not bool(ok[j]))
    return flat[min(bad)][0] if bad else None
