"""Models and datasets named by Hugging Face Hub id (`ORG/NAME`), resolved to a local snapshot once.

huggingface_hub downloads into the user's cache (HF_HOME / HF_HUB_CACHE), so a shared cache is
downloaded once per job and a node-local one once per node: a file lock per repo makes the
other processes wait and then find the snapshot. Resolution happens in the launcher (`sft run`,
`sft plan`, and `sft submit` on the login node) before any worker starts, never inside a
collective timeout. A branch or tag is pinned to its commit: the commit is recorded in the run
dir (hub.json) and handed to the workers (SFT_HUB_PINS), so every rank, a resume and a Slurm job
read the same files, from the cache, without asking the Hub again. HF_TOKEN is read by
huggingface_hub from the environment and never written anywhere by us.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

from launcher.errors import UserError

PINS_ENV = "SFT_HUB_PINS"
RECORD = "hub.json"
_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# What a model needs: config, tokenizer, chat template, safetensors weights. No pickles, no code.
MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]
PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class Resolved:
    kind: str  # model | dataset
    repo: str
    revision: str  # as asked: a branch, tag or commit
    commit: str
    path: str  # the snapshot directory in the HF cache


_resolved: Dict[str, Resolved] = {}  # this process's resolutions, "kind:repo@revision" -> Resolved


def is_hub_id(path: str) -> bool:
    """`ORG/NAME` that is not an existing local path."""
    return bool(_ID.match(path)) and not Path(path).expanduser().exists()


def _key(kind: str, repo: str, revision: str) -> str:
    return f"{kind}:{repo}@{revision}"


def use_pins(run_dir: Path) -> None:
    """Pin Hub ids to the commits a run dir recorded (a resume, a submitted job), unless this process
    already has pins (the launcher's, inherited by workers)."""
    record = Path(run_dir) / RECORD
    if PINS_ENV in os.environ or not record.is_file():
        return
    pins = {_key(r["kind"], r["repo"], r["revision"]): r["commit"] for r in json.loads(record.read_text())}
    os.environ[PINS_ENV] = json.dumps(pins)


def record(run_dir: Path) -> Optional[Path]:
    """Write what this process resolved to run_dir/hub.json (repo, revision asked, commit, snapshot)."""
    if not _resolved:
        return None
    path = Path(run_dir) / RECORD
    path.write_text(json.dumps([asdict(r) for r in _resolved.values()], indent=1) + "\n")
    return path


def resolved() -> List[Resolved]:
    return list(_resolved.values())


def _pin(kind: str, repo: str, revision: str) -> Optional[str]:
    return json.loads(os.environ.get(PINS_ENV, "{}")).get(_key(kind, repo, revision))


def _remember(r: Resolved) -> Resolved:
    _resolved[_key(r.kind, r.repo, r.revision)] = r
    pins = json.loads(os.environ.get(PINS_ENV, "{}"))
    pins[_key(r.kind, r.repo, r.revision)] = r.commit
    os.environ[PINS_ENV] = json.dumps(pins)  # inherited by the workers this process starts
    return r


def _lock(kind: str, repo: str):
    from filelock import FileLock
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    folder = Path(constants.HF_HUB_CACHE) / ".locks" / "sft-launcher"
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / f"{repo_folder_name(repo_id=repo, repo_type=kind)}.lock"))


def _cached(kind: str, repo: str, commit: str, patterns) -> Optional[str]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo, repo_type=kind, revision=commit, allow_patterns=patterns, local_files_only=True)
    except (LocalEntryNotFoundError, OSError):
        return None


def _what(kind: str, key: str) -> str:
    return f"{key}: {'model' if kind == 'model' else 'dataset'}"


def resolve(kind: str, repo: str, revision: Optional[str], key: str, trust_remote_code: bool = False) -> Resolved:
    """The local snapshot of Hub repo `repo` at `revision` (default main), downloading it if needed.
    `key`: the recipe key that named it, for error messages."""
    revision = revision or "main"
    done = _resolved.get(_key(kind, repo, revision))
    if done is not None:
        return done
    patterns = (MODEL_FILES + (["*.py"] if trust_remote_code else [])) if kind == "model" else None
    pinned = revision if _COMMIT.match(revision) else _pin(kind, repo, revision)
    if pinned:
        path = _cached(kind, repo, pinned, patterns)
        if path:
            return _remember(Resolved(kind, repo, revision, pinned, path))
    with _lock(kind, repo):
        return _remember(_download(kind, repo, revision, pinned, patterns, key))


