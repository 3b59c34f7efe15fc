"""Shards written and read back: splitting, equal batch counts, exact resume, bad input, mixing."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from data_pipelines.images import eval_transform, pretrain_transform
from data_pipelines.masking import BlockMaskGenerator
from data_pipelines.mixer import PretrainMixer
from data_pipelines.processors import (
    ImageProcessor,
    ImageTextProcessor,
    LMProcessor,
    RetrievalProcessor,
    TextProcessor,
    VQAProcessor,
    vqa_soft_score,
)
from data_pipelines.shards import ShardSink, read_manifest, safe_key
from data_pipelines.skips import SkipCounter, SkipSample, UnusableShards
from data_pipelines.streams import ShardStream, StreamLoader
from data_pipelines.tokenizer import train_tokenizer

WORDS = "red green blue small large round square dog cat bird face hand flag digit seven three".split()


def png(seed: int, size: int = 12) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def caption(i: int) -> str:
    return " ".join(WORDS[(i * k) % len(WORDS)] for k in (1, 3, 5))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = [caption(i) for i in range(200)] + [" ".join(WORDS)] * 5
    return train_tokenizer(corpus, tmp_path_factory.mktemp("tok") / "t.model", vocab_size=60)


def write_pairs(path, n: int, maxcount: int = 5):
    with ShardSink(path, "image_text", maxcount=maxcount) as sink:
        for i in range(n):
            sink.write(f"pair{i:04d}", {"png": png(i), "txt": caption(i)})
    return path


def pair_processor(tokenizer, mask=True):
    return ImageTextProcessor.build(tokenizer, pretrain_transform(8), mask=BlockMaskGenerator(2, num_masked=2,
                                                                                               min_block=1)
                                    if mask else None)


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b.keys]


# --- writer ---------------------------------------------------------------------------------

def test_writer_splits_shards_and_records_sizes(tmp_path):
    out = write_pairs(tmp_path / "pairs", 12, maxcount=5)
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {"shard-000000.tar": 5, "shard-000001.tar": 5, "shard-000002.tar": 2}
    assert read_manifest(out) == {"kind": "image_text", "samples": 12, "shards": 3, "fields": {"png": 12, "txt": 12}}
    with tarfile.open(out / "shard-000001.tar") as tar:
        names = tar.getnames()
        assert names[:2] == ["pair0005.png", "pair0005.txt"]
        assert {m.mtime for m in tar.getmembers()} == {0}


def test_writer_is_reproducible_and_refuses_to_overwrite(tmp_path):
    a, b = write_pairs(tmp_path / "a", 7), write_pairs(tmp_path / "b", 7)
    for name in ("shard-000000.tar", "shard-000001.tar", "sizes.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        write_pairs(tmp_path / "a", 3)
    with ShardSink(tmp_path / "a", "text", overwrite=True) as sink:
        sink.write("doc", {"txt": "replaced"})
    assert read_manifest(tmp_path / "a")["samples"] == 1


def test_writer_rejects_bad_samples_and_leaves_nothing_behind(tmp_path):
    with pytest.raises(ValueError, match="safe_key"):
        with ShardSink(tmp_path / "x", "text") as sink:
            sink.write("a.b", {"txt": "dots split keys"})
    assert not (tmp_path / "x").exists() and not list(tmp_path.iterdir())
    with ShardSink(tmp_path / "y", "image_text") as sink:
        with pytest.raises(ValueError, match="needs a txt field"):
            sink.write("k", {"png": png(0)})
        with pytest.raises(ValueError, match="duplicate"):
            sink.write("k", {"png": png(0), "txt": "a"})
            sink.write("k", {"png": png(0), "txt": "a"})
    assert safe_key("emoji/1F600.grinning face") == "emoji_1F600_grinning_face"


# --- reading back ---------------------------------------------------------------------------

def test_every_kind_round_trips(tmp_path, tokenizer):
    answers = ["two"] * 6 + ["2"] * 3 + ["three"]
    with ShardSink(tmp_path / "vqa", "vqa") as sink:
        for i in range(3):
            sink.write(f"q{i}", {"png": png(i), "json": {"question_id": i, "question": caption(i), "answers": answers,
                                                         "question_type": "how many", "image_id": f"img{i}"}})
    with ShardSink(tmp_path / "ret", "retrieval") as sink:
        for i in range(3):
            record = {"image_id": f"img{i}", "captions": [caption(i), caption(i + 1)]}
            sink.write(f"r{i}", {"png": png(i), "json": record})
    with ShardSink(tmp_path / "text", "text") as sink:
        for i in range(5):
            sink.write(f"d{i}", {"txt": caption(i)})

    def read(path, processor, batch_size=2):
        return list(StreamLoader(ShardStream(path, processor, batch_size=batch_size, resampled=False)))

    text = read(tmp_path / "text", TextProcessor(tokenizer, max_len=16, mlm_ratio=None))
    assert keys_of(text) == [f"d{i}" for i in range(5)] and [len(b) for b in text] == [2, 2, 1]
    first = text[0]
    assert first.text_ids_BL[1][~first.padding_mask_BL[1]].tolist() == tokenizer.encode_for_model(caption(1), 16)

    vocab = {"two": 0, "2": 1, "three": 2}
    vqa = read(tmp_path / "vqa", VQAProcessor(tokenizer, eval_transform(8), answer_vocab=vocab))
    assert vqa[0].question_ids == [0, 1] and vqa[0].question_types == ["how many"] * 2  # integer ids stay integers
    assert vqa[0].targets_BA[0].tolist() == pytest.approx([1.0, 0.9, 0.3])
    assert [vqa_soft_score(n) for n in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]

    ret = read(tmp_path / "ret", RetrievalProcessor(tokenizer, eval_transform(8), all_captions=True), batch_size=3)[0]
    assert ret.image_ids == ["img0", "img1", "img2"] and ret.images_B3HW.shape == (3, 3, 8, 8)
    assert ret.caption_image_N.tolist() == [0, 0, 1, 1, 2, 2] and ret.text_ids_NL.shape[0] == 6

    pairs = read(write_pairs(tmp_path / "pairs", 4), pair_processor(tokenizer))[0]
    assert pairs.images_B3HW.shape == (2, 3, 8, 8) and pairs.image_mask_BP.sum(1).tolist() == [2, 2]
    masked = pairs.mlm_labels_BL != -100
    assert (masked.sum(1) > 0).all() and not (masked & pairs.padding_mask_BL).any()
    wide = pairs.map_tensors(lambda t: t.to(torch.float64))  # what .to(device) does to every tensor
    assert wide.images_B3HW.dtype == wide.text_ids_BL.dtype == torch.float64
    assert wide.keys == pairs.keys and wide.position == pairs.position and torch.equal(wide.images_B3HW,
                                                                                       pairs.images_B3HW.double())


def test_evaluation_split_sees_each_sample_once_across_ranks_and_workers(tmp_path, tokenizer, monkeypatch):
    path = write_pairs(tmp_path / "pairs", 23, maxcount=4)  # 6 shards of uneven size
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader = StreamLoader(ShardStream(path, pair_processor(tokenizer), batch_size=3, resampled=False),
                              num_workers=2)
        seen += keys_of(loader)
    assert sorted(seen) == [f"pair{i:04d}" for i in range(23)]


def test_resampled_ranks_take_equal_steps_per_epoch(tmp_path, tokenizer, monkeypatch):
    path = write_pairs(tmp_path / "pairs", 9, maxcount=4)  # shards of 4, 4, 1
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader = StreamLoader(ShardStream(path, pair_processor(tokenizer), batch_size=2, epoch_batches=3,
                                          shuffle_buffer=4, seed=rank), num_workers=2)
        it = iter(loader)
        epochs = Counter((b.position[0], b.position[1]) for b in (next(it) for _ in range(12)))
        assert epochs == {(0, 0): 3, (1, 0): 3, (0, 1): 3, (1, 1): 3}  # (worker, epoch): batches


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_loader_continues_with_the_same_batches(tmp_path, tokenizer, workers):
    path = write_pairs(tmp_path / "pairs", 10, maxcount=3)

    def loader():
        return StreamLoader(ShardStream(path, pair_processor(tokenizer), batch_size=2, epoch_batches=4,
                                        shuffle_buffer=5, seed=7), num_workers=workers)

    first = loader()
    it = iter(first)
    _ = [next(it) for _ in range(7)]  # odd: the next batch comes from the second worker
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    expected = [next(it) for _ in range(5)]

    resumed = loader()
    resumed.load_state_dict(state)
    it = iter(resumed)
    got = [next(it) for _ in range(5)]
    assert keys_of(got) == keys_of(expected)
    for a, b in zip(got, expected):
        assert torch.equal(a.images_B3HW, b.images_B3HW) and torch.equal(a.image_mask_BP, b.image_mask_BP)
        assert torch.equal(a.text_ids_BL, b.text_ids_BL) and torch.equal(a.mlm_labels_BL, b.mlm_labels_BL)

    with pytest.raises(ValueError, match="same number of workers"):
        StreamLoader(first.stream, num_workers=3).load_state_dict(state)


def test_a_resumed_loader_counts_skips_as_the_uninterrupted_one(tmp_path, tokenizer):
    """Passing over what it had read, a resumed stream does not count that part's bad tars again."""
    path = write_pairs(tmp_path / "pairs", 10, maxcount=3)
    whole = (path / "shard-000000.tar").read_bytes()
    (path / "shard-000009.tar").write_bytes(whole[:len(whole) // 2])  # a truncated shard among them

    def loader():
        return StreamLoader(ShardStream(path, pair_processor(tokenizer), batch_size=2, epoch_batches=50,
                                        shuffle_buffer=0, seed=3), num_workers=0)

    def skipped(batches) -> Counter:
        return sum((Counter(b.skipped) for b in batches), Counter())

    first = loader()
    it = iter(first)
    before = skipped(next(it) for _ in range(12))
    state = first.state_dict()
    expected = skipped(next(it) for _ in range(12))
    resumed = loader()
    resumed.load_state_dict(state)
    it = iter(resumed)
    assert before["truncated_tar"] > 0 and expected["truncated_tar"] > 0
    assert skipped(next(it) for _ in range(12)) == expected


@pytest.mark.parametrize("workers", [0, 2])
def test_lm_stream_packs_documents_and_resumes_mid_document(tmp_path, tokenizer, workers):
    with ShardSink(tmp_path / "docs", "text", maxcount=4) as sink:
        for i in range(12):
            length = 30 if i == 7 else 1 + i % 5  # doc7 alone fills several batches
            sink.write(f"doc{i}", {"txt": " ".join(caption(i + k) for k in range(length))})

    def loader():
        return StreamLoader(ShardStream(tmp_path / "docs", LMProcessor(tokenizer, seq_len=6), batch_size=2,
                                        epoch_batches=5, shuffle_buffer=4, seed=3), num_workers=workers)

    first = loader()
    it = iter(first)
    head = [next(it) for _ in range(5)]
    assert all(b.ids_BT.shape == (2, 7) and len(b) == 2 for b in head)
    assert all(torch.equal(b.ids_BT[0, -1], b.ids_BT[1, 0]) for b in head)  # consecutive rows share a token
    assert any(b.position[-1] > 0 for b in head)  # some batch ended inside a document
    state = first.state_dict()
    expected = [next(it) for _ in range(7)]  # crosses into the next epoch
    epochs = Counter((b.position[0], b.position[1]) for b in head + expected)
    assert all(n == 5 for (_, epoch), n in epochs.items() if epoch == 0)  # long documents never add batches
    resumed = loader()
    resumed.load_state_dict(state)
    it = iter(resumed)
    assert all(torch.equal(next(it).ids_BT, e.ids_BT) for e in expected)


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = chunk(b"IDAT", zlib.compress(b"\0" * 7))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")


def test_bad_samples_are_skipped_and_counted(tmp_path, tokenizer):
    good = write_pairs(tmp_path / "good", 6, maxcount=10)
    (tmp_path / "bad").mkdir()
    with wds.TarWriter(str(tmp_path / "bad" / "shard-000000.tar"), encoder=False) as tar:  # a foreign writer
        tar.write({"__key__": "corrupt", "png": png(1)[:40], "txt": b"a red dog"})
        tar.write({"__key__": "bomb", "png": png_declaring(30_000, 30_000), "txt": b"a red dog"})
        tar.write({"__key__": "notext", "png": png(2), "json": b"{}"})
        tar.write({"__key__": "latin1", "png": png(3), "txt": "caf\xe9".encode("latin-1")})
        tar.write({"__key__": "fine", "png": png(4), "txt": b"a blue cat"})
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    with tarfile.open(good / "shard-000000.tar") as tar:
        member = tar.getmembers()[5]  # cut inside the third sample's caption
        cut = member.offset_data + member.size // 2
    (truncated / "shard-000000.tar").write_bytes((good / "shard-000000.tar").read_bytes()[:cut])

    shards = [good, tmp_path / "bad", truncated]
    loader = StreamLoader(ShardStream(shards, pair_processor(tokenizer), batch_size=4, resampled=False))
    keys = keys_of(loader)
    assert loader.skipped["corrupt_image"] == 1 and loader.skipped["image_too_large"] == 1
    assert loader.skipped["missing_field"] >= 1 and loader.skipped["bad_utf8"] == 1
    assert loader.skipped["truncated_tar"] >= 1
    assert keys.count("fine") == 1 and {f"pair{i:04d}" for i in range(6)} <= set(keys)
    assert not {"corrupt", "bomb", "notext", "latin1"} & set(keys)


def test_shards_that_never_yield_stop_a_resampled_stream(tmp_path, tokenizer):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "shard-000000.tar").write_bytes(b"not a tar at all" * 10)
    stream = ShardStream(broken, pair_processor(tokenizer), batch_size=2)
    with pytest.raises(UnusableShards, match=r"the last 101 shards drawn from .*shard-000000.tar gave no sample "
                                             r"\(skipped so far: truncated_tar 101\)"):
        next(iter(StreamLoader(stream)))
    with pytest.raises(UnusableShards, match=r"the shards .*shard-000000.tar hold no sample \(skipped: truncated_tar "
                                             r"1\)"):
        next(iter(StreamLoader(ShardStream(broken, pair_processor(tokenizer), batch_size=2, resampled=False))))


def test_mixer_holds_its_ratios_and_resumes(tmp_path, tokenizer):
    pairs = write_pairs(tmp_path / "pairs", 8)
    with ShardSink(tmp_path / "images", "image") as sink:
        for i in range(8):
            sink.write(f"img{i}", {"png": png(100 + i)})

    def mixer():
        image = StreamLoader(ShardStream(tmp_path / "images", ImageProcessor(pretrain_transform(8)), batch_size=3))
        pair = StreamLoader(ShardStream(pairs, pair_processor(tokenizer), batch_size=2, seed=1))
        return PretrainMixer({"image": image, "image_text": pair, "text": None}, ratios={"image": 2, "image_text": 1})

    m = mixer()
    it = iter(m)
    steps = [next(it) for _ in range(40)]
    assert sum(s.image is not None for s in steps) == 40
    assert sum(s.image_text is not None for s in steps) == 20
    assert all(s.text is None for s in steps) and steps[0].image.images_B3HW.shape == (3, 3, 8, 8)
    state = m.state_dict()
    expected = [next(it) for _ in range(3)]
    resumed = mixer()
    resumed.load_state_dict(state)
    got = [s for _, s in zip(range(3), resumed)]
    assert [s.step for s in got] == [s.step for s in expected] == [40, 41, 42]
    for a, b in zip(got, expected):
        assert a.batches().keys() == b.batches().keys()
        assert all(a.batches()[k].keys == b.batches()[k].keys for k in a.batches())
    with pytest.raises(ValueError, match="ratios given for absent"):
        PretrainMixer({"image": m.loaders["image"]}, ratios={"text": 1})


def test_resampling_weights_shard_sets(tmp_path, tokenizer):
    for name in ("a", "b"):
        with ShardSink(tmp_path / name, "image", maxcount=3) as sink:
            for i in range(6):
                sink.write(f"{name}{i}", {"png": png(i)})
    stream = ShardStream([tmp_path / "a", tmp_path / "b"], ImageProcessor(eval_transform(8)), batch_size=10,
                         weights=[3, 1], shuffle_buffer=0, epoch_batches=100)
    it = iter(StreamLoader(stream))
    keys = [k for _ in range(60) for k in next(it).keys]
    assert 0.70 < sum(k.startswith("a") for k in keys) / len(keys) < 0.80  # 3:1
    with pytest.raises(ValueError, match="one per shard set"):
        ShardStream([tmp_path / "a", tmp_path / "b"], ImageProcessor(eval_transform(8)), batch_size=2, weights=[1])


def test_skips_are_logged_at_most_once_per_interval_with_the_count(caplog):
    """Before: a line per 1000 skips, however fast they came (8.4 million skips: 8,400 lines)."""
    now = [0.0]
    counter = SkipCounter(log_interval=60, clock=lambda: now[0])
    with caplog.at_level("WARNING", logger="data_pipelines"):
        for t in (0, 1, 2, 30, 59.9, 60.5, 61, 200):
            now[0] = t
            counter.add(SkipSample("missing_field", "expected txt"), where="00000.tar:000000001")
        counter.add(SkipSample("corrupt_image"))
    assert [r.getMessage() for r in caplog.records] == [
        "skipped sample #1 for missing_field in 00000.tar:000000001: expected txt",
        "skipped sample #6 for missing_field (5 since the line 60 s before) in 00000.tar:000000001: expected txt",
        "skipped sample #8 for missing_field (2 since the line 140 s before) in 00000.tar:000000001: expected txt",
        "skipped sample #1 for corrupt_image: image bytes that Pillow cannot decode"]
    assert counter.take_new() == {"missing_field": 8, "corrupt_image": 1} and counter.take_new() == {}
    caplog.clear()
    once = SkipCounter(log_interval=float("inf"), clock=lambda: now[0])
    with caplog.at_level("WARNING", logger="data_pipelines"):
        once.add(SkipSample("bad_utf8"))
        now[0] = 1e9
        once.add(SkipSample("bad_utf8"))
    assert len(caplog.records) == 1 and once.counts == {"bad_utf8": 2}
    with pytest.raises(ValueError, match="unknown skip reason"):
        SkipSample("cosmic_rays")
    with pytest.raises(ValueError, match="log_interval is in seconds"):
        SkipCounter(log_interval=-1)
