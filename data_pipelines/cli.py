"""``mmoe data``: write shards, inspect them, train a tokenizer, build the bundled dataset.

    mmoe data write-shards KIND INPUT... --out DIR [--image-root DIR] [--maxcount N] [--overwrite]
        text:        .txt/.jsonl/.json files (optionally .gz/.zst) and folders of them
                     [--documents file|line|paragraph] [--text-field F] [--lang L | --lang-field F]
        image_text:  CSV/TSV, JSONL or Karpathy's dataset_coco.json / dataset_flickr30k.json
                     [--sep S] [--image-column C] [--text-column C] [--split S,...]
        retrieval:   JSONL, Karpathy's split file [--split S,...], or COCO's captions_*.json /
                     image_info_test2014.json (label-free);  image: a folder
        classification: a folder in ImageNet's layout (<folder>/<class>/<image>)
        vqa:         JSONL, or VQAv2's questions .json [--annotations F] [--image-pattern P]
    mmoe data inspect SHARDS... [--examples N]
    mmoe data train-tokenizer INPUT... --out FILE --vocab-size N [--model-type bpe|unigram]
    mmoe data train-visual-codebook SHARDS... --out FILE --patch-size P --image-size S [--codes K]
    mmoe data build-demo [--out DIR] [--overwrite] [--derived-only | --multilingual-only]

Every command shows progress on long work and refuses to overwrite output unless asked.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from .images import decode_image
from .processors import checking_processor
from .shards import IMAGE_FIELDS, KINDS, ShardSink, img2dataset_stats, read_manifest, shard_urls
from .skips import SkipCounter, SkipSample, decode_json, decode_text
from .sources import SOURCES
from .text_sources import DOCUMENTS
from .tars import shard_texts, tar_samples


# write-shards flags that set a keyword argument of the kind's source (None: not given, so the source's default)
SOURCE_OPTIONS = {"documents": "--documents", "text_field": "--text-field", "lang": "--lang",
                  "lang_field": "--lang-field", "sep": "--sep", "image_column": "--image-column",
                  "text_column": "--text-column", "splits": "--split", "annotations": "--annotations",
                  "image_pattern": "--image-pattern"}


def _source_options(args: argparse.Namespace, source) -> dict:
    """The keyword arguments the given flags set; a flag the kind's source has no use for is an error."""
    given = {name: getattr(args, name) for name in SOURCE_OPTIONS if getattr(args, name) is not None}
    unused = [SOURCE_OPTIONS[name] for name in given if name not in inspect.signature(source).parameters]
    if unused:
        raise ValueError(f"{', '.join(unused)}: not an option of {args.kind} shards (see mmoe data write-shards -h)")
    return given


def cmd_write_shards(args: argparse.Namespace) -> int:
    source, _ = SOURCES[args.kind]
    options = _source_options(args, source)
    if args.kind == "text":
        samples = source(args.inputs, **options)
    elif args.kind in ("image", "classification"):
        if len(args.inputs) != 1:
            raise ValueError(f"{args.kind} shards are written from one folder")
        samples = source(args.inputs[0])
    else:
        if len(args.inputs) != 1:
            raise ValueError(f"{args.kind} shards are written from one record file")
        samples = source(args.inputs[0], args.image_root, **options)
    with ShardSink(args.out, args.kind, prefix=args.prefix, maxcount=args.maxcount, maxsize=args.maxsize,
                   overwrite=args.overwrite) as sink:
        for key, fields in tqdm(samples, desc=f"write {args.kind} shards", unit="sample", file=sys.stderr):
            sink.write(key, fields)
    manifest = read_manifest(args.out)
    print(f"wrote {manifest['samples']} {args.kind} samples in {manifest['shards']} shard(s) to {args.out}")
    return 0


