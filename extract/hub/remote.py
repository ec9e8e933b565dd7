"""The network side: `push` (export, then one commit with huggingface_hub), `pull` (resolve the revision to
its commit, download that commit, verify, import) and the local copy behind `cache_file=hf://...`.

A pulled cache lives at `<cache_dir>/hub/<owner>--<name>--<commit>.h5`; the downloaded folder stays in
huggingface_hub's own cache (HF_HUB_CACHE). A revision that is a commit whose local copy exists is used
without the network. Offline (HF_HUB_OFFLINE=1, or the hub's host unreachable within 3 seconds) only the
local copies and huggingface_hub's cache are used, and a revision found in neither fails at once with the
command that imports a copy of the folder obtained another way.
"""
from __future__ import annotations

import glob
import logging
import re
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from ..cache import read_settings
from ..errors import ExtractError
from ..sources import hub_offline, hub_reachable
from .export import export
from .rebuild import import_folder

log = logging.getLogger("extract.hub")
URI = "hf://"
REPO_TYPE = "dataset"
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
COMMIT = re.compile(r"[0-9a-f]{40}")
INFO_TIMEOUT = 10.0  # seconds for the one request that resolves a revision


@dataclass(frozen=True)
class Pulled:
    path: Path
    repo_id: str
    revision: str
    commit: str
    reused: bool

    def source(self) -> dict:
        """What summary.json records about the cache's origin."""
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit}


@dataclass(frozen=True)
class Pushed:
    repo_id: str
    commit: str
    tag: str | None
    identity_sha256: str
    model_name: str


def parse_ref(text: str) -> tuple[str, str]:
    """`owner/name[@revision]` (also with `hf://` in front) -> (repo id, revision; default main)."""
    ref = text[len(URI):] if text.startswith(URI) else text
    if ref.startswith("datasets/"):
        ref = ref[len("datasets/"):]
    repo_id, sep, revision = ref.partition("@")
    bad_repo = not REPO_ID.fullmatch(repo_id) or ".." in repo_id or "--" in repo_id  # the hub forbids both
    if bad_repo or (sep and not revision) or any(c.isspace() or c == "@" for c in revision):
        raise ExtractError(f"{text!r} is not a hub dataset reference; write <owner>/<name>@<revision> (a branch, tag "
                           "or commit), e.g. fedclip/pacs-vitb32@main")
    return repo_id, revision or "main"


def local_copy(cache_dir: str | Path, repo_id: str, commit: str) -> Path:
    return Path(cache_dir) / "hub" / f"{repo_id.replace('/', '--')}--{commit}.h5"


def local_copies(cache_dir: str | Path, repo_id: str) -> list[str]:
    """The commits of `repo_id` with a local copy under `cache_dir`."""
    prefix = f"{repo_id.replace('/', '--')}--"
    folder = Path(cache_dir) / "hub"
    found = sorted(folder.glob(f"{glob.escape(prefix)}*.h5")) if folder.is_dir() else []
    return [p.stem[len(prefix):] for p in found if COMMIT.fullmatch(p.stem[len(prefix):])]


