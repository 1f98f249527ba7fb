"""Resolve a conversion source: a local folder, or a Hub repo id (with revision) through the HF cache."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import SourceError

HUB_PATTERNS = ['*.json', '*.safetensors', '*.model', '*.txt', '*.py', 'pytorch_model*.bin', '*.tiktoken']


@dataclass
class Source:
    path: Path
    name: str
    model_id: str
    revision: str | None  # commit hash for Hub sources
    local: bool

    def info(self) -> dict:
        return {'model_id': self.model_id, 'revision': self.revision, 'local': self.local}


def resolve_source(source: str, revision: str | None = None) -> Source:
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SourceError(f"{source} is a file; give the checkpoint's folder")
        if revision is not None:
            raise SourceError("--revision applies to Hub ids, not to local folders")
        return Source(path.absolute(), str(source), str(path.absolute()), None, True)
    if source.count('/') > 1 or source.startswith(('.', '/', '~')):
        raise SourceError(f"{source}: no such folder")
    return _from_hub(source, revision)


def _from_hub(repo_id: str, revision: str | None) -> Source:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    try:
        snap = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS)
    except HFValidationError:
        raise SourceError(f"{repo_id}: neither a local folder nor a valid Hub repo id") from None
    except RevisionNotFoundError:
        raise SourceError(f"{repo_id}: revision {revision!r} not found on the Hub") from None
    except GatedRepoError:
        raise SourceError(f"{repo_id}: gated repo; accept its terms and log in (huggingface-cli login)") from None
    except RepositoryNotFoundError:
        raise SourceError(f"{repo_id}: no such Hub repo (or it is private: log in)") from None
    except LocalEntryNotFoundError:
        offline = os.environ.get('HF_HUB_OFFLINE', '0') not in ('0', '', 'false', 'False')
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        rev = f" at revision {revision!r}" if revision else ""
        raise SourceError(f"{repo_id}{rev}: not in the local Hugging Face cache and {why}") from None
    except OSError as e:  # network errors surface as OSError subclasses
        raise SourceError(f"{repo_id}: download failed: {e}") from None
    snap = Path(snap)
    return Source(snap, repo_id, repo_id, snap.name, False)