WRITE_SHARDS_EXAMPLES = r"""examples:
  # text: JSONL.gz (each record's "text"); a folder of .txt, one document per paragraph
  mmoe data write-shards text wiki.jsonl.gz --out shards/wiki
  mmoe data write-shards text books/ --documents paragraph --out shards/books
  # open_clip's CSV: filepath<TAB>title
  mmoe data write-shards image_text train.csv --sep '\t' --image-column filepath --text-column title --out shards/cc
  # Karpathy's COCO split file: the retrieval test split; train+restval as caption pairs (one per
  # caption: each image's bytes are stored once per caption). --image-root holds train2014/, val2014/
  mmoe data write-shards retrieval dataset_coco.json --split test --image-root coco --out shards/coco_test
  mmoe data write-shards image_text dataset_coco.json --split train,restval --image-root coco --out shards/coco_pairs
  # COCO's test images for the caption server (no captions: captioned by mmoe evaluate --predict)
  mmoe data write-shards retrieval image_info_test2014.json --image-root coco/test2014 --out shards/coco_test2014
"""


def _manifest_kind(spec: list[str]) -> str | None:
    """The one kind the manifests of ``spec``'s shard directories declare, if they all do."""
    kinds = set()
    for item in spec:
        if not (Path(item) / "manifest.json").is_file():
            return None
        kinds.add(read_manifest(item).get("kind"))
    if len(kinds) > 1:
        raise ValueError(f"the shard directories hold different kinds ({', '.join(sorted(map(str, kinds)))}); "
                         f"inspect one kind at a time or pass --kind")
    return kinds.pop() if kinds else None


def _shown(sample: dict, names: list[str]) -> dict:
    """A sample's fields for display: image sizes, texts cut at 120 characters."""
    example = {"key": sample["__key__"]}
    for name in names:
        try:
            if name.rsplit(".", 1)[-1] in IMAGE_FIELDS:  # nlvr2's left.png too
                image = decode_image(sample[name])
                example[name] = f"{image.width}x{image.height} {image.mode}"
            elif name in ("txt", "json"):
                text = decode_text(sample[name])
                example[name] = text if len(text) <= 120 else text[:117] + "..."
        except SkipSample as skip:
            example[name] = f"<{skip.reason}>"
    return example


def inspect_shards(spec: list[str], examples: int = 3, *, kind: str | None = None,
                   tokenizer: str | None = None) -> dict:
    """Counts per field and per skip reason over every sample, and a few decoded examples.

    With a ``kind`` (default: the one the shard directories' manifests declare) each sample goes
    through the processor that kind trains with, so ``skipped`` is exactly what training would
    skip (fields it does not read are not checked); without one, every image, text and JSON
    field is decoded. ``tokenizer``: the ``.model`` training uses (default: the bundled one).
    ``img2dataset``: what img2dataset's ``*_stats.json`` beside the tars say it downloaded and
    lost (:func:`~data_pipelines.shards.img2dataset_stats`), None without them.
    """
    urls = shard_urls(spec)
    kind = kind or _manifest_kind(spec)
    check = None
    if kind is not None:
        from .tokenizer import Tokenizer

        check = checking_processor(kind, Tokenizer.load(tokenizer or Path(__file__).parent / "bundled" /
                                                        "tokenizer.model"))
    skips, fields, shown = SkipCounter(log_interval=float("inf")), Counter(), []
    total = 0
    for sample in tqdm(tar_samples(urls, skips), desc="inspect", unit="sample", file=sys.stderr):
        total += 1
        names = [k for k in sample if not k.startswith("__")]
        fields.update(names)
        try:
            if check is not None:
                check(sample, 0)
            else:
                for name in names:
                    if name in IMAGE_FIELDS:
                        decode_image(sample[name])
                    elif name == "txt":
                        decode_text(sample[name])
                    elif name == "json":
                        decode_json(sample[name])
        except SkipSample as skip:
            skips.add(skip)
            continue
        if len(shown) < examples:
            shown.append(_shown(sample, names))
    return {"shards": len(urls), "kind": kind, "samples": total, "fields": dict(sorted(fields.items())),
            "skipped": dict(sorted(skips.counts.items())), "examples": shown, "img2dataset": img2dataset_stats(urls)}


