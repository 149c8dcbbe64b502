"""train.data: sources, the step-indexed loaders, the shapes dataset and the error messages."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from train import data
from train.config import ConfigError, DataConfig, MeshConfig
from train.mesh import BATCH_AXES, build_mesh


@pytest.fixture(scope="module")
def corpus() -> data.TokenSource:
    return data.load_tokens(DataConfig(max_bytes=200_000))


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- embedded corpus and sources


def test_embedded_corpus_is_deterministic_nonempty_bytes():
    first, second = data.embedded_corpus(100_000), data.embedded_corpus(100_000)
    assert first.dtype == np.uint8 and len(first) == 100_000
    assert np.array_equal(first, second)
    assert len(np.unique(first)) > 50  # real text, not padding
    assert b"_sysconfigdata" not in b"".join(p.name.encode() for p in data._stdlib_files())
    # A shorter corpus is a prefix of a longer one: the file order is fixed.
    assert np.array_equal(data.embedded_corpus(1000), first[:1000])


def test_embedded_source_split_has_no_overlap(corpus):
    full = data.embedded_corpus(200_000)
    assert corpus.vocab_size == data.VOCAB_SIZE == 256
    assert len(corpus.train) == 180_000 and len(corpus.eval) == 20_000
    assert np.array_equal(np.concatenate([corpus.train, corpus.eval]), full)
    assert corpus.fingerprint == data.fingerprint(full)
    assert corpus.origin == "the embedded corpus"


def test_text_file_source(tmp_path):
    text = ("def f(x):\n    return x + 1\n" * 200).encode()
    path = tmp_path / "corpus.txt"
    path.write_bytes(text)
    source = data.load_tokens(DataConfig(source="text", path=str(path), eval_fraction=0.25))
    assert source.vocab_size == 256 and str(path) in source.origin
    cut = int(len(text) * 0.75)
    assert bytes(np.asarray(source.train)) == text[:cut]
    assert bytes(np.asarray(source.eval)) == text[cut:]


def test_npy_token_source_and_vocab_check(tmp_path):
    tokens = (np.arange(5000) * 7 % 1000).astype(np.uint16)
    path = tmp_path / "tokens.npy"
    np.save(path, tokens)
    source = data.load_tokens(DataConfig(source="tokens", path=str(path)))
    assert source.vocab_size == 1000  # max + 1
    assert np.array_equal(np.concatenate([source.train, source.eval]), tokens)
    batch = data.Batches(source.train, 8, 4, seed=0).local_batch(0)
    assert batch["inputs"].dtype == np.int32 and batch["inputs"].shape == (4, 8)
    data.check_vocab(source, 1024)
    with pytest.raises(ConfigError, match=r"model\.vocab_size=512 .*1000"):
        data.check_vocab(source, 512)


def test_splits_feed_disjoint_windows(tmp_path):
    # Token value == position, so a window's values say where it came from.
    path = tmp_path / "positions.npy"
    np.save(path, np.arange(10_000, dtype=np.int32))
    source = data.load_tokens(DataConfig(source="tokens", path=str(path), eval_fraction=0.2))
    train = data.Batches(source.train, 16, 64, seed=3)
    for step in range(20):
        batch = train.local_batch(step)
        assert batch["targets"].max() < 8000
    for batch in data.EvalBatches(source.eval, 16, 64, num_batches=3):
        assert batch["inputs"].min() >= 8000 and batch["targets"].max() < 10_000


# ---------------------------------------------------------------- token batches


def test_batches_are_windows_with_shifted_targets(corpus):
    batch = data.Batches(corpus.train, 32, 8, seed=0).local_batch(5)
    inputs, targets = batch["inputs"], batch["targets"]
    assert inputs.shape == targets.shape == (8, 32) and inputs.dtype == targets.dtype == np.int32
    assert np.array_equal(inputs[:, 1:], targets[:, :-1])
    text = bytes(np.asarray(corpus.train))
    for row_in, row_t in zip(inputs, targets, strict=True):
        window = bytes(row_in.astype(np.uint8)) + bytes(row_t[-1:].astype(np.uint8))
        assert window in text


def test_batches_are_deterministic_in_seed_and_step(corpus):
    a = data.Batches(corpus.train, 16, 8, seed=1)
    b = data.Batches(corpus.train, 16, 8, seed=1)
    assert _equal(a.local_batch(3), b.local_batch(3))
    assert not _equal(a.local_batch(3), a.local_batch(4))
    assert not _equal(a.local_batch(3), data.Batches(corpus.train, 16, 8, seed=2).local_batch(3))
    # Negative seeds are valid too (mapped modulo 2**64), and differ from positive ones.
    assert not _equal(data.Batches(corpus.train, 16, 8, seed=-1).local_batch(0), a.local_batch(0))


def test_batch_at_a_step_ignores_history(corpus):
    """Resume: the batch of step s is the same whatever was read before."""
    walked = data.Batches(corpus.train, 16, 8, seed=0)
    for step in range(12):
        walked.local_batch(step)
    walked.local_batch(500)
    fresh = data.Batches(corpus.train, 16, 8, seed=0)
    assert _equal(walked.local_batch(7), fresh.local_batch(7))
    assert _equal(walked.local_batch(12), fresh.local_batch(12))


def test_batches_cover_the_whole_split():
    tokens = np.arange(101, dtype=np.int32)  # 101 - 10 = 91 start positions
    loader = data.Batches(tokens, 10, 64, seed=0)
    starts = np.concatenate([loader.global_indices(s).ravel() for s in range(40)])
    assert starts.min() == 0 and starts.max() == 90
    assert len(np.unique(starts)) == 91


@pytest.mark.parametrize("process_count", [2, 4, 8])
def test_local_batches_of_processes_tile_the_global_batch(corpus, process_count):
    global_batch = data.Batches(corpus.train, 16, 32, seed=5).local_batch(9)
    locals_ = [
        data.Batches(
            corpus.train, 16, 32, seed=5, process_index=p, process_count=process_count
        ).local_batch(9)
        for p in range(process_count)
    ]
    assert all(b["inputs"].shape == (32 // process_count, 16) for b in locals_)
    joined = {k: np.concatenate([b[k] for b in locals_]) for k in global_batch}
    assert _equal(joined, global_batch)


def test_explicit_rows_and_micro_batches(corpus):
    whole = data.Batches(corpus.train, 16, 8, seed=0, micro_batches=3)
    batch = whole.local_batch(2)
    assert batch["inputs"].shape == (3, 8, 16)
    # Micro-batch 0 is the batch an unaccumulated run sees; the others differ from it.
    plain = data.Batches(corpus.train, 16, 8, seed=0).local_batch(2)
    assert np.array_equal(batch["inputs"][0], plain["inputs"])
    assert not np.array_equal(batch["inputs"][1], plain["inputs"])
    part = data.Batches(corpus.train, 16, 8, seed=0, micro_batches=3, rows=(2, 6))
    assert part.local_batch_size == 4
    assert np.array_equal(part.local_batch(2)["inputs"], batch["inputs"][:, 2:6])


def test_sharding_rows_on_a_mesh():
    mesh = build_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharding = NamedSharding(mesh, P(BATCH_AXES))
    assert data.sharding_rows(sharding, 16) == (0, 16)  # one process owns every row
    # What a process holding devices for rows 4..8 (twice: tensor replicas) would see.
    assert data.rows_of_process([(slice(4, 6),), (slice(6, 8),), (slice(4, 6),)], 16) == (4, 8)
    with pytest.raises(ValueError, match="not contiguous"):
        data.rows_of_process([(slice(0, 2),), (slice(4, 6),)], 16)
    assert jax.device_count() == 8


def test_eval_batches_are_fixed_and_spread(corpus):
    a = data.EvalBatches(corpus.eval, 32, 8, num_batches=3)
    b = data.EvalBatches(corpus.eval, 32, 8, num_batches=3)
    assert len(a) == 3
    assert all(_equal(x, y) for x, y in zip(a, b, strict=True))
    assert _equal(a[2], a[-1]) and not _equal(a[0], a[1])
    starts = np.concatenate([a.global_indices(i).ravel() for i in range(3)])
    assert starts[0] == 0 and starts[-1] == len(corpus.eval) - 32 - 1  # first and last window
    assert np.all(np.diff(starts) > 0)
    halves = [
        data.EvalBatches(corpus.eval, 32, 8, 3, process_index=p, process_count=2) for p in (0, 1)
    ]
    assert _equal({k: np.concatenate([h[1][k] for h in halves]) for k in a[1]}, a[1])
    with pytest.raises(IndexError):
        a[3]


def test_spec_records_what_defines_the_batches(corpus):
    spec = data.Batches(corpus.train, 16, 8, seed=0).spec()
    assert spec["seed"] == 0 and spec["fingerprint"] == data.fingerprint(corpus.train)
    assert data.spec_changes(spec, dict(spec)) == []
    other = data.Batches(corpus.train, 16, 8, seed=4).spec()
    assert data.spec_changes(spec, other) == ["data seed: checkpoint has 0, this run has 4"]


def test_fingerprint_samples_large_arrays():
    big = np.zeros(2**20, dtype=np.uint8)
    changed = big.copy()
    changed[0] = 1
    assert data.fingerprint(big, full_limit=1024) != data.fingerprint(changed, full_limit=1024)
    assert data.fingerprint(big) != data.fingerprint(big[:-1])


# ---------------------------------------------------------------- the shapes dataset


def test_shapes_are_balanced_deterministic_and_in_range():
    dataset = data.ShapesDataset(num_classes=4)
    images, labels = dataset.generate(1002)
    assert images.shape == (1002, 16, 16, 1) and images.dtype == np.float32
    assert labels.dtype == np.int32
    assert sorted(np.bincount(labels)) == [250, 250, 251, 251]
    assert images.min() >= 0.0 and images.max() <= 1.0
    again_images, again_labels = data.ShapesDataset(num_classes=4).generate(1002)
    assert np.array_equal(images, again_images) and np.array_equal(labels, again_labels)
    other_images, _ = dataset.generate(1002, split=1)
    assert not np.array_equal(images, other_images)
    assert dataset.class_names == ("circle", "square", "triangle", "cross")


def test_noise_free_shapes_have_their_geometry():
    dataset = data.ShapesDataset(num_classes=6, noise=0.0)
    images, labels = dataset.generate(600)
    flat = images.reshape(len(images), -1)
    fg = flat >= flat.max(axis=1, keepdims=True)  # two levels: the shape is the bright one
    assert np.all(flat[~fg] < 0.3) and np.all(flat[fg] >= 0.6)
    area = fg.sum(axis=1)
    # Coverage relative to the bounding box of the bright pixels, by class.
    masks = fg.reshape(-1, 16, 16)
    rows, cols = masks.any(axis=2), masks.any(axis=1)
    box = rows.sum(axis=1) * cols.sum(axis=1)
    fill = {
        name: np.mean(area[labels == c] / box[labels == c])
        for c, name in enumerate(dataset.class_names)
    }
    assert fill["square"] > 0.95  # a full box
    assert fill["triangle"] < 0.65 and fill["diamond"] < 0.65 and fill["cross"] < 0.7
    assert 0.7 < fill["circle"] < 0.9 and fill["ring"] < fill["circle"]


def test_shapes_are_learnable_beyond_chance():
    source = data.load_images(DataConfig(source="shapes"), num_examples=3000)
    x = source.train_images.reshape(len(source.train_images), -1)
    x_eval = source.eval_images.reshape(len(source.eval_images), -1)
    means = np.stack([x[source.train_labels == c].mean(0) for c in range(4)])
    guess = ((x_eval[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    accuracy = np.mean(guess == source.eval_labels)
    assert accuracy > 0.35  # chance is 0.25; a CNN reaches about 0.99


def test_load_images_split_and_seed_independence():
    cfg = DataConfig(source="shapes", eval_fraction=0.2)
    source = data.load_images(cfg, num_examples=500)
    assert len(source.train_images) == 400 and len(source.eval_images) == 100
    assert (
        source.num_classes == 4
        and source.fingerprint == data.load_images(cfg, num_examples=500).fingerprint
    )
    other = data.load_images(cfg, num_examples=500, dataset_seed=1)
    assert other.fingerprint != source.fingerprint


def test_image_batches_visit_every_image_once_per_epoch():
    images, labels = data.ShapesDataset().generate(96)
    loader = data.ImageBatches(images, labels, 16, seed=0)
    seen = np.concatenate([loader.global_indices(s).ravel() for s in range(6)])
    assert sorted(seen) == list(range(96))
    next_epoch = np.concatenate([loader.global_indices(s).ravel() for s in range(6, 12)])
    assert sorted(next_epoch) == list(range(96)) and not np.array_equal(seen, next_epoch)
    assert loader.epoch(6) == 1.0
    batch = loader.local_batch(2)
    assert batch["images"].shape == (16, 16, 16, 1) and batch["images"].dtype == np.float32
    assert np.array_equal(batch["labels"], labels[loader.global_indices(2)[0]])
    # A batch that straddles epochs (96 is not a multiple of 40) still holds distinct images
    # within each epoch, and resuming gives the same batch.
    straddle = data.ImageBatches(images, labels, 40, seed=0)
    fresh = data.ImageBatches(images, labels, 40, seed=0)
    straddle.local_batch(0)
    assert _equal(straddle.local_batch(2), fresh.local_batch(2))
    parts = [
        data.ImageBatches(images, labels, 40, seed=0, process_index=p, process_count=4)
        for p in range(4)
    ]
    joined = {k: np.concatenate([pt.local_batch(2)[k] for pt in parts]) for k in batch}
    assert _equal(joined, fresh.local_batch(2))


def test_image_eval_batches_cover_the_split_in_order():
    images, labels = data.ShapesDataset().generate(50)
    evals = data.ImageEvalBatches(images, labels, 16)
    assert len(evals) == 4  # ceil(50 / 16)
    got = np.concatenate([b["labels"] for b in evals])
    assert np.array_equal(got, np.concatenate([labels, labels[:14]]))


# ---------------------------------------------------------------- bad input


def test_missing_file_names_the_key_and_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(data.DataFileError, match=rf"data\.path.*{missing}") as info:
        data.load_tokens(DataConfig(source="text", path=str(missing)))
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ConfigError)
    with pytest.raises(data.DataFileError, match="not a regular file"):
        data.load_tokens(DataConfig(source="tokens", path=str(tmp_path)))


def test_path_required_and_empty_file(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.path must be set.*'text'"):
        data.load_tokens(DataConfig(source="text"))
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ConfigError, match=rf"data\.path: {empty} is empty"):
        data.load_tokens(DataConfig(source="text", path=str(empty)))
    with pytest.raises(ConfigError, match=r"data\.path='x' is set but data\.source='embedded'"):
        data.load_tokens(DataConfig(path="x"))


def test_unknown_source_names_data_source():
    with pytest.raises(ConfigError, match=r"data\.source='csv'.*embedded, text, tokens, shapes"):
        data.load_tokens(DataConfig(source="csv"))
    with pytest.raises(ConfigError, match=r"data\.source='shapes'.*load_images"):
        data.load_tokens(DataConfig(source="shapes"))
    with pytest.raises(ConfigError, match=r"data\.source='embedded' is not an image source"):
        data.load_images(DataConfig())


def test_file_too_short_for_seq_len(tmp_path):
    path = tmp_path / "short.txt"
    path.write_bytes(b"x" * 100)
    cfg = DataConfig(source="text", path=str(path))
    with pytest.raises(ConfigError, match=rf"eval split of data\.path={path} has 10 tokens.*= 33"):
        data.load_tokens(cfg, seq_len=32)
    source = data.load_tokens(cfg)
    with pytest.raises(ConfigError, match=r"has 90 tokens, fewer than model\.seq_len \+ 1 = 129"):
        data.Batches(source.train, 128, 4, seed=0, origin=f"the train split of {source.origin}")


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.array([3, 1, -2, 5, -7]), r"negative token id -7 \(first at index 2\)"),
        (np.array([1.0, 2.0]), "dtype float64; token ids must be integers"),
        (np.array([True, False]), "dtype bool"),
        (np.zeros((4, 4), dtype=np.int32), r"shape \(4, 4\); expected 1-D"),
        (np.array([2**31], dtype=np.int64), "beyond int32"),
        (np.array([], dtype=np.int32), "holds no tokens"),
    ],
)
def test_bad_token_arrays(tmp_path, array, message):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(ConfigError, match=rf"data\.path: {path} .*{message}"):
        data.load_tokens(DataConfig(source="tokens", path=str(path)))


def test_not_an_npy_file(tmp_path):
    path = tmp_path / "tokens.npy"
    path.write_text("hello")
    with pytest.raises(ConfigError, match=rf"data\.path: {path} is not a readable \.npy"):
        data.load_tokens(DataConfig(source="tokens", path=str(path)))


def test_batch_size_checks(corpus):
    data.check_batch(32, 8)
    with pytest.raises(ConfigError, match=r"data\.batch_size=30 .*data-parallel size 8.*24 or 32"):
        data.check_batch(30, 8)
    with pytest.raises(ConfigError, match=r"data\.batch_size must be >= 1, got 0"):
        data.check_batch(0, 8)
    with pytest.raises(ConfigError, match=r"data\.batch_size=10 .*number of processes 4"):
        data.Batches(corpus.train, 16, 10, seed=0, process_index=1, process_count=4)
    with pytest.raises(ValueError, match="process_index=4"):
        data.Batches(corpus.train, 16, 8, seed=0, process_index=4, process_count=4)
    with pytest.raises(ConfigError, match=r"optimizer\.accumulation_steps must be >= 1"):
        data.Batches(corpus.train, 16, 8, seed=0, micro_batches=0)
    with pytest.raises(ValueError, match="step must be >= 0"):
        data.Batches(corpus.train, 16, 8, seed=0).local_batch(-1)


def test_config_value_checks():
    with pytest.raises(ConfigError, match=r"data\.eval_fraction must be in \(0, 1\), got 1\.0"):
        data.load_tokens(DataConfig(eval_fraction=1.0))
    with pytest.raises(ConfigError, match=r"data\.max_bytes must be >= 1, got 0"):
        data.load_tokens(DataConfig(max_bytes=0))
    with pytest.raises(ConfigError, match=r"shapes num_classes must be in \[2, 6\], got 7"):
        data.load_images(DataConfig(source="shapes"), num_classes=7)
    with pytest.raises(ConfigError, match=r"data\.path='img' is set"):
        data.load_images(dataclasses.replace(DataConfig(source="shapes"), path="img"))


def test_legacy_helpers_still_work():
    tokens = data.embedded_corpus(10_000)
    train, eval_ = data.train_eval_split(tokens, 0.1)
    assert len(train) == 9000 and len(eval_) == 1000
    inputs, targets = data.sample_windows(train, 16, 4, np.random.default_rng(0))
    assert inputs.shape == (4, 16) and targets.shape == (4,)
