"""img2dataset's output read as it is (jpg, png and webp), its stats reported, and streams whose
samples are all unusable stopped with an error that says why, in every mode, never spinning."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import signal
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_pipelines.cli import inspect_shards
from data_pipelines.images import pretrain_transform
from data_pipelines.masking import BlockMaskGenerator
from data_pipelines.paths import data_path
from data_pipelines.processors import ImageTextProcessor
from data_pipelines.shards import ShardSink, img2dataset_stats, shard_urls
from data_pipelines.skips import SkipCounter, UnusableShards
from data_pipelines.sources import image_field
from data_pipelines.streams import ShardStream, StreamLoader
from data_pipelines.tars import tar_samples
from data_pipelines.tokenizer import Tokenizer
from multimodal_moe.cli import main

FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}  # img2dataset's encode_format -> Pillow's name
WORDS = "red green blue small round dog cat bird".split()


def write_img2dataset(out: Path, field: str = "jpg", *, shards: int = 2, attempts: int = 8,
                      caption: bool = True) -> list[str]:
    """A folder as img2dataset writes it: ``00000.tar`` with ``000000000.<field>``, ``.txt`` and
    ``.json`` members (one in four downloads failed, so missing), ``00000_stats.json`` and
    ``00000.parquet``. Returns the keys written."""
    out.mkdir(parents=True)
    keys = []
    for shard in range(shards):
        failed = [i for i in range(attempts) if i % 4 == 3]
        with wds.TarWriter(str(out / f"{shard:05d}.tar")) as tar:
            for i in range(attempts):
                if i in failed:
                    continue
                key = f"{shard:05d}{i:04d}"
                pixels = np.random.default_rng(i).integers(0, 256, (10, 12, 3), dtype=np.uint8)
                encoded = io.BytesIO()
                Image.fromarray(pixels).save(encoded, format=FORMATS.get(field, "PNG"))
                text = " ".join(WORDS[(i * k) % len(WORDS)] for k in (1, 3))
                meta = {"url": f"https://example.com/{key}.jpg", "key": key, "status": "success",
                        "error_message": None, "caption": text, "width": 12, "height": 10, "original_width": 120,
                        "original_height": 100, "exif": "{}", "sha256": hashlib.sha256(encoded.getvalue()).hexdigest()}
                tar.write({"__key__": key, field: encoded.getvalue(), "json": json.dumps(meta, indent=4),
                           **({"txt": text} if caption else {})})
                keys.append(key)
        status = {"success": attempts - len(failed), "HTTP Error 404: Not Found": len(failed)}
        (out / f"{shard:05d}_stats.json").write_text(json.dumps(
            {"count": attempts, "successes": attempts - len(failed), "failed_to_download": len(failed),
             "failed_to_resize": 0, "duration": 1.5, "start_time": 0.0, "end_time": 1.5, "status_dict": status}))
        (out / f"{shard:05d}.parquet").write_bytes(b"PAR1" + bytes(8) + b"PAR1")  # a stand-in: nothing opens it
    return keys


def truncate(tar: Path) -> None:
    data = tar.read_bytes()
    tar.write_bytes(data[:len(data) // 2 + 700])  # inside a member, past the first samples


@pytest.fixture(scope="module")
def training_processor():
    """The processor image-text pretraining reads with: bundled tokenizer, random crops, block masks."""
    return ImageTextProcessor.build(Tokenizer.load(data_path("bundled:tokenizer.model")), pretrain_transform(16),
                                    mask=BlockMaskGenerator(4, num_masked=4, min_block=2), max_len=16)


@contextlib.contextmanager
def fails_instead_of_hanging(seconds: int = 120):
    """A guard, not a timing check: if a stream regresses to reading forever, the test fails
    (SIGALRM interrupts the main process's wait) instead of hanging the suite."""
    def stop(signum, frame):
        pytest.fail(f"the stream still had not stopped after {seconds} s")
    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("field", sorted(FORMATS))
def test_img2dataset_output_in_each_encode_format_is_read_by_the_training_processor(tmp_path, field,
                                                                                   training_processor):
    keys = write_img2dataset(tmp_path / "i2d", field)
    loader = StreamLoader(ShardStream(tmp_path / "i2d", training_processor, batch_size=4, resampled=False))
    batches = list(loader)
    assert sorted(k for b in batches for k in b.keys) == keys and loader.skipped == {}
    assert batches[0].images_B3HW.shape == (4, 3, 16, 16) and batches[0].text_ids_BL.shape[0] == 4
    resampled = next(iter(StreamLoader(ShardStream(tmp_path / "i2d", training_processor, batch_size=4))))
    assert set(resampled.keys) <= set(keys) and resampled.skipped == {}
    report = inspect_shards([str(tmp_path / "i2d")], kind="image_text")
    assert report["skipped"] == {} and report["fields"] == {field: 12, "json": 12, "txt": 12}


def test_inspect_reports_what_img2dataset_downloaded_and_lost(tmp_path, capsys):
    write_img2dataset(tmp_path / "i2d", "webp")
    truncate(tmp_path / "i2d" / "00001.tar")
    report = inspect_shards([str(tmp_path / "i2d")], kind="image_text")
    assert report["skipped"] == {"truncated_tar": 1} and report["samples"] < 12
    assert report["img2dataset"] == {"shards": 2, "count": 16, "successes": 12, "failed_to_download": 4,
                                     "failed_to_resize": 0, "unreadable": [],
                                     "status": {"success": 12, "HTTP Error 404: Not Found": 4}}
    (tmp_path / "i2d" / "00001_stats.json").write_text("{cut sho")
    assert img2dataset_stats(shard_urls(tmp_path / "i2d"))["unreadable"] == [str(tmp_path / "i2d" / "00001_stats.json")]
    assert main(["data", "inspect", str(tmp_path / "i2d")]) == 0
    out = capsys.readouterr().out
    assert "img2dataset: 6 of 8 samples downloaded into the 1 shard(s) with stats" in out
    assert "--kind image_text checks them" in out  # no manifest: the kind is the user's to give
    assert img2dataset_stats(shard_urls(data_path("bundled:image_text/train"))) is None


def test_webp_and_jpeg_are_image_fields_everywhere(tmp_path):
    Image.new("RGB", (5, 4), "red").save(tmp_path / "a.webp")
    Image.new("RGB", (5, 4), "blue").save(tmp_path / "b.jpeg")
    assert image_field(tmp_path / "a.webp") == {"webp": (tmp_path / "a.webp").read_bytes()}  # kept as it is
    with ShardSink(tmp_path / "shards", "image_text") as sink:
        sink.write("a", {**image_field(tmp_path / "a.webp"), "txt": "a red square"})
        sink.write("b", {"jpeg": (tmp_path / "b.jpeg").read_bytes(), "txt": "a blue square"})
    report = inspect_shards([str(tmp_path / "shards")])  # the kind from the manifest
    assert report["kind"] == "image_text" and report["skipped"] == {}
    assert report["fields"] == {"jpeg": 1, "txt": 2, "webp": 1} and report["examples"][0]["webp"] == "5x4 RGB"


UNUSABLE = {  # how the samples are written -> what the error says they lack
    "avif": ({"field": "avif"}, "expected jpg, png, webp or jpeg; the sample has avif, json, txt"),
    "no_caption": ({"caption": False}, "expected txt; the sample has jpg, json"),
}


@pytest.mark.parametrize("case, resampled, workers", [
    ("avif", True, 0), ("avif", True, 2), ("avif", False, 0), ("avif", False, 2), ("no_caption", False, 0)])
def test_a_stream_without_a_usable_sample_stops_and_says_why(tmp_path, training_processor, case, resampled,
                                                             workers):
    """Before: training spun forever (logging a skip per 1000 samples, deaf to SIGTERM) and
    evaluation yielded nothing, without a word; a truncated tar there reached no count."""
    written, lacks = UNUSABLE[case]
    write_img2dataset(tmp_path / "i2d", **written)
    truncate(tmp_path / "i2d" / "00001.tar")
    readable = sum(1 for _ in tar_samples(shard_urls(tmp_path / "i2d"), SkipCounter(muted=True)))
    loader = StreamLoader(ShardStream(tmp_path / "i2d", training_processor, batch_size=4, resampled=resampled),
                          num_workers=workers)
    with fails_instead_of_hanging(), pytest.raises(UnusableShards) as stopped:
        next(iter(loader))
    message = str(stopped.value)
    assert message.startswith("no usable sample in " + ("the last 1000 samples read" if resampled else
                                                          "an evaluation pass: all"))
    assert f"{tmp_path / 'i2d'}/{{00000.tar, 00001.tar}}" in message and lacks in message
    assert "truncated_tar" in message and "Traceback" not in message  # raised by the main process itself
    if not resampled:  # each sample read once, the truncated tar counted once
        assert f"all {readable} samples read" in message and "truncated_tar 1" in message


def test_a_small_rank_share_without_samples_is_no_error(tmp_path, training_processor, monkeypatch):
    write_img2dataset(tmp_path / "i2d", shards=1, attempts=1)  # one sample: rank 1 of 2 has none
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert list(StreamLoader(ShardStream(tmp_path / "i2d", training_processor, batch_size=4, resampled=False),
                             num_workers=2)) == []