def cmd_inspect(args: argparse.Namespace) -> int:
    report = inspect_shards(args.shards, args.examples, kind=args.kind, tokenizer=args.tokenizer)
    checked = f"checked as {report['kind']} shards, as training reads them" if report["kind"] else \
        "no kind given or in a manifest: every image, txt and json field decoded"
    print(f"{report['samples']} samples in {report['shards']} shard(s); {checked}")
    print("fields:  " + ", ".join(f"{k} {v}" for k, v in report["fields"].items()))
    print("skipped: " + (", ".join(f"{k} {v}" for k, v in report["skipped"].items()) or "none"))
    if (stats := report["img2dataset"]) is not None:
        print(f"img2dataset: {stats['successes']} of {stats['count']} samples downloaded into the {stats['shards']} "
              f"shard(s) with stats (failed_to_download {stats['failed_to_download']}, failed_to_resize "
              f"{stats['failed_to_resize']}); status: " + ", ".join(f"{k} {v}" for k, v in stats["status"].items()))
        if stats["unreadable"]:
            print("  stats that do not parse: " + ", ".join(stats["unreadable"]))
        if report["kind"] is None:
            print("  img2dataset writes image_text shards: --kind image_text checks them as training reads them")
    for example in report["examples"]:
        print("  " + json.dumps(example, ensure_ascii=False))
    return 0


def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from .tokenizer import train_tokenizer

    texts = list(tqdm(shard_texts(args.inputs), desc="read text", unit="doc", file=sys.stderr))
    tok = train_tokenizer(texts, args.out, vocab_size=args.vocab_size, model_type=args.model_type,
                          overwrite=args.overwrite)
    print(f"wrote {args.out}: {tok}")
    return 0


def cmd_train_visual_codebook(args: argparse.Namespace) -> int:
    from multimodal_moe.tasks.visual_codebook import codebook_from_shards

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    codebook = codebook_from_shards(args.shards, image_size=args.image_size, patch_size=args.patch_size,
                                    codes=args.codes, patches=args.patches, iterations=args.iterations,
                                    seed=args.seed, workers=args.workers)
    codebook.save(out)
    print(f"wrote {out}: {args.codes} codes of {args.patch_size}x{args.patch_size} patches from {args.patches} "
          f"patches of {args.shards}")
    return 0


