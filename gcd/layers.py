"""Layer arithmetic: layer identities and sizes from what the Engine API tells of an image.

The engine's accounting counts each layer once however many images share it; gcd does the
same by keeping every image's layers by chain ID, with a size each. An inspect gives the
diff IDs and the image's total size; the history gives a size per build step. The
functions here turn those into (chain ID, size) pairs, or say that they cannot.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any


def chain_ids(diff_ids: tuple[str, ...]) -> tuple[str, ...]:
    """The layer store's identity of each layer: a hash of the diff IDs below and including it."""
    chain: list[str] = []
    for diff_id in diff_ids:
        if chain:
            digest = hashlib.sha256(f"{chain[-1]} {diff_id}".encode()).hexdigest()
            chain.append(sys.intern(f"sha256:{digest}"))
        else:
            chain.append(sys.intern(diff_id))
    # Interned: base layers are shared by most images, and the daemon keeps these for all.
    return tuple(chain)


def derived_sizes(
    layers: tuple[str, ...], total: int, sized: Mapping[str, int]
) -> tuple[int, ...] | None:
    """Layer sizes without the history: an image's size is the sum of its layers' sizes, so
    when all but one are known (a build's own layer on a base already read, or a one-layer
    image), the last is the difference. None when two or more are unknown, or when the
    figures do not add up."""
    if not layers:
        return None
    sizes = [sized.get(layer, -1) for layer in layers]
    unknown = [i for i, size in enumerate(sizes) if size < 0]
    if len(unknown) > 1:
        return None
    if unknown:
        rest = total - sum(s for s in sizes if s >= 0)
        if rest < 0:
            return None
        sizes[unknown[0]] = rest
    return tuple(sizes) if sum(sizes) == total else None


def history_sizes(
    layers: int, history: Sequence[Mapping[str, Any]], total: int, exact: bool = True
) -> tuple[int, ...] | None:
    """Each layer's size from the image history (newest entry first in the API).

    History entries of empty layers (ENV, CMD, ...) have size 0 and are not layers; a real
    layer may be empty too. Entries with a size are layers; a zero entry counts as a layer
    only when the remaining entries are needed to reach the layer count. Returns None when
    the count is wrong or, `exact` (the classic store, where they must), the sizes do not add
    up to the image size: bytes then fall back to whole images. On the containerd store the
    history gives each layer's unpacked size on disk (block-rounded), which is what the
    engine's own accounting counts, and the image size is another measure altogether.
    """
    entries = [int(e.get("Size") or 0) for e in reversed(history)]
    sizes: list[int] = []
    for index, size in enumerate(entries):
        if len(sizes) == layers:
            break
        if size > 0 or len(entries) - index <= layers - len(sizes):
            sizes.append(size)
    if len(sizes) != layers or (exact and sum(sizes) != total):
        return None
    return tuple(sizes)


def blob_keys(
    chain: Sequence[str],
    content: int,
    sized: Mapping[str, int],
    exact: Sequence[int] | None = None,
) -> tuple[str, ...]:
    """The keys of an image's packed blobs, one per layer: `<chain ID>/blob`, unless the
    blobs already sized under those keys are more than the image's whole content, or, with
    the blobs' `exact` sizes (from the manifest), other sizes. Then the image holds other
    blobs of the same layers (a layer loaded uncompressed, and built or pulled compressed:
    two blobs, one unpacked layer), and the next set of keys is tried, `<chain ID>/blob.1`
    and on, until one fits or is new."""
    for variant in range(len(sized) + 1):
        suffix = f".{variant}" if variant else ""
        keys = tuple(f"{layer}/blob{suffix}" for layer in chain)
        if exact is not None:
            if all(sized.get(key, size) == size for key, size in zip(keys, exact, strict=True)):
                return keys
            continue
        known = [sized[key] for key in keys if key in sized]
        if not known or sum(known) <= content:
            return keys
    raise AssertionError("unreachable: a variant no image sized fits")


def content_sizes(
    packed: Sequence[str],
    unpacked: Sequence[int],
    content: int,
    own: int,
    sized: Mapping[str, int],
) -> tuple[tuple[int, ...], int]:
    """Each layer's packed blob and the image's own content, on a store that keeps both the
    packed blobs and the unpacked layers (Docker's containerd store) and counts both.

    The engine gives only the image's whole `content` (its manifest, config and every
    layer's blob), never a blob's own size. A blob another image already sized keeps that
    size; `own` (the manifest's size and an estimate of the config's) is set aside; the rest
    is spread over the new blobs in proportion to their unpacked sizes. The total is exact,
    and so is what an image frees when its new layers go with it (the usual case: a build's
    own layers); how a new image's content splits between layers that other images share
    later is an estimate. Returns the blob sizes and the image's own bytes."""
    sizes = [sized.get(blob, -1) for blob in packed]
    new = [i for i, size in enumerate(sizes) if size < 0]
    rest = max(content - sum(size for size in sizes if size >= 0), 0)
    fresh = sum(unpacked[i] for i in new)
    spread = max(rest - own, 0) if fresh else 0
    for i in new:
        sizes[i] = spread * unpacked[i] // fresh if fresh else 0
    return tuple(sizes), rest - sum(sizes[i] for i in new)