def _offline() -> str | None:
    """Why the hub is not used (HF_HUB_OFFLINE=1, or it cannot be reached), or None."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1 is set"
    if not hub_reachable():
        return f"the hub ({urlparse(constants.ENDPOINT).hostname}) cannot be reached"
    return None


def _describe(e: Exception) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__


def _hub_error(e: Exception, repo_id: str, revision: str | None, doing: str) -> ExtractError:
    """One line for an error of huggingface_hub."""
    from huggingface_hub import errors

    if isinstance(e, errors.RevisionNotFoundError):
        return ExtractError(f"dataset repo {repo_id} has no revision {revision!r}; give a branch, tag or commit of it")
    if isinstance(e, errors.GatedRepoError):
        return ExtractError(f"dataset repo {repo_id} is gated: accept its conditions on the hub, then log in with "
                            "`hf auth login`")
    if isinstance(e, errors.RepositoryNotFoundError):
        return ExtractError(f"dataset repo {repo_id} does not exist on the hub, or is private and you are not logged "
                            "in with access to it (`hf auth login`)")
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status in (401, 403):
        return ExtractError(f"the hub refused to {doing} {repo_id} (HTTP {status}): log in with a token that may do "
                            "it (`hf auth login`)")
    return ExtractError(f"cannot {doing} {repo_id} ({_describe(e)})")


def _connection_error(e: Exception) -> bool:
    """The hub could not be reached (as opposed to an answer from it)."""
    from huggingface_hub import errors

    kinds = [errors.OfflineModeIsEnabled, ConnectionError, TimeoutError]
    try:  # huggingface_hub 1.x talks through httpx
        import httpx

        kinds += [httpx.ConnectError, httpx.TimeoutException]
    except ImportError:
        pass
    return isinstance(e, tuple(kinds))


# --- pull --------------------------------------------------------------------------------------------------

def _no_copy(repo_id: str, revision: str, why: str, cache_dir, target: Path | None) -> ExtractError:
    commits = local_copies(cache_dir, repo_id)
    have = (f"; local copies of this repo: {', '.join(f'{URI}{repo_id}@{c}' for c in commits)}"
            if commits else "")
    into = target or Path(cache_dir) / "hub" / f"{repo_id.replace('/', '--')}--{revision.replace('/', '--')}.h5"
    return ExtractError(f"cannot pull {repo_id}@{revision}: {why}, and the local Hugging Face cache has no copy of "
                        f"that revision{have}; with a copy of the repo's folder (from a colleague, or downloaded on a "
                        f"machine online), run: python -m extract.hub import /path/to/folder {into}")


def resolve(repo_id: str, revision: str, cache_dir, target: Path | None = None) -> tuple[str, str | None]:
    """(the commit `revision` names, why the hub is not used or None). Online one request asks the hub;
    offline the local Hugging Face cache's refs answer."""
    from huggingface_hub import HfApi, snapshot_download

    why = _offline()
    if COMMIT.fullmatch(revision):
        return revision, why
    if why is None:
        try:
            info = HfApi().repo_info(repo_id, repo_type=REPO_TYPE, revision=revision, timeout=INFO_TIMEOUT)
            return str(info.sha), None
        except Exception as e:  # noqa: BLE001  (huggingface_hub and httpx raise many kinds)
            if not _connection_error(e):
                raise _hub_error(e, repo_id, revision, "read") from None
            why = f"the hub cannot be reached ({_describe(e)})"
    try:
        with hub_offline():
            folder = snapshot_download(repo_id, repo_type=REPO_TYPE, revision=revision, local_files_only=True)
    except Exception:  # noqa: BLE001  (not in the local cache, whatever the kind)
        raise _no_copy(repo_id, revision, why, cache_dir, target) from None
    return Path(folder).name, why


