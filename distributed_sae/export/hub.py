"""SAEs from folders and the Hugging Face Hub: `SAE.load`, and pushing export folders.

`load_pretrained` takes a local SAE folder (cfg.json + sae_weights.safetensors), a bank folder
(one such folder per member), or a Hub repo id `org/name` holding either layout, which is
fetched with `huggingface_hub.snapshot_download`: the Hub cache (HF_HOME / HF_HUB_CACHE) is used
and HF_HUB_OFFLINE=1 reads from it only. Only the chosen member's files are downloaded.

`push_to_hub` uploads a folder with `huggingface_hub.HfApi`. The token comes from the argument,
else HF_TOKEN or the stored `huggingface-cli login`; it is passed to the API calls only, never
logged or written anywhere.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from distributed_sae.sae.base import SparseAutoencoder
from distributed_sae.sae.serialization import CFG_FILE, WEIGHTS_FILE, load_sae

log = logging.getLogger(__name__)

# The Hub's repo id rule: namespace/name, letters, digits, '-', '_', '.'.
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
DEFAULT_COMMIT_MESSAGE = "Upload SAEs trained with distributed-sae"


def _hub() -> Any:
    try:
        import huggingface_hub
        # Submodules are lazy attributes of the package: import the ones used here.
        import huggingface_hub.constants
        import huggingface_hub.errors
    except ImportError as exc:
        raise ImportError("the Hugging Face Hub needs huggingface_hub: "
                          "pip install 'distributed-sae[hub]'") from exc
    return huggingface_hub


def bank_members(folder: str | Path) -> list[str]:
    """Names of the SAE sub-folders (those with a cfg.json) of a bank folder, sorted."""
    folder = Path(folder)
    return sorted(p.parent.name for p in folder.glob(f"*/{CFG_FILE}"))


def _pick(folder: Path, member: str | None, source: str) -> Path:
    """The SAE folder of `member` inside `folder` (a single SAE or a bank) from `source`."""
    if member is not None:
        if not re.fullmatch(r"[\w.-]+", member) or member in (".", ".."):
            raise ValueError(f"member={member!r} is not a folder name: pass one of "
                             f"{bank_members(folder)}")
        if (folder / member / CFG_FILE).is_file():
            return folder / member
        raise FileNotFoundError(f"{source} has no SAE member {member!r}; its members are "
                                f"{bank_members(folder) or 'none (it is a single SAE)'}")
    if (folder / CFG_FILE).is_file():
        return folder
    members = bank_members(folder)
    if len(members) == 1:
        return folder / members[0]
    if not members:
        raise FileNotFoundError(f"{source} holds no SAE: expected {CFG_FILE} + {WEIGHTS_FILE}, "
                                "or one sub-folder with them per member")
    raise ValueError(f"{source} is a bank of {len(members)} SAEs: pass member=, one of {members}")


def _snapshot(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    """snapshot_download of the files matching `patterns`, with errors that say what to do."""
    hub = _hub()
    offline = bool(hub.constants.is_offline_mode())
    try:
        path = hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                     local_files_only=offline)
    except hub.errors.LocalEntryNotFoundError as exc:
        why = ("HF_HUB_OFFLINE=1 forbids downloading it: unset HF_HUB_OFFLINE or download it once "
               "online") if offline else f"the Hub cannot be reached ({exc})"
        raise FileNotFoundError(f"Hub repo {repo_id!r} (revision {revision or 'main'}) is not in "
                                f"the Hub cache {hub.constants.HF_HUB_CACHE} and {why}") from exc
    except hub.errors.RevisionNotFoundError as exc:
        raise ValueError(f"Hub repo {repo_id!r} has no revision {revision!r}: pass an existing "
                         "branch, tag or commit") from exc
    except hub.errors.RepositoryNotFoundError as exc:
        raise FileNotFoundError(f"no Hub repo {repo_id!r} (or it is private: set HF_TOKEN)"
                                ) from exc
    return Path(path)


def resolve_sae_folder(path_or_repo: str | Path, member: str | None = None,
                       revision: str | None = None) -> Path:
    """The local folder of one SAE: `path_or_repo` itself, its sub-folder `member`, or the same
    inside the Hub repo `path_or_repo` at `revision` (downloaded into the Hub cache)."""
    local = Path(path_or_repo).expanduser()
    if local.exists():
        if not local.is_dir():
            raise NotADirectoryError(f"{local} is a file: pass the SAE folder that holds "
                                     f"{CFG_FILE}, or a bank folder")
        if revision is not None:
            raise ValueError(f"revision={revision!r} only applies to Hub repos, and {local} is a "
                             "local folder: drop revision")
        return _pick(local, member, str(local))
    repo_id = str(path_or_repo)
    if not REPO_ID.match(repo_id):
        raise FileNotFoundError(f"{repo_id!r} is neither an existing folder nor a Hub repo id "
                                "(org/name)")
    source = f"Hub repo {repo_id}" + (f"@{revision}" if revision else "")
    # Config files first (small): they tell a single SAE from a bank and list the members.
    cfgs = _snapshot(repo_id, revision, [CFG_FILE, f"*/{CFG_FILE}"])
    chosen = _pick(cfgs, member, source)
    rel = chosen.relative_to(cfgs).as_posix()
    prefix = "" if rel == "." else rel + "/"
    folder = _snapshot(repo_id, revision, [prefix + WEIGHTS_FILE, prefix + CFG_FILE,
                                           prefix + "sparsity.safetensors"]) / rel
    log.info("loading %s from %s", rel if prefix else repo_id, source)
    return folder


def load_pretrained(path_or_repo: str | Path, member: str | None = None,
                    revision: str | None = None) -> SparseAutoencoder:
    """Load one SAE for inference (eval mode) from a folder, a bank folder or a Hub repo.

    The SAE's cfg.json (SAELens keys plus `metadata` with model, hook, corpus) is attached as
    `sae.cfg_dict`. Files whose cfg.json and tensors disagree are refused with the mismatch named.
    """
    sae, cfg = load_sae(resolve_sae_folder(path_or_repo, member, revision))
    sae.cfg_dict = cfg
    return sae


def push_to_hub(folder: str | Path, repo_id: str, *, revision: str | None = None,
                private: bool = False, token: str | None = None,
                commit_message: str = DEFAULT_COMMIT_MESSAGE) -> str:
    """Upload the contents of `folder` to the model repo `repo_id` (created if missing) on the
    branch `revision` (created from main if missing; None = main). Returns the commit URL."""
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        raise FileNotFoundError(f"nothing to push: {folder} is not a folder with files; run "
                                "dsae-export first")
    if not REPO_ID.match(repo_id):
        raise ValueError(f"repo_id={repo_id!r} is not a Hub repo id: use 'org/name'")
    hub = _hub()
    token = token or hub.get_token()  # argument, else HF_TOKEN, else the stored login
    if not token:
        raise PermissionError("pushing to the Hub needs a token: set HF_TOKEN (a write token "
                              "from huggingface.co/settings/tokens) or pass token=")
    api = hub.HfApi()
    files = [p for p in folder.rglob("*") if p.is_file()]
    # A bar over the push's requests (stderr); huggingface_hub draws the upload's bytes itself.
    with tqdm(total=3 if revision else 2, desc=f"push {repo_id}", unit="step") as bar:
        bar.set_postfix_str("create repo")
        api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
        bar.update(1)
        if revision:
            bar.set_postfix_str(f"create branch {revision}")
            api.create_branch(repo_id, branch=revision, token=token, repo_type="model",
                              exist_ok=True)
            bar.update(1)
        bar.set_postfix_str(f"upload {len(files)} files, "
                            f"{sum(p.stat().st_size for p in files) / 1e6:.1f} MB")
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), token=token,
                                   repo_type="model", revision=revision,
                                   commit_message=commit_message)
        bar.update(1)
    url = str(getattr(commit, "commit_url", commit))
    log.info("pushed %s to Hub repo %s (revision %s): %s", folder, repo_id, revision or "main", url)
    return url
