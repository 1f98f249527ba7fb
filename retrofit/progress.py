"""Progress bars: ours (tqdm) follow `progress`/`-q`; transformers' own loading and writing bars follow them too."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def transformers_bars(enabled: bool):
    """transformers' progress bars on or off inside the block, restored after."""
    from transformers.utils import logging
    was = logging.is_progress_bar_enabled()
    (logging.enable_progress_bar if enabled else logging.disable_progress_bar)()
    try:
        yield
    finally:
        (logging.enable_progress_bar if was else logging.disable_progress_bar)()
