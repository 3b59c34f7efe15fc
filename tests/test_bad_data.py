"""Bad samples in fine-tuning, evaluation and hand-made shards: skipped and counted per reason,
the same way by training, evaluation and ``mmoe data inspect``; never fatal, never split into
characters."""

from __future__ import annotations

import io
import itertools
import json
import tarfile

import pytest
import webdataset as wds
from PIL import Image

from data_pipelines.cli import inspect_shards
from data_pipelines.images import decode_image
from data_pipelines.shards import shard_urls
from data_pipelines.skips import SkipCounter, SkipSample
from data_pipelines.tars import tar_samples
from eval_tasks.vqa import build_answer_vocab
from multimodal_moe.cli import main
from multimodal_moe.tasks import data_path

FAST = ["train.steps=2", "train.warmup_steps=0", "train.log_every=1", "train.num_workers=0",
        "train.checkpoint_every=2", "task.train.batch_size=8", "task.train.shuffle_buffer=20"]


def bundled(split: str, n: int) -> list[dict]:
    samples = tar_samples(shard_urls(str(data_path(f"bundled:{split}"))), SkipCounter())
    return [{k: v for k, v in s.items() if k != "__url__"} for s in itertools.islice(samples, n)]


def write_tar(path, samples: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), encoder=False) as tar:
        for sample in samples:
            tar.write(sample)


def with_json(sample: dict, key: str, record) -> dict:
    text = record if isinstance(record, bytes) else json.dumps(record).encode()
    return {**sample, "__key__": key, "json": text}


VQA_FAULTS = {  # key -> (the json field, the reason it is skipped for)
    "undecodable": (b'{"question": "what', "bad_json"),
    "answers_int": ({"question_id": 1, "question": "what?", "answers": 7}, "bad_json"),
    "question_int": ({"question_id": 2, "question": 12345, "answers": ["one"]}, "bad_json"),
    "answers_str": ({"question_id": 3, "question": "what?", "answers": "yes"}, "bad_json"),
    "answers_mixed": ({"question_id": 4, "question": "what?", "answers": ["one", 2]}, "bad_json"),
    "a_list": ([1, 2, 3], "bad_json"),
    "id_bool": ({"question_id": True, "question": "what?", "answers": ["one"]}, "bad_json"),
    "blank": ({"question_id": 5, "question": "   ", "answers": ["one"]}, "empty_text"),
}
RETRIEVAL_FAULTS = {
    "captions_int": ({"image_id": "x1", "captions": 5}, "bad_json"),
    "captions_str": ({"image_id": "x2", "captions": "a caption split into characters"}, "bad_json"),
    "captions_mixed": ({"image_id": "x3", "captions": ["a caption", 7]}, "bad_json"),
    "captions_blank": ({"image_id": "x4", "captions": [" ", "", "\u200b"]}, "empty_text"),
    "no_id": ({"captions": ["a caption"]}, "bad_json"),
}


def faulty_split(tmp_path, split: str, faults: dict, n: int = 120) -> tuple:
    good = bundled(f"{split}/train", n)
    bad = [with_json(good[i], f"bad-{name}", record) for i, (name, (record, _)) in enumerate(faults.items())]
    bad.append({k: v for k, v in good[0].items() if k != "json"} | {"__key__": "bad-no-json"})
    shards = tmp_path / split
    write_tar(shards / "mixed-000000.tar", [s for pair in itertools.zip_longest(good, bad) for s in pair if s])
    expected = {}
    for _, reason in faults.values():
        expected[reason] = expected.get(reason, 0) + 1
    expected["missing_field"] = 1
    return shards, dict(sorted(expected.items())), good


def test_the_answer_vocabulary_skips_bad_records_and_splits_no_string(tmp_path):
    """Before: an undecodable record raised SkipSample out of the vocabulary, ``"answers": 7``
    a TypeError, and ``"answers": "yes"`` added the answers y, e and s."""
    shards, _, good = faulty_split(tmp_path, "vqa", VQA_FAULTS)
    blank = with_json(good[0], "blank", VQA_FAULTS["blank"][0])  # well-formed: its answer counts (training
    write_tar(tmp_path / "clean" / "clean-000000.tar", [*good, blank])  # skips it only for its empty question)
    vocab = build_answer_vocab([str(shards)], 1)
    assert vocab == build_answer_vocab([str(tmp_path / "clean")], 1)
    assert not {"y", "e", "s", "7"} & set(vocab)


@pytest.mark.parametrize("task, faults", [("vqa", VQA_FAULTS), ("retrieval", RETRIEVAL_FAULTS)])
def test_finetuning_and_evaluation_skip_and_count_what_inspect_reports(tmp_path, capsys, task, faults):
    shards, expected, _ = faulty_split(tmp_path, task, faults)
    run = tmp_path / "run"
    sets = [f"--set={s}" for s in (*FAST, f"task.train.shards=[{shards}]", f"task.eval_shards=[{shards}]")]
    assert main(["finetune", "--config", f"finetune/{task}_debug", "--run-dir", str(run), "--no-progress",
                 *sets]) == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = {}
    for r in records:
        for reason, n in r.get("skipped_samples", {}).get(task, {}).items():
            trained[reason] = trained.get(reason, 0) + n
    assert trained and set(trained) <= set(expected), trained  # the resampled stream met some of them
    results = json.loads((run / "results.json").read_text())
    assert results["skipped_samples"] == expected  # evaluation reads every sample once
    assert inspect_shards([str(shards)], kind=task)["skipped"] == expected