def _download(kind: str, repo: str, revision: str, pinned: Optional[str], patterns, key: str) -> Resolved:
    import httpx2
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if pinned:  # another process may have downloaded it while this one waited for the lock
        path = _cached(kind, repo, pinned, patterns)
        if path:
            return Resolved(kind, repo, revision, pinned, path)
    site = f"{constants.ENDPOINT}/{'datasets/' if kind == 'dataset' else ''}{repo}"
    what = "model" if kind == "model" else "dataset"
    try:
        if kind == "model":
            info = HfApi().repo_info(repo, repo_type=kind, revision=pinned or revision)
            _check_weights(repo, revision, [s.rfilename for s in info.siblings or []], key)
        # By the name asked, so the cache records refs/<branch> for offline use (HF_HUB_OFFLINE=1).
        path = snapshot_download(repo, repo_type=kind, revision=pinned or revision, allow_patterns=patterns)
        commit = Path(path).name  # snapshots/<commit>
    except GatedRepoError:
        raise UserError(
            f"{key}: the {what} {repo} is gated: its files need an access token of an account that accepted its terms. "
            f"Accept them at {site}, then export HF_TOKEN=<a read token of that account> (or `hf auth login`) in the "
            "shell that runs sft; the token is read from the environment and never written to the run dir."
        ) from None
    except RevisionNotFoundError:
        field = "model.revision" if kind == "model" else f"{key.rsplit('.', 1)[0]}.revision"
        raise UserError(
            f"{field}: {revision!r} is not a branch, tag or commit of the {what} {repo} on the Hub. Use one that exists "
            f"(see {site}/tree/main; branches and tags are listed there), or leave it unset for main."
        ) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"{key}: {repo} is neither a local path nor a {what} repository on the Hugging Face Hub ({constants.ENDPOINT}). "
            f"Check the spelling (ORG/NAME, as on {constants.ENDPOINT}), or the path if you meant a local "
            f"{'directory' if kind == 'model' else 'file'}; if the repository is private, export HF_TOKEN with access to it."
        ) from None
    except (httpx2.ConnectError, httpx2.TimeoutException, OfflineModeIsEnabled, LocalEntryNotFoundError) as e:
        path = _cached(kind, repo, revision, patterns)  # offline (HF_HUB_OFFLINE=1): the cache's refs/<branch>
        if path:
            return Resolved(kind, repo, revision, Path(path).name, path)
        raise UserError(
            f"{key}: the {what} {repo} (revision {revision}) is not in the HF cache ({constants.HF_HUB_CACHE}) and the Hub "
            f"at {constants.ENDPOINT} cannot be reached ({type(e).__name__}). Run `sft plan` once on a machine with access "
            "(e.g. the login node) using the same HF_HOME, or unset HF_HUB_OFFLINE."
        ) from None
    return Resolved(kind, repo, revision, commit, path)


def _check_weights(repo: str, revision: str, files: List[str], key: str) -> None:
    if any(f.endswith(".safetensors") for f in files):
        return
    pickles = sorted(f for f in files if f.endswith(PICKLES))
    if pickles:
        raise UserError(
            f"{key}: the model {repo} (revision {revision}) has its weights only as pickle files ({', '.join(pickles[:4])}), "
            "and sft-launcher loads safetensors only (a pickle can run code when loaded). Use a revision or a copy of "
            "the model with .safetensors weights (many repos have a `refs/pr/N` conversion), or convert it yourself "
            "into a local directory and set model.path to it."
        )
    raise UserError(f"{key}: the Hub repository {repo} (revision {revision}) has no model weights (.safetensors files); "
                    f"it has: {', '.join(sorted(files)[:8]) or 'no files'}. Check that it is a model repository.")
