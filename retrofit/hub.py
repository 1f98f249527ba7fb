"""Upload a converted folder to the Hub."""

from __future__ import annotations

from pathlib import Path

from .errors import UploadError


def push_folder(folder: Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, token: str | None = None, api=None) -> str:
    """Create the repo (if needed) and the branch `revision`, upload the folder in one commit; return its URL.
    The local folder is never modified. `api` replaces `huggingface_hub.HfApi()` (tests)."""
    if api is None:
        from huggingface_hub import HfApi
        api = HfApi(token=token)
    message = commit_message or f"Upload {Path(folder).name} (hola-retrofit)"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                 commit_message=message)
    except Exception as e:  # HTTP, auth, network: one clear line, local output stays as it is
        raise UploadError(f"upload to {repo_id} failed: {type(e).__name__}: {e}") from None
    return str(getattr(info, 'commit_url', None) or f"https://huggingface.co/{repo_id}")
