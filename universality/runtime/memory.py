"""Memory: whether a run's largest SAE fits on its device at all (checked before any work, so a dictionary too large
for the machine is a one-line error, not an out-of-memory kill hours in), and how freed memory is kept for reuse."""

from __future__ import annotations

import ctypes
import functools
import os
import sys

import torch

from universality.core.config import ExperimentConfig
from universality.core.errors import ConfigError


def sae_training_bytes(d_in: int, size: int, batch_size: int, buffer_size: int, resample_inputs: int) -> int:
    """An estimate of the float32 bytes one SAE's training holds at once: its parameters (2 x d_in x size + size
    + d_in) four times (weights, gradients, Adam's two moments), a batch's pre-activations, features and their
    gradients (4 x batch x size), and the shuffling buffer and resampling inputs (d_in wide)."""
    params = 2 * d_in * size + size + d_in
    return 4 * (4 * params + 4 * batch_size * size + (buffer_size + resample_inputs) * d_in)


def device_memory(device: str) -> int:
    """Bytes of memory of ``device``: the GPU's total, or the machine's physical memory."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(cfg: ExperimentConfig, device: str) -> None:
    """A one-line error, before any work, when the largest SAE cannot train on ``device`` at all."""
    size = max(cfg.sae.sizes)
    need = sae_training_bytes(cfg.model.d_mlp, size, cfg.sae.batch_size, cfg.sae.buffer_size, cfg.sae.resample_inputs)
    have = device_memory(device)
    if need > have:
        raise ConfigError(f"an SAE of {size:,} features needs about {need / 2**30:,.1f} GiB to train (weights, gradients, "
                          f"Adam state, a batch of {cfg.sae.batch_size}), more than the {have / 2**30:,.1f} GiB of "
                          f"{device} memory: choose a smaller sae.dict_size / sae.dict_sizes")


# glibc's mallopt parameters (malloc.h) and the values set: tensors up to 32 MiB (glibc's largest mmap threshold
# on 64-bit) come from the heap, and up to 512 MiB of freed heap is kept rather than returned to the system.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_BYTES, _TRIM_THRESHOLD_BYTES = 32 * 2**20, 512 * 2**20


@functools.cache
def retain_freed_memory() -> bool:
    """Keep freed CPU memory in the process for the next allocation of its size (glibc only; True when set).

    An SAE step allocates and frees the same few MiB-sized tensors (gradients, casts) every step. By default
    glibc maps each such tensor fresh from the system and unmaps it when freed, so every step pays page faults
    on memory it just gave back: with the quick preset's 1,024 x 512 dictionary in batches of 128 that was about
    30% of a step on CPU (benchmarks/bench_sae.py), 5% in batches of 1,024. The cost: up to 512 MiB of freed
    memory stays with the process."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES) and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