def test_inspect_reports_what_training_skips_and_not_what_it_never_reads(tmp_path):
    """Before: inspect never reported missing_field or empty_text, and flagged bad_json in a
    field the stream never reads."""
    good = bundled("image_text/train", 6)
    samples = [*good,
               {"__key__": "no-text", "png": good[0]["png"]},
               {"__key__": "blank-text", "png": good[0]["png"], "txt": b"  \n "},
               {**good[1], "__key__": "unread-json", "json": b"{not json"}]
    shards = tmp_path / "image_text"
    write_tar(shards / "x-000000.tar", samples)
    report = inspect_shards([str(shards)], kind="image_text")
    assert report["skipped"] == {"empty_text": 1, "missing_field": 1}
    assert report["samples"] == 9 and report["kind"] == "image_text"
    # the kind comes from the manifest of shards written by write-shards
    assert inspect_shards([str(data_path("bundled:vqa/val"))])["kind"] == "vqa"


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_a_duplicate_field_skips_its_sample_and_a_truncated_tar_counts_once(tmp_path):
    """Before: a duplicate member counted as truncated_tar, a truncated tar twice, and a tar cut
    at a member boundary lost its later samples without a count."""
    with tarfile.open(tmp_path / "dup.tar", "w") as tar:
        for key in "abc":
            _member(tar, f"{key}.txt", f"text {key}".encode())
            if key == "b":
                _member(tar, "b.txt", b"which one?")
    skips = SkipCounter()
    assert [s["__key__"] for s in tar_samples([str(tmp_path / "dup.tar")], skips)] == ["a", "c"]
    assert dict(skips.counts) == {"duplicate_field": 1}

    with tarfile.open(tmp_path / "whole.tar", "w") as tar:
        for i in range(10):
            _member(tar, f"k{i}.txt", bytes(1500))  # 512 header + 1536 data bytes each
    whole = (tmp_path / "whole.tar").read_bytes()
    # cut in k4's data (k0-k3 kept), after k3 or in k4's header (k3 may have had more fields: k0-k2 kept)
    for cut, kept in [(2048 * 4 + 700, 4), (2048 * 4, 3), (2048 * 4 + 100, 3)]:
        (tmp_path / "cut.tar").write_bytes(whole[:cut])
        skips = SkipCounter()
        assert len(list(tar_samples([str(tmp_path / "cut.tar")], skips))) == kept, cut
        assert dict(skips.counts) == {"truncated_tar": 1}, cut
    skips = SkipCounter()
    assert len(list(tar_samples([str(tmp_path / "whole.tar")], skips))) == 10 and not skips.counts


@pytest.mark.parametrize("fmt", ["PPM", "TGA", "ICO", "EPS", "PCX", "SGI"])
def test_only_the_documented_image_formats_are_decoded(fmt, monkeypatch):
    from PIL import EpsImagePlugin

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: pytest.fail("Ghostscript was run"))
    data = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(data, format=fmt)
    with pytest.raises(SkipSample, match="corrupt_image: not a JPEG, PNG, WEBP, GIF, BMP or TIFF image"):
        decode_image(data.getvalue())


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_the_documented_image_formats_decode(fmt):
    data = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(data, format=fmt)
    assert decode_image(data.getvalue()).size == (16, 16)


def test_a_csv_row_without_a_caption_is_an_error_naming_its_line(tmp_path, capsys):
    """Before: it became the caption "None"."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "pairs.csv").write_text("image,caption\na.png,a black square\na.png\n")
    code = main(["data", "write-shards", "image_text", str(tmp_path / "pairs.csv"), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "pairs.csv:3: record lacks ['caption'] (absent, null or an empty trailing CSV cell)" in \
        capsys.readouterr().err


def test_what_write_shards_writes_for_vqa_training_reads(tmp_path, capsys):
    """A null question_type (common in VQA dumps) is written as "", and every written record is
    read by training and inspect; an id that is neither an integer nor a string stops the
    writer at its line (before: written, then skipped by the typed reader)."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    rows = [{"image": "a.png", "question": "what?", "answers": ["one"] * 10, "question_type": None},
            {"image": "a.png", "question": "and?", "answers": ["two"] * 10, "question_id": "q-7"}]
    (tmp_path / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["data", "write-shards", "vqa", str(tmp_path / "vqa.jsonl"), "--out", str(tmp_path / "out")]) == 0
    report = inspect_shards([str(tmp_path / "out")])
    assert report["kind"] == "vqa" and report["samples"] == 1 and report["skipped"] == {}  # one image, 2 questions
    (tmp_path / "bad.jsonl").write_text(json.dumps({**rows[0], "question_id": 3.0}) + "\n")
    assert main(["data", "write-shards", "vqa", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "bad")]) == 2
    assert "bad.jsonl:1: question_id must be an integer or a string, got 3.0" in capsys.readouterr().err


def test_a_caption_without_tokens_does_not_drop_its_image():
    """Evaluation and inspect read every caption, training draws one: a caption that tokenises to
    nothing (a zero-width space) is left out of both, so both keep the image for its other ones."""
    from data_pipelines.images import eval_transform
    from data_pipelines.processors import RetrievalProcessor
    from data_pipelines.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(data_path("bundled:tokenizer.model"))
    sample = with_json(bundled("retrieval/train", 1)[0], "x", {"image_id": "x", "captions": ["\u200b", "a cat"]})
    for all_captions in (True, False):
        for seed in range(4):
            seqs = RetrievalProcessor(tokenizer, eval_transform(16), all_captions=all_captions)(sample, seed)[3]
            assert len(seqs) == 1 and len(seqs[0]) > 2
