"""Reward-model checkpoints: one directory, written atomically.

Layout of a checkpoint directory::

    prefkernels.json      format tag, library version, pooling, num_heads, max_length,
                          reward_mean/std (set after training), hidden_size, extra fields
    backbone/             the transformers backbone via save_pretrained (safetensors)
    head.safetensors      RewardHead: weight [K, D], bias [K] (float32)
    tokenizer/            tokenizer.save_pretrained (when a tokenizer is given)
    training_state.pt     optional: optimizer, scheduler, data position, and each process's RNG
                          state and training sums since the last log (resume)

``atomic_directory`` writes into a temporary sibling and renames it into place, so a reader
never sees a half-written checkpoint and a killed writer leaves the previous one intact: a kill
between its two renames (the previous version moved aside, the new one not yet in place) leaves
the previous version as a hidden ``.old-*`` sibling, which ``locate`` finds for readers and
``recover`` renames back for the next writer.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path

CONFIG_NAME = "prefkernels.json"
HEAD_NAME = "head.safetensors"
BACKBONE_DIR = "backbone"
TOKENIZER_DIR = "tokenizer"
TRAINING_STATE_NAME = "training_state.pt"
FORMAT = "prefkernels-reward-model"
REQUIRED_FILES = (CONFIG_NAME, HEAD_NAME, BACKBONE_DIR)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike):
    """Yield a fresh temporary directory; on success it replaces ``target`` (``target`` moved aside,
    the new one renamed into place, the old one removed)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        try:
            yield tmp
        except (OSError, ValueError):  # the caller's own errors (an export's failed check) pass as they are
            raise
        except Exception as err:  # torch.save and safetensors report a full disk as RuntimeError/SafetensorError
            raise OSError(f"{target}: writing it failed ({type(err).__name__}: {str(err)[:200]}; a full disk?); "
                          "the previous version, if any, is kept") from err
        _fsync_tree(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _previous_version(target: Path) -> Path | None:
    """The newest ``.old-*`` sibling of ``target``: a complete version moved aside by ``atomic_directory``."""
    return max(target.parent.glob(f".{glob.escape(target.name)}.old-*"), key=lambda p: p.stat().st_mtime,
               default=None)


def locate(path: str | os.PathLike) -> Path:
    """``path``, or its previous version when a writer was killed between its two renames."""
    path = Path(path)
    return path if path.exists() else _previous_version(path) or path


def recover(target: str | os.PathLike) -> None:
    """For the writer of ``target``: rename its previous version back when a kill left ``target``
    missing, and remove what interrupted writes left (other ``.old-*`` and ``.tmp-*`` siblings)."""
    target = Path(target)
    if not target.exists() and (previous := _previous_version(target)) is not None:
        os.replace(previous, target)
    name = glob.escape(target.name)
    for stale in (*target.parent.glob(f".{name}.old-*"), *target.parent.glob(f".{name}.tmp-*")):
        shutil.rmtree(stale, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file via a temporary sibling and rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def lock_file(path: Path, mode: str):
    """``open(path, mode)`` holding an exclusive lock (released by the OS however the process ends),
    or None when another process holds it. The lock is on the file that is at ``path`` once it is
    held (a holder may rename or remove it on its way out). Where the file system has no locks, the
    file comes back unlocked, with a warning."""
    while True:
        handle = open(path, mode)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                handle.close()
                raise
            warnings.warn(f"{path}: the file system has no file locks ({err}); going on without one, so "
                          "nothing stops a second process from writing the same output", RuntimeWarning, stacklevel=2)
            return handle
        if is_file_at(path, handle):
            return handle
        handle.close()  # locked a file its holder has just renamed or removed: open the new one


def is_file_at(path: Path, handle) -> bool:
    """Whether the open file ``handle`` is still the file at ``path`` (not renamed away or removed)."""
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False


class DamagedCheckpointError(ValueError):
    """A checkpoint file that exists but cannot be read (cut short by a full disk, edited...)."""

    def __init__(self, path, error: BaseException):
        super().__init__(f"checkpoint: {path} cannot be read ({type(error).__name__}: {str(error)[:200]}); the "
                         "checkpoint is damaged: use another one (best/, checkpoint/), or retrain")


@contextlib.contextmanager
def loading(path):
    """Around a transformers load of ``path``: a missing file (OSError) or a refused value (ValueError)
    propagate as they are; anything else (safetensors' error for a file cut short, a config field of
    the wrong type) becomes a ``DamagedCheckpointError`` naming the path."""
    try:
        yield
    except (OSError, ValueError):
        raise
    except Exception as err:
        raise DamagedCheckpointError(path, err) from None


def read_config(path: str | os.PathLike) -> dict:
    """The checkpoint's prefkernels.json (see ``locate``), with a clear error when files are missing."""
    path = locate(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint: {path} is not a directory")
    missing = [name for name in REQUIRED_FILES if not (path / name).exists()]
    if missing:
        raise FileNotFoundError(f"checkpoint: {path} is missing {', '.join(missing)} (not a prefkernels checkpoint)")
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise DamagedCheckpointError(path / CONFIG_NAME, err) from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"checkpoint: {path / CONFIG_NAME} has format {found!r}, expected {FORMAT!r}")
    return config
