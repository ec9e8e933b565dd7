"""ExtractError: one line for the user, no traceback. `os_errors` turns OSError into one."""
from __future__ import annotations

import errno
from contextlib import contextmanager

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class ExtractError(Exception):
    """Bad input or environment: reported to the user as one line, without a traceback."""


def describe_os_error(e: OSError, what: str) -> str:
    name = getattr(e, "filename", None)
    where = f" ({name})" if name and str(name) not in what else ""
    reason = e.strerror or str(e) or type(e).__name__
    if e.errno in DISK_FULL:
        return f"disk full: cannot {what}{where}: {reason}; free some space (or choose another folder) and re-run"
    return f"cannot {what}{where}: {reason}"


@contextmanager
def os_errors(what: str):
    """Re-raise an OSError inside the block as a one-line ExtractError saying what could not be done."""
    try:
        yield
    except OSError as e:
        raise ExtractError(describe_os_error(e, what)) from None
