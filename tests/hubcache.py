"""Place a folder into a Hugging Face cache exactly as `snapshot_download` leaves a download:
blobs named by content hash, snapshots/<commit>/<file> symlinks to them, refs/<branch> holding the commit."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def put_in_hf_cache(folder: Path, cache_dir: Path, repo_id: str, branch: str = 'main',
                    commit: str | None = None) -> str:
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    files = sorted(p for p in Path(folder).iterdir() if p.is_file())
    if commit is None:
        h = hashlib.sha1()
        for p in files:
            h.update(p.name.encode()), h.update(p.read_bytes())
        commit = h.hexdigest()
    (repo / 'blobs').mkdir(parents=True, exist_ok=True)
    snap = repo / 'snapshots' / commit
    snap.mkdir(parents=True, exist_ok=True)
    for p in files:
        data = p.read_bytes()
        blob = repo / 'blobs' / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / p.name
        if link.exists() or link.is_symlink():
            link.unlink()
        os.symlink(os.path.relpath(blob, snap), link)
    (repo / 'refs').mkdir(exist_ok=True)
    (repo / 'refs' / branch).write_text(commit)
    return commit
