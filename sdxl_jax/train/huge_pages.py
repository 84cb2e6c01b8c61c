"""Transparent huge pages for the host's malloc: a CPU trainer's speedup that must be set at process start.

    reexec_with_huge_pages()   # in train.py when config.malloc_huge_pages: execve's itself at most once

XLA:CPU allocates a step's temporary buffers afresh every step, and glibc hands blocks that large
back to the kernel when they are freed, so each step faults them in again in 4 KiB pages. glibc's
tunable `glibc.malloc.hugetlb=1` makes malloc madvise its memory for transparent huge pages (fewer
faults and fewer TLB misses; measured effect: README, "Hardware notes"). glibc reads tunables only when
a process starts, so the trainer re-executes itself (same pid, same arguments) with the tunable added
to `GLIBC_TUNABLES`.

Nothing happens where it cannot help: off Linux, off glibc, when the kernel's THP mode is `never`, or
when `GLIBC_TUNABLES` already names the tunable (which is also what stops a second re-exec). glibc
older than 2.35 ignores the unknown tunable.
"""

import os
import platform
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise" or "never"), None where unknown."""
    try:
        text = THP_MODE.read_text()
    except OSError:
        return None
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else None


def huge_pages_environment(environ: dict[str, str]) -> dict[str, str] | None:
    """`environ` with `glibc.malloc.hugetlb=1` appended to GLIBC_TUNABLES; None when already there or
    when this host cannot use it (not Linux with glibc, THP off or unknown)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if TUNABLE in tunables or sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    if thp_mode() not in ("always", "madvise"):
        return None
    return dict(environ, GLIBC_TUNABLES=":".join(filter(None, [tunables, f"{TUNABLE}=1"])))


def reexec_with_huge_pages() -> None:
    """Replace this process by the same command with huge-page malloc (see the module docstring);
    returns only when nothing is to be done. Call it before any work: nothing in this process survives."""
    environ = huge_pages_environment(dict(os.environ))
    if environ is None:
        return
    print(
        f"restarting with GLIBC_TUNABLES={environ['GLIBC_TUNABLES']} (malloc on transparent huge pages; "
        "config.malloc_huge_pages)",
        flush=True,
    )
    sys.stderr.flush()  # exec discards whatever Python still buffers
    os.execve(sys.executable, sys.orig_argv, environ)