def download(repo_id: str, revision: str, commit: str, why: str | None, cache_dir, target: Path) -> Path:
    """The folder of `commit` in huggingface_hub's cache (downloaded unless offline), checked against the
    hub's own checksums where the installed huggingface_hub can."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        with hub_offline() if why else nullcontext():
            folder = Path(snapshot_download(repo_id, repo_type=REPO_TYPE, revision=commit, local_files_only=bool(why)))
    except Exception as e:  # noqa: BLE001
        if why or _connection_error(e) or isinstance(e, FileNotFoundError):
            raise _no_copy(repo_id, revision, why or f"the download failed ({_describe(e)})", cache_dir,
                           target) from None
        raise _hub_error(e, repo_id, revision, "download") from None
    if why is None and hasattr(HfApi, "verify_repo_checksums"):
        try:
            result = HfApi().verify_repo_checksums(repo_id, repo_type=REPO_TYPE, revision=commit,
                                                   cache_dir=folder.parents[2])
        except Exception as e:  # noqa: BLE001  (the card's own sha256 are still checked by import)
            log.warning("could not compare %s with the hub's checksums (%s); the card's sha256 are checked",
                        folder, _describe(e))
        else:
            _hub_checksums(result, folder)
    return folder


def _hub_checksums(result, folder: Path) -> None:
    if result.mismatches:
        bad = result.mismatches[0]
        raise ExtractError(f"{folder / bad['path']} does not match the hub's {bad['algorithm']} checksum for it: the "
                           "download was changed or damaged; delete it from the Hugging Face cache (hf cache rm) and "
                           "pull again")
    if result.missing_paths:
        raise ExtractError(f"{folder / result.missing_paths[0]} is missing (the commit has it): the download is "
                           "incomplete; pull again")
    if result.extra_paths:
        raise ExtractError(f"{folder / result.extra_paths[0]} is not part of the commit: the local copy was changed; "
                           "delete it from the Hugging Face cache (hf cache rm) and pull again")
    log.info("%d files match the hub's checksums", result.checked_count)


def _reusable(path: Path) -> bool:
    settings = read_settings(path) if path.is_file() and not path.is_symlink() else None
    return bool(settings and settings.get("complete"))


def pull(ref: str, cache_dir: str | Path = "cache", cache_file: str | Path | None = None,
         overwrite: bool = False) -> Pulled:
    """Pull `owner/name[@revision]` into a verified local cache (see the module docstring)."""
    repo_id, revision = parse_ref(ref)
    target = Path(cache_file) if cache_file else None
    if COMMIT.fullmatch(revision) and target is None and not overwrite and \
            _reusable(local_copy(cache_dir, repo_id, revision)):
        path = local_copy(cache_dir, repo_id, revision)
        log.info("%s@%s: using the local copy %s", repo_id, revision, path)
        return Pulled(path, repo_id, revision, revision, True)
    commit, why = resolve(repo_id, revision, cache_dir, target)
    path = target or local_copy(cache_dir, repo_id, commit)
    if commit != revision:
        log.info("%s@%s is commit %s", repo_id, revision, commit)
    if target is None and _reusable(path) and not overwrite:
        log.info("%s@%s: using the local copy %s", repo_id, revision, path)
        return Pulled(path, repo_id, revision, commit, True)
    if why:
        log.info("%s: using the local Hugging Face cache", why)
    folder = download(repo_id, revision, commit, why, cache_dir, path)
    imported = import_folder(folder, path, overwrite=overwrite)
    return Pulled(path, repo_id, revision, commit, imported.reused)


@lru_cache(maxsize=16)
def _local_cache(uri: str, cache_dir: str) -> Pulled:
    return pull(uri, cache_dir)


def local_cache(uri: str, cache_dir: str | Path) -> Pulled:
    """`cache_file=hf://<repo_id>@<revision>`: the verified local copy of that revision, pulled on first use
    (once per process: the jobs of a sweep share it)."""
    return _local_cache(uri, str(cache_dir))


# --- push --------------------------------------------------------------------------------------------------

def push(cache: str | Path, repo_id: str, *, private: bool = False, tag: str | None = None,
         license: str | None = None) -> Pushed:
    """Export `cache` and upload it to the dataset repo `repo_id` in one commit (files of an earlier push
    that this one does not write are deleted in that commit); tag the commit if asked."""
    from huggingface_hub import HfApi

    cache = Path(cache)
    repo, _ = parse_ref(repo_id)
    if "@" in repo_id:
        raise ExtractError(f"push takes a repo id without a revision ({repo}), not {repo_id!r}; tag the commit with "
                           "tag=<name>")
    why = _offline()
    if why:
        raise ExtractError(f"cannot push to {repo}: {why}; export the folder instead and upload it from a machine "
                           f"online: python -m extract.hub export {cache} /path/to/folder")
    settings = read_settings(cache) if cache.is_file() else None
    api = HfApi()
    folder_parent = cache.parent if cache.parent.is_dir() else Path(".")
    with tempfile.TemporaryDirectory(prefix=".hub-push-", dir=folder_parent) as tmp:
        exported = export(cache, Path(tmp) / "export", repo_id=repo, license=license)
        try:
            url = api.create_repo(repo, repo_type=REPO_TYPE, private=private, exist_ok=True)
            if private and not api.repo_info(repo, repo_type=REPO_TYPE).private:
                raise ExtractError(f"dataset repo {repo} exists and is public; private=true would not make it "
                                   f"private: make it private on the hub first ({url}), or push to a new repo")
            info = api.upload_folder(repo_id=repo, repo_type=REPO_TYPE, folder_path=str(Path(tmp) / "export"),
                                     commit_message=f"fedclip cache, identity {exported.identity_sha256[:12]}",
                                     delete_patterns="*")
            commit = str(info.oid)
            if tag:
                api.create_tag(repo, tag=tag, revision=commit, repo_type=REPO_TYPE)
        except ExtractError:
            raise
        except Exception as e:  # noqa: BLE001
            if _connection_error(e):
                raise ExtractError(f"cannot push to {repo}: the hub cannot be reached ({_describe(e)}); retry, or "
                                   f"export the folder: python -m extract.hub export {cache} /path/to/folder") from None
            raise _hub_error(e, repo, tag, "push to") from None
    model = str((settings or {}).get("model_name", ""))
    return Pushed(repo, commit, tag, exported.identity_sha256, model)
