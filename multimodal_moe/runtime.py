"""Process-level state of a training process: its random generators, the autocast dtype its
precision setting means on its device, SIGTERM caught as a flag, and (below) glibc's allocator
settings for fast CPU training.

glibc hands every allocation above its mmap threshold (128 KiB, rising to at most 32 MiB)
fresh pages from the kernel and returns them on free, so each training step page-faults on
all of its large activations and gradients again. A MoE layer holds E times the dense FFN's
weight gradients and so pays that cost many times over: measured here at T=4096, d=512,
top-2 of 32 experts, about 81,000 minor page faults per forward+backward against 25,000 for
the dense FFN, and 0 for both with :func:`keep_freed_memory`; the MoE step went from 497 to
429 ms while the dense FFN's did not change measurably. This is the same reason CPU
performance guides recommend jemalloc or tcmalloc; this module gets it from glibc itself, with
no extra library and no environment variable.
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
import random
import signal
import threading
from typing import Any

import torch

__all__ = ["autocast_dtype", "keep_freed_memory", "rng_state", "set_rng_state", "sigterm_flag"]


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast when asked for, or on ``auto`` on a GPU that supports it; None = fp32."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def rng_state(device: torch.device) -> dict[str, Any]:
    """The generators this process draws from: the CPU's, Python's and its own GPU's (each rank
    saves only the GPU it uses)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and device.type == "cuda":
        saved = state["cuda"]  # checkpoints before per-device states held every visible GPU's
        torch.cuda.set_rng_state(saved[device.index or 0] if isinstance(saved, list) else saved, device)

# mallopt(3) parameter numbers (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_INT_MAX = 2**31 - 1
_applied = False


def keep_freed_memory(top_pad_bytes: int = 1 << 30) -> bool:
    """Make glibc's malloc serve large tensors from its heap and keep freed memory mapped for
    reuse (``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` at their maximum, ``M_TOP_PAD`` to
    grow the heap in ``top_pad_bytes`` steps). The resident set then stays at the peak of a
    step instead of shrinking between steps, which is what a training process wants anyway.

    Idempotent. Returns True when the settings are in force, False where the C library is not
    glibc (macOS, musl, Windows): nothing is changed there.
    """
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    settings = ((_M_MMAP_THRESHOLD, _INT_MAX), (_M_TRIM_THRESHOLD, _INT_MAX),
                (_M_TOP_PAD, min(top_pad_bytes, _INT_MAX)))
    _applied = all(libc.mallopt(param, ctypes.c_int(value)) == 1 for param, value in settings)
    return _applied


@contextlib.contextmanager
def sigterm_flag():
    """A list that gets an entry when SIGTERM arrives, while the block runs (the previous handler
    is put back after; outside the main thread, where handlers cannot be set, nothing changes)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)
