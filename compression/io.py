"""Atomic writes, orphan clean-up and verified reads of the files this project writes.

Writes.  Every artefact (plans, checkpoints, token caches, exports) is written to a temporary
sibling of its destination, fsynced, then renamed onto it (``os.replace``), so an interrupted
run leaves the previous file or nothing -- never a truncated one.  The temporary name is

    .<destination name>.<host>.<pid>.<8 hex>.tmp          (a file, or a folder for exports)

in the destination's folder.  A writer that is killed (SIGKILL, OOM, power loss) cannot remove
its temporary, so every write first removes the orphans *of the same destination*: entries of
that exact pattern whose writer ran on this host and whose process no longer exists.  A
temporary of a live writer (same or another process), of another host (a shared file system
cannot see its processes), or of another destination is never touched.

Modes.  Files are created ``0o666 & ~umask`` and folders ``0o777 & ~umask`` -- what plain
``open()`` / ``mkdir`` give (0644 / 0755 under the usual umask 022) -- not the 0600 / 0700 of
``tempfile.mkstemp`` / ``mkdtemp``: a checkpoint or export is an ordinary file others may read.

Reads.  :func:`sha256_file` checksums a file; :func:`load_safetensors` reads a safetensors file
(tensors only, no pickle) after an optional checksum check, turning a truncated or corrupted
file into one error that names it.  :func:`safe_torch_load` is the only way this project reads
a ``torch.save`` file: ``weights_only=True`` (tensors and plain containers; a pickle that would
construct anything else, e.g. call ``os.system``, is refused before it runs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import secrets
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

log = logging.getLogger(__name__)

_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
_TAIL = re.compile(r"(\d+)\.[0-9a-f]{8}\.tmp")


# -- temporaries --------------------------------------------------------------------------------------
def temp_sibling(path: str | os.PathLike, directory: bool = False) -> Path:
    """Create (exclusively) and return an empty temporary file or folder beside ``path``.

    Named ``.<name>.<host>.<pid>.<8 hex>.tmp`` (see the module docstring), with ordinary modes.
    """
    path = Path(path)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            if directory:
                os.mkdir(tmp, 0o777)  # the umask applies, as for any mkdir
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"could not create a temporary beside {path}")


def remove_orphans(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of ``path`` left by killed writers on this host; returns them.

    Only names ``.<name>.<this host>.<pid>.<8 hex>.tmp`` whose ``pid`` is no running process.
    """
    path = Path(path)
    prefix = f".{path.name}.{_HOST}."
    removed = []
    if not path.parent.is_dir():
        return removed
    for entry in path.parent.iterdir():
        match = _TAIL.fullmatch(entry.name[len(prefix):]) if entry.name.startswith(prefix) else None
        if match is None or _process_alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
        log.info("removed %s, left by an interrupted write of %s", entry.name, path)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def ordinary_mode(directory: bool = False) -> int:
    """``0o666 & ~umask`` (files) or ``0o777 & ~umask`` (folders): what ``open`` / ``mkdir`` create."""
    try:  # Linux exposes the umask without changing it (os.umask would, process-wide)
        with open("/proc/self/status") as f:
            umask = next(int(ln.split()[1], 8) for ln in f if ln.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def normalize_modes(folder: str | os.PathLike) -> None:
    """Give ``folder`` and everything in it :func:`ordinary_mode` (writers such as safetensors make 0600)."""
    file_mode, dir_mode = ordinary_mode(), ordinary_mode(directory=True)
    folder = Path(folder)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod(dir_mode if path.is_dir() else file_mode)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside ``folder`` durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- atomic writes ------------------------------------------------------------------------------------
def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """``write(f)`` into a temporary sibling of ``path``, fsync, rename onto ``path``; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


# -- verified reads -----------------------------------------------------------------------------------
def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; a missing, non-text or malformed file raises naming it (and the position)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a UTF-8 text file (byte {err.start}); expected JSON") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno} "
                         f"(character {err.pos})") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of the file's bytes (read in 4 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: str | os.PathLike, expected: str, recorded_in: str | os.PathLike) -> None:
    """Raise naming ``path`` when its SHA-256 is not ``expected`` (as recorded in ``recorded_in``)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} is missing (listed with its checksum in {recorded_in})")
    actual = sha256_file(path)
    if actual != expected:
        raise ValueError(
            f"checksum mismatch: {path} has sha256 {actual[:16]}..., {recorded_in} records {expected[:16]}...; "
            "the file was modified, truncated or corrupted after it was written -- restore or re-export it"
        )


def safetensors_error(path: str | os.PathLike, err: BaseException) -> ValueError:
    """The one message for a file that is not a readable safetensors file."""
    return ValueError(
        f"{path} is not a readable safetensors file ({err}); it is truncated, corrupted or of another "
        "format -- restore it or write it again"
    )


def load_safetensors(path: str | os.PathLike, sha256: str | None = None, recorded_in: str | os.PathLike = "",
                     device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file ``path`` (no pickle involved).

    With ``sha256`` the file's checksum is checked first (``recorded_in`` names where it was
    recorded, for the message).  A corrupted file raises ``ValueError`` naming it.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (expected a .safetensors file)")
    if sha256 is not None:
        check_sha256(path, sha256, recorded_in or "its metadata")
    try:
        return load_file(str(path), device=device)
    except SafetensorError as err:
        raise safetensors_error(path, err) from None


def safe_torch_load(path: str | os.PathLike, mmap: bool = False, map_location: Any = "cpu") -> Any:
    """``torch.load`` that never runs code from the file (``weights_only=True``), errors naming the file.

    Refuses (``ValueError``) any pickle that needs more than tensors and plain containers --
    such a pickle can run arbitrary code when unpickled, and checkpoints written by this project
    never contain one -- and says so instead of torch's advice to retry unsafely.  ``mmap`` maps
    the tensors instead of reading them (a legacy non-zip file is read without it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (or is not a file)")
    try:
        try:
            return torch.load(path, map_location=map_location, mmap=mmap, weights_only=True)
        except RuntimeError as err:
            if not (mmap and "mmap" in str(err)):
                raise
            return torch.load(path, map_location=map_location, weights_only=True)  # a legacy (non-zip) file
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"refusing to load {path}: it holds objects other than tensors and plain containers "
            f"({_unpickler_detail(err)}); unpickling those can run arbitrary code, and checkpoints written "
            "by this project never contain them. Do not load this file unless you re-save its tensors "
            "from a trusted source."
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot read checkpoint {path} ({detail}); it is truncated, corrupted or of another "
                         "format") from None


def _unpickler_detail(err: BaseException) -> str:
    """What torch's weights-only unpickler refused (not its advice to retry unsafely)."""
    text = str(err)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it would call {found.group(1)}"
    found = re.search(r"Unsupported operand \d+|Unsupported class [\w.]+", text)
    return found.group(0) if found else "unsupported pickle content"
