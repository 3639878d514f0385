"""Child processes of the local stack that must never outlive it."""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import subprocess
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Run in a child between fork and exec (`preexec_fn`): ask Linux to send it
    SIGTERM when the process that started it dies, so a crashed or SIGKILLed
    stack leaves no DynamoDB server or Lambda worker behind. Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def stop(process: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
