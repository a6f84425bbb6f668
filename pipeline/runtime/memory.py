"""Keeping a long pass's resident memory flat (free heap memory given back to the system) and
the garbage collector's passes short (the imported objects frozen)."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Iterator
from contextlib import contextmanager


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


_LIBC = _glibc()


def release_free_memory() -> bool:
    """Give the free memory of the C heap back to the system (glibc's ``malloc_trim``); False
    where the C library is not glibc (nothing to do there).

    A labelling pass allocates and frees batch-sized buffers all along. glibc serves blocks
    above its mmap threshold with their own mappings, but raises that threshold to the size of
    each such block freed (up to 32 MB): from then on the batches come from the heap, whose
    free pieces glibc keeps. Without a trim the resident size of a pass crept up with the
    shards it labelled (peak 1002 MB over 20k JPEGs, 1127 MB over 160k; with a trim after each
    shard, 937 and 1013 MB). Fixing the threshold instead (MALLOC_MMAP_THRESHOLD_) keeps memory
    flat too, but halves the training speed of a small network on CPU: every activation
    becomes a fresh mapping. A trim costs a few milliseconds, once per shard."""
    if _LIBC is None:
        return False
    _LIBC.malloc_trim(0)
    return True


# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_MMAP_MAX_DEFAULT = 65536  # glibc's DEFAULT_MMAP_MAX
# After the block: the state glibc's dynamic thresholds reach by themselves once a block of
# 32 MB or more was freed (its mmap threshold at the 32 MB cap, the trim threshold twice
# that); setting any of them stops that adjustment, so they are set to where it would end.
_MMAP_THRESHOLD_AFTER = 32 << 20
_TRIM_AFTER = 64 << 20
_NO_TRIM = 2**31 - 1


@contextmanager
def large_blocks_from_the_heap() -> Iterator[None]:
    """Within the block, serve every allocation from the C heap and keep its free top, so that
    large buffers freed at each step are reused by the next one; then give the free memory
    back (``malloc_trim``) and let large blocks have their own mappings again. Nothing where
    the C library is not glibc.

    glibc gives each block above its mmap threshold (at most 32 MB) a mapping of its own,
    unmapped when freed. A training step with an online method carries (1 + 2 mu) x the
    batch's images (mnist5k at 24 px: 960 images, 71 MB in each first-stage activation), so
    every such activation was a fresh mapping whose pages the kernel faulted in and zeroed,
    step after step: 6-10 million page faults and 20-28% of the CPU time in the
    kernel over a 40-step training. From the heap, the same training took 30 s instead of
    40-43 s; its peak resident memory was 2.0 GB instead of 1.65 (the heap's free pieces are
    kept while it trains)."""
    if _LIBC is None or not hasattr(_LIBC, "mallopt"):
        yield
        return
    _LIBC.mallopt(_M_MMAP_MAX, 0)
    _LIBC.mallopt(_M_TRIM_THRESHOLD, _NO_TRIM)
    try:
        yield
    finally:
        _LIBC.mallopt(_M_MMAP_MAX, _MMAP_MAX_DEFAULT)
        _LIBC.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_AFTER)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, _TRIM_AFTER)
        _LIBC.malloc_trim(0)


_frozen = False


def freeze_imported_objects() -> None:
    """Exempt the objects alive now from the cyclic garbage collector's passes (`gc.freeze`),
    once per process: called when a stage's modules are imported, before it builds anything.

    torch, Lightning, torchvision and Hydra leave ~460k tracked objects (modules, classes,
    functions) that live as long as the process. Every full collection walked all of them:
    0.2-0.3 s on 2 cores, paid at random moments of a training loop that allocates many
    short-lived containers per step (Lightning's hooks, its result collections). Frozen, a full
    collection walks only what the run made since. DataLoader workers forked later also leave
    those objects' memory pages shared (Python's advice for fork: freeze before it).

    Once per process only: a later call (the next job of a sweep run in this process) would
    freeze the previous job's leftovers, whose reference cycles would then never be freed."""
    global _frozen
    if not _frozen:
        gc.freeze()
        _frozen = True
