"""Content fingerprints of data files: what the tokenized cache and checkpoints are keyed by.

Size and mtime do not identify content: `cp -p` and `rsync -a` carry an edited file's old mtime
over. So every file is hashed (xxh3-128, which `datasets` depends on; blake2b without it), in
chunks. A plan of a large unchanged file should not read it all again, so a digest is remembered
under the file's stat identity: device, inode, size, mtime and ctime. ctime cannot be set from user
space: a write, a replacement (rename: a new inode too) and a restored mtime (utime) all move it,
so a remembered digest is only reused for a file nobody touched since. A digest taken less than
RACY_S after the file's last change is not remembered: a writer may still be at it, and a
filesystem with coarse timestamps could hide a second same-size write in the same tick (git's
"racy" rule).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path

CHUNK = 8 << 20
RACY_S = 2.0


def _hasher():
    try:
        import xxhash

        return "xxh3_128", xxhash.xxh3_128()
    except ImportError:
        return "blake2b", hashlib.blake2b(digest_size=16)


def _identity(st: os.stat_result) -> list:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def content_digest(path: str) -> str:
    """`ALGORITHM:HEX` of the file's bytes, read now (nothing remembered)."""
    name, h = _hasher()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb") as f:
        while n := f.readinto(buffer):
            h.update(view[:n])
    return f"{name}:{h.hexdigest()}"


def file_digest(path: str, cache: Path) -> str:
    """`ALGORITHM:HEX` of the file's bytes; remembered in `cache/digests/` (see the module docstring)."""
    before = os.stat(path)
    memo = Path(cache) / "digests" / f"{hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:24]}.json"
    try:
        saved = json.loads(memo.read_text())
        if saved["stat"] == _identity(before):
            return saved["digest"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = content_digest(path)
    changed_ns = max(before.st_mtime_ns, before.st_ctime_ns)
    if _identity(os.stat(path)) == _identity(before) and time.time_ns() - changed_ns > RACY_S * 1e9:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{socket.gethostname()}.{os.getpid()}")  # ranks and nodes may write it at once
        tmp.write_text(json.dumps({"path": str(path), "stat": _identity(before), "digest": digest}))
        tmp.replace(memo)
    return digest