def cmd_build_demo(args: argparse.Namespace) -> int:
    from .recipes.build_demo import build_demo, build_derived, build_multilingual

    build = build_derived if args.derived_only else build_multilingual if args.multilingual_only else build_demo
    counts = build(args.out, overwrite=args.overwrite)
    print(json.dumps(counts, indent=1))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``data`` and its subcommands on the ``mmoe`` parser."""
    data = sub.add_parser("data", help="write, inspect and tokenize webdataset shards; build the bundled dataset")
    cmds = data.add_subparsers(dest="data_command", required=True)

    w = cmds.add_parser("write-shards", help="webdataset shards from images, caption pairs, text, VQA or "
                                             "retrieval records", epilog=WRITE_SHARDS_EXAMPLES,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    w.add_argument("kind", choices=KINDS)
    w.add_argument("inputs", nargs="+", help="; ".join(f"{k}: {d}" for k, (_, d) in SOURCES.items()))
    w.add_argument("--out", required=True)
    w.add_argument("--image-root", default=None, help="folder the records' image paths are relative to "
                                                      "(default: the record file's folder; Karpathy's COCO file: "
                                                      "the folder holding train2014/ and val2014/)")
    w.add_argument("--documents", choices=DOCUMENTS, default=None,
                   help="text: how a .txt file splits into documents: the whole file (default), each non-empty "
                        "line, or each paragraph between blank lines; a JSONL record is always one. BEiT-3's "
                        "masked LM reads each document's first max_len tokens: give it lines or paragraphs")
    w.add_argument("--file-per-document", dest="documents", action="store_const", const="file",
                   help="text: the same as --documents file, the default")
    w.add_argument("--text-field", default=None, help="text: the JSONL records' field holding the document "
                                                      "(default: text)")
    w.add_argument("--lang", default=None, help="text: the documents' language, kept as json {\"lang\": ...} "
                                                "(mmoe evaluate reports an LM's perplexity per language)")
    w.add_argument("--lang-field", default=None, help="text: the JSONL records' field holding each one's language "
                                                      "(instead of --lang)")
    w.add_argument("--sep", default=None, help="image_text: the CSV/TSV separator, one character or \\t for TAB "
                                               "(default: , for .csv, TAB for .tsv; given, any file is a table)")
    w.add_argument("--image-column", default=None, help="image_text: the CSV column / JSONL key holding the image "
                                                        "path (default: image)")
    w.add_argument("--text-column", default=None, help="image_text: the CSV column / JSONL key holding the "
                                                       "caption (default: caption)")
    w.add_argument("--split", dest="splits", default=None,
                   help="image_text, retrieval from Karpathy's split file: the splits to write, comma-separated, "
                        "e.g. train,restval (default: all; the count per split is printed)")
    w.add_argument("--annotations", default=None, help="vqa from VQAv2's questions .json: its answers, "
                                                       "v2_mscoco_<split>_annotations.json (none for test splits)")
    w.add_argument("--image-pattern", default=None, help="vqa from VQAv2's questions .json: image path under "
                                                         "--image-root (default {folder}/COCO_{folder}_"
                                                         "{image_id:012d}.jpg, folder test2015 for test-dev2015)")
    w.add_argument("--prefix", default="shard")
    w.add_argument("--maxcount", type=int, default=10_000, help="samples per shard")
    w.add_argument("--maxsize", type=int, default=1 << 30, help="bytes per shard")
    w.add_argument("--overwrite", action="store_true")
    w.set_defaults(run=cmd_write_shards)

    i = cmds.add_parser("inspect", help="counts per field and per skip reason, and a few decoded examples")
    i.add_argument("shards", nargs="+", help="shard directories, tars or brace patterns")
    i.add_argument("--examples", type=int, default=3)
    i.add_argument("--kind", choices=KINDS, default=None,
                   help="check the samples as training reads this kind (default: the kind in the shard "
                        "directories' manifest.json; without either, decode every field)")
    i.add_argument("--tokenizer", default=None, help="the sentencepiece .model training uses, for empty_text "
                                                     "(default: the bundled one)")
    i.set_defaults(run=cmd_inspect)

    t = cmds.add_parser("train-tokenizer", help="a sentencepiece model in BEiT-3's id layout")
    t.add_argument("inputs", nargs="+", help="shard directories/tars (their text) or text files")
    t.add_argument("--out", required=True, help="the .model file to write")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    t.add_argument("--overwrite", action="store_true")
    t.set_defaults(run=cmd_train_tokenizer)

    c = cmds.add_parser("train-visual-codebook", help="k-means codebook of normalised image patches, the default "
                                                      "masked-image-modeling target")
    c.add_argument("shards", nargs="+", help="image or image-text shard directories, tars or brace patterns")
    c.add_argument("--out", required=True, help="the .safetensors file to write")
    c.add_argument("--codes", type=int, default=1024)
    c.add_argument("--patch-size", type=int, required=True, help="the model's patch size")
    c.add_argument("--image-size", type=int, required=True, help="the model's image size")
    c.add_argument("--patches", type=int, default=100_000, help="patches to learn from")
    c.add_argument("--iterations", type=int, default=10)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding images")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(run=cmd_train_visual_codebook)

    b = cmds.add_parser("build-demo", help="rebuild the bundled tiny dataset (needs the packages DATA.md lists)")
    b.add_argument("--out", default=str(Path(__file__).parent / "bundled"))
    b.add_argument("--overwrite", action="store_true")
    only = b.add_mutually_exclusive_group()
    only.add_argument("--derived-only", action="store_true",
                      help="only the tokenizer and visual codebook, learned from the shards already there")
    only.add_argument("--multilingual-only", action="store_true",
                      help="only the multilingual text and its tokenizer (needs unicode-cldr-core alone)")
    b.set_defaults(run=cmd_build_demo)
