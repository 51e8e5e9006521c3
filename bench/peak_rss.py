"""Peak resident memory of this process, for load measurements made in a fresh child process.

Linux only: VmHWM is per address space (``ru_maxrss`` would carry the parent's peak over exec), and
writing 5 to ``clear_refs`` resets it to the current RSS, so the peak of one load can be isolated.
"""
from __future__ import annotations


def reset_peak() -> None:
    """Make the current RSS the new peak (no-op where /proc/self/clear_refs is not writable)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss() -> int:
    """Bytes of this process's peak RSS since start or since :func:`reset_peak`."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("VmHWM not found in /proc/self/status")
