"""Whether a checkpoint can be trusted, for launcher/checkpoint.py's commit, `sft run`'s resume and `sft export`.

Two records say so: the `COMPLETE` marker, written last when every rank has finished its shards
(a step dir without it was interrupted and is never read; `complete_checkpoints` lists a run's
committed ones by step number), and `MANIFEST.json`, written just before it with the size and
content digest of every file, so that a checkpoint later cut short or changed (a copy, bit rot)
is found (`damage`) instead of crashing a resume or exporting wrong weights. A damaged checkpoint
of the run itself is renamed out of the way (`set_aside`, kept, never deleted); `previous_intact`
names the one to fall back to. This module imports nothing from checkpoint.py (checkpoint.py
imports it).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_of(ckpt: Path) -> int:
    """The step number of a `step-NNNNNN` checkpoint dir."""
    return int(_STEP_DIR.match(Path(ckpt).name).group(1))


def complete_checkpoints(root: Path) -> list:
    """This run's complete checkpoints, oldest first, ordered by step number (not as strings)."""
    found = []
    for p in root.iterdir() if root.is_dir() else []:
        m = _STEP_DIR.match(p.name)
        if m and (p / COMPLETE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


MANIFEST = "MANIFEST.json"


def write_manifest(ckpt: Path) -> None:
    """Size and content digest of every file, recorded before COMPLETE: a copy cut short or bit rot is
    found on resume and export (`damage`), not by a crash or silently wrong weights."""
    from launcher.data.digest import content_digest

    files = sorted(p for p in ckpt.rglob("*") if p.is_file())
    manifest = {str(p.relative_to(ckpt)): {"size": p.stat().st_size, "digest": content_digest(str(p))} for p in files}
    (ckpt / MANIFEST).write_text(json.dumps(manifest, indent=0))


def damage(ckpt: Path) -> list:
    """What no longer matches the checkpoint's manifest (missing, resized or changed files); [] when all
    match or the checkpoint predates manifests."""
    from launcher.data.digest import content_digest

    path = Path(ckpt) / MANIFEST
    if not path.is_file():
        return []
    found = []
    for name, want in json.loads(path.read_text()).items():
        f = Path(ckpt) / name
        if not f.is_file():
            found.append(f"{name} is missing")
        elif f.stat().st_size != want["size"]:
            found.append(f"{name} is {f.stat().st_size} bytes, {want['size']} when saved")
        elif content_digest(str(f)) != want["digest"]:
            found.append(f"{name} has changed since it was saved (its checksum differs)")
    return found


def previous_intact(ckpt: Path) -> Optional[Path]:
    """The newest complete checkpoint before `ckpt` in its run whose files match their manifest."""
    older = [p for p in complete_checkpoints(Path(ckpt).parent) if step_of(p) < step_of(ckpt)]
    return next((p for p in reversed(older) if not damage(p)), None)


def set_aside(ckpt: Path) -> Path:
    """Rename a damaged checkpoint out of the way (kept, never deleted) and point `latest` at the newest
    complete one left."""
    root = Path(ckpt).parent
    dest = root / f"damaged-{Path(ckpt).name}"
    Path(ckpt).rename(dest)
    done = complete_checkpoints(root)
    if done:
        pointer = root / ".latest.tmp"
        pointer.write_text(done[-1].name + "\n")
        os.replace(pointer, root / "latest")
    elif (root / "latest").exists():
        (root / "latest").unlink()
    return dest
