"""Layer arithmetic (gcd/layers.py): chain IDs, and layer sizes from an image's size or history."""

from __future__ import annotations

from gcd.layers import blob_keys, chain_ids, content_sizes, derived_sizes, history_sizes

# `printf 'sha256:aaaa sha256:bbbb' | sha256sum`, then the same with that and sha256:cccc.
AB = "sha256:2c4d8760379f05d0ad1ed610712309f0114e7345e6e6a351494cff030ffdf197"
ABC = "sha256:10f847b3ece58353f298bec20c58125235b631360ad43ac162131980750211ff"


def test_a_chain_id_hashes_the_chain_below_with_the_layers_own_diff_id() -> None:
    assert chain_ids(()) == ()
    assert chain_ids(("sha256:aaaa",)) == ("sha256:aaaa",)  # the bottom layer is its diff ID
    assert chain_ids(("sha256:aaaa", "sha256:bbbb", "sha256:cccc")) == ("sha256:aaaa", AB, ABC)
    # The same diff ID on another base is another layer.
    assert chain_ids(("sha256:bbbb", "sha256:cccc"))[1] != ABC


def test_sizes_are_derived_when_at_most_one_layer_is_unknown() -> None:
    assert derived_sizes(("base", "own"), 150, {"base": 100}) == (100, 50)
    assert derived_sizes(("own",), 70, {}) == (70,)  # a one-layer image
    assert derived_sizes(("base", "own"), 150, {"base": 100, "own": 50}) == (100, 50)


def test_sizes_are_not_derived_from_figures_that_do_not_add_up() -> None:
    assert derived_sizes((), 0, {}) is None
    assert derived_sizes(("a", "b"), 150, {}) is None  # two unknown
    assert derived_sizes(("base", "own"), 90, {"base": 100}) is None  # the rest is negative
    assert derived_sizes(("base", "own"), 151, {"base": 100, "own": 50}) is None


def history(*sizes: int) -> list[dict[str, int]]:
    """An image history as the API gives it: newest entry first."""
    return [{"Size": size} for size in reversed(sizes)]


def test_history_entries_without_bytes_are_steps_not_layers() -> None:
    # FROM base (100), ENV (0), COPY (50), CMD (0): two layers.
    assert history_sizes(2, history(100, 0, 50, 0), 150) == (100, 50)


def test_an_empty_layer_counts_when_the_layer_count_needs_it() -> None:
    # Two layers, the second empty (a RUN that changed nothing), then a CMD.
    assert history_sizes(2, history(100, 0, 0), 100) == (100, 0)
    assert history_sizes(3, history(0, 0, 0), 0) == (0, 0, 0)


def test_a_history_that_disagrees_with_the_image_gives_no_sizes() -> None:
    assert history_sizes(3, history(100, 50), 150) is None  # too few entries
    assert history_sizes(2, history(100, 50), 151) is None  # the classic store: exact
    # The containerd store: history sizes are block-rounded and the image size counts
    # something else: the history is taken as it is.
    assert history_sizes(2, history(4096, 8192), 5000, exact=False) == (4096, 8192)
    assert history_sizes(2, history(4096), 5000, exact=False) is None


def test_an_images_content_is_spread_over_its_new_blobs_beside_its_own_bytes() -> None:
    # A first image: 1,500 bytes of its own (manifest and config), the rest over its two
    # blobs in proportion to their unpacked sizes.
    blobs, own = content_sizes(("a/blob", "b/blob"), (3000, 1000), 5500, 1500, {})
    assert (blobs, own) == ((3000, 1000), 1500)
    # A blob another image sized keeps that size; the new one takes the rest but own.
    blobs, own = content_sizes(("a/blob", "c/blob"), (3000, 500), 4200, 700, {"a/blob": 3000})
    assert (blobs, own) == ((3000, 500), 700)
    # Nothing new: all that is not a known blob is the image's own (a retag's new config).
    assert content_sizes(("a/blob",), (3000,), 3900, 700, {"a/blob": 3000}) == ((3000,), 900)


def test_no_size_is_negative_when_the_figures_disagree() -> None:
    # Known blobs larger than the content (another image's estimate ran high): own is what
    # is left, never below zero, and the new blob gets nothing.
    assert content_sizes(("a/blob", "b/blob"), (10, 10), 50, 700, {"a/blob": 80}) == ((80, 0), 0)
    # A guess of own bytes above the content: all of it is own.
    assert content_sizes(("a/blob",), (4096,), 600, 700, {}) == ((0,), 600)
    # New layers that are empty: no blob bytes to spread, all is own.
    assert content_sizes(("a/blob",), (0,), 900, 700, {}) == ((0,), 900)


def test_blobs_that_do_not_fit_an_images_content_are_other_blobs_of_the_same_layers() -> None:
    # A layer loaded uncompressed (its blob 2 MB), then built compressed (1 MB): one chain
    # ID, two blobs. The second image's content cannot hold the first's blob.
    assert blob_keys(("a", "b"), 2_100_000, {}) == ("a/blob", "b/blob")
    sized = {"a/blob": 2_000_000, "b/blob": 50_000}
    assert blob_keys(("a", "b"), 2_100_000, sized) == ("a/blob", "b/blob")
    assert blob_keys(("a", "c"), 1_100_000, sized) == ("a/blob.1", "c/blob.1")
    sized |= {"a/blob.1": 1_000_000, "c/blob.1": 90_000}
    assert blob_keys(("a", "c"), 1_100_000, sized) == ("a/blob.1", "c/blob.1")
    assert blob_keys(("a",), 900_000, sized) == ("a/blob.2",)  # neither fits: a third


def test_blobs_with_exact_sizes_share_keys_only_with_blobs_of_those_sizes() -> None:
    # From the manifests: a layer's blob keeps its key while the sizes agree; a blob of
    # another size (the same layer packed otherwise) is another blob.
    assert blob_keys(("a", "b"), 0, {}, (2_000_000, 50_000)) == ("a/blob", "b/blob")
    sized = {"a/blob": 2_000_000, "b/blob": 50_000}
    assert blob_keys(("a", "c"), 0, sized, (2_000_000, 7)) == ("a/blob", "c/blob")
    assert blob_keys(("a", "c"), 0, sized, (1_000_000, 7)) == ("a/blob.1", "c/blob.1")
