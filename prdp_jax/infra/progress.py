"""tqdm progress bars that can be switched off (CI logs, non-zero processes)."""
from __future__ import annotations

import sys
from typing import Iterable

from tqdm.auto import tqdm


def progress(iterable: Iterable, desc: str = "", enabled: bool = True, **kwargs):
    """Wraps `iterable` in a tqdm bar on stderr when enabled; otherwise returns it unchanged."""
    if not enabled:
        return iterable
    return tqdm(iterable, desc=desc, file=sys.stderr, dynamic_ncols=True, **kwargs)
