"""Tokenizer layouts (trained on the fly on CPython's pydoc topics), MLM masking, document packing."""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterable, Iterator
from pydoc_data.topics import topics

import pytest
import sentencepiece as spm
import torch

from data_pipelines.skips import SkipSample
from data_pipelines.text import IMAGE_TEXT_MASK_RATIO, TEXT_MASK_RATIO, TokenPacker, mask_tokens
from data_pipelines.tokenizer import Tokenizer, train_tokenizer

CORPUS = [line.strip() for text in topics.values() for line in text.splitlines() if line.strip()][:600]
VOCAB = 800
SENTENCES = [
    "The for statement is used to iterate over the elements of a sequence.",
    "Assignment statements are used to (re)bind names to values.",
    "x = [i ** 2 for i in range(10) if i % 3]",
    "zebra quokka xylophone",
    "naïve 日本語 text ☃ with characters the corpus never saw",
]
NEVER_SEEN = "日本語☃"


@pytest.fixture(scope="module")
def beit3_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("spm") / "beit3.model"
    train_tokenizer(CORPUS, path, vocab_size=VOCAB)
    return path


@pytest.fixture(scope="module")
def xlmr_path(tmp_path_factory):
    """A stock-layout model standing in for the official beit3.spm."""
    path = tmp_path_factory.mktemp("spm") / "stock.spm"
    train_tokenizer(CORPUS, path, vocab_size=VOCAB, layout="xlmr")
    return path


@pytest.fixture(scope="module")
def beit3(beit3_path):
    return Tokenizer.load(beit3_path, layout="beit3")


@pytest.fixture(scope="module")
def xlmr(xlmr_path):
    return Tokenizer.load(xlmr_path, layout="xlmr")


def normalized(text: str) -> str:
    """What a default sentencepiece model gives back: whitespace runs collapsed, ends stripped."""
    return " ".join(text.split())


# --- tokenizer: beit3 layout ---------------------------------------------------------------------


def test_beit3_layout_ids(beit3):
    sp = beit3.sp
    assert [sp.id_to_piece(i) for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert (beit3.bos_id, beit3.pad_id, beit3.eos_id, beit3.unk_id) == (0, 1, 2, 3)
    assert beit3.mask_id == sp.piece_to_id("<mask>") == 4
    assert beit3.vocab_size == len(sp) == VOCAB


def test_beit3_round_trip_and_no_special_ids(beit3):
    for sentence in SENTENCES[:4] + CORPUS[:50]:
        ids = beit3.encode(sentence)
        assert ids and all(4 < i < beit3.vocab_size for i in ids), sentence
        assert beit3.decode(ids) == normalized(sentence)


def test_literal_special_text_never_becomes_a_special_id(beit3, xlmr):
    for tok in (beit3, xlmr):
        ids = tok.encode("fill the <mask> here <s> and </s> <pad>")
        assert tok.mask_id not in ids and not {0, 1, 2} & set(ids)


def test_decode_drops_specials_keeps_unk(beit3):
    ids = beit3.encode(SENTENCES[0])
    padded = [beit3.bos_id, *ids[:3], beit3.mask_id, *ids[3:], beit3.eos_id, beit3.pad_id, beit3.pad_id]
    assert beit3.decode(padded) == beit3.decode(ids) == SENTENCES[0]
    assert "⁇" in beit3.decode(beit3.encode(NEVER_SEEN))
    assert beit3.decode(torch.tensor(ids)) == SENTENCES[0]
    with pytest.raises(ValueError, match="outside this tokenizer's vocabulary"):
        beit3.decode([beit3.vocab_size])


def test_encode_for_model_bos_eos_and_truncation(beit3):
    text = " ".join(CORPUS[:5])
    ids = beit3.encode(text)
    assert len(ids) > 40
    assert beit3.encode_for_model(text, 32) == [0, *ids[:30], 2]
    assert len(beit3.encode_for_model(text, 32)) == 32
    assert beit3.encode_for_model("for", 32) == [0, *beit3.encode("for"), 2]
    assert beit3.encode_for_model(text.encode("utf-8"), 16) == beit3.encode_for_model(text, 16)
    with pytest.raises(ValueError, match="max_len >= 3"):
        beit3.encode_for_model(text, 2)


@pytest.mark.parametrize("layout", ["beit3", "xlmr"])
@pytest.mark.parametrize("max_len", [3, 8, 64])
def test_encode_for_model_of_long_documents_reads_only_a_prefix_with_the_same_pieces(request, layout, max_len):
    tok = request.getfixturevalue(layout)
    documents = [" ".join(CORPUS), "".join(CORPUS), "\n" * 5000 + " ".join(CORPUS[::-1]),
                 "ab" * 20000, "日本語のテキスト" * 3000]
    for doc in documents:
        assert tok.encode_for_model(doc, max_len) == [0, *tok.encode(doc)[: max_len - 2], 2]


@pytest.mark.parametrize("layout", ["beit3", "xlmr"])
@pytest.mark.parametrize("data", [b"caf\xe9", b"\xff\xfe", b"ok \xc3"])
def test_bad_utf8_is_skipped(request, layout, data):
    tok = request.getfixturevalue(layout)
    with pytest.raises(SkipSample) as info:
        tok.encode_for_model(data, 16)
    assert info.value.reason == "bad_utf8"


@pytest.mark.parametrize("layout", ["beit3", "xlmr"])
@pytest.mark.parametrize("text", ["", "   \n\t ", b"", b"  "])
def test_empty_text_is_skipped(request, layout, text):
    tok = request.getfixturevalue(layout)
    with pytest.raises(SkipSample) as info:
        tok.encode_for_model(text, 16)
    assert info.value.reason == "empty_text"


# --- tokenizer: xlmr layout ----------------------------------------------------------------------


def xlmr_oracle(sp: spm.SentencePieceProcessor, text: str) -> list[int]:
    """fairseq/HF XLMRobertaTokenizer ids written from the rule: unk -> 3, other spm ids + 1."""
    return [3 if i == 0 else i + 1 for i in sp.encode(text)]


def test_xlmr_ids_match_the_fairseq_rule(xlmr):
    sp = xlmr.sp
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    seen_unk = False
    for sentence in SENTENCES + CORPUS[:50]:
        expected = xlmr_oracle(sp, sentence)
        assert xlmr.encode(sentence) == expected, sentence
        assert xlmr.encode_for_model(sentence, 512) == [0, *expected, 2]
        seen_unk |= 3 in expected
    assert seen_unk, "no sentence exercised the unk mapping"
    assert xlmr.mask_id == len(sp) + 1
    assert xlmr.vocab_size == len(sp) + 2 == VOCAB + 2


def test_xlmr_decode_inverts_the_offset(xlmr):
    sp = xlmr.sp
    for spm_id in range(3, len(sp), 37):
        assert xlmr.decode([spm_id + 1]) == sp.decode([spm_id])
    for sentence in SENTENCES[:4]:
        ids = xlmr.encode(sentence)
        assert xlmr.decode([0, *ids, xlmr.mask_id, 2, 1, 1]) == normalized(sentence)
    assert xlmr.decode([3]) == sp.decode([0])
    with pytest.raises(ValueError, match="outside"):
        xlmr.decode([xlmr.vocab_size])


# --- tokenizer: loading, layout detection, training ------------------------------------------------


def test_auto_detects_both_layouts(beit3_path, xlmr_path):
    assert Tokenizer.load(beit3_path).layout == "beit3"
    assert Tokenizer.load(xlmr_path).layout == "xlmr"
    with pytest.raises(ValueError, match="does not have the xlmr layout"):
        Tokenizer.load(beit3_path, layout="xlmr")
    with pytest.raises(ValueError, match="does not have the beit3 layout"):
        Tokenizer.load(xlmr_path, layout="beit3")


def _train_raw(path, **ids):
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=proto, vocab_size=300,
                                   model_type="bpe", minloglevel=2, **ids)
    path.write_bytes(proto.getvalue())
    return path


@pytest.mark.parametrize("ids", [
    dict(bos_id=0, eos_id=1, unk_id=2, pad_id=-1),
    dict(bos_id=0, pad_id=1, eos_id=2, unk_id=3),  # beit3 ids but no <mask>
], ids=["other_order", "no_mask"])
def test_auto_rejects_a_model_in_neither_layout(tmp_path, ids):
    path = _train_raw(tmp_path / "odd.model", **ids)
    with pytest.raises(ValueError, match="neither tokenizer layout"):
        Tokenizer.load(path)


def test_load_missing_or_corrupt_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no sentencepiece model"):
        Tokenizer.load(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        Tokenizer.load(tmp_path / "junk.model")
    with pytest.raises(ValueError, match="unknown tokenizer layout 'bert'"):
        Tokenizer.load(tmp_path / "missing.model", layout="bert")


def test_train_refuses_to_overwrite(tmp_path):
    path = tmp_path / "tok.model"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        train_tokenizer(CORPUS[:200], path, vocab_size=300)
    assert path.read_bytes() == b"precious"
    tok = train_tokenizer(CORPUS[:200], path, vocab_size=300, overwrite=True)
    assert Tokenizer.load(path).sp.serialized_model_proto() == tok.sp.serialized_model_proto()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok.model"]


def test_train_unigram_and_too_large_vocab(tmp_path):
    tok = train_tokenizer(CORPUS[:300], tmp_path / "uni.model", vocab_size=400, model_type="unigram")
    assert tok.layout == "beit3" and tok.vocab_size == 400 and tok.mask_id == 4
    assert tok.decode(tok.encode(SENTENCES[0])) == SENTENCES[0]
    with pytest.raises(ValueError, match="vocab_size=100000 is more than this corpus supports"):
        train_tokenizer(CORPUS[:50], tmp_path / "big.model", vocab_size=100_000)
    assert not (tmp_path / "big.model").exists()


# --- masking -------------------------------------------------------------------------------------


def random_batch(batch: int, length: int, vocab: int, seed: int = 0):
    """Rows [bos, tokens..., eos, pad...] of random lengths 0..length-2, with some specials inside."""
    g = torch.Generator().manual_seed(seed)
    lengths_B = torch.randint(0, length - 1, (batch,), generator=g)
    ids_BL = torch.randint(5, vocab, (batch, length), generator=g)
    ids_BL[torch.rand(batch, length, generator=g) < 0.05] = 3  # <unk> inside text is never chosen
    pos_BL = torch.arange(length)[None, :]
    ids_BL[:, 0] = 0
    ids_BL[pos_BL == lengths_B[:, None] + 1] = 2
    padding_mask_BL = pos_BL > lengths_B[:, None] + 1
    ids_BL[padding_mask_BL] = 1
    return ids_BL, padding_mask_BL


def expected_count(n: int, ratio: float) -> int:
    return max(1, round(n * ratio)) if n > 0 and ratio > 0 else 0


@pytest.mark.parametrize("ratio", [TEXT_MASK_RATIO, IMAGE_TEXT_MASK_RATIO, 0.0, 1.0])
def test_mask_counts_positions_and_labels(ratio):
    vocab, mask_id = 1000, 4
    ids_BL, padding_mask_BL = random_batch(256, 40, vocab)
    g = torch.Generator().manual_seed(1)
    input_ids_BL, labels_BL = mask_tokens(ids_BL, padding_mask_BL, ratio=ratio, mask_id=mask_id,
                                          vocab_size=vocab, generator=g)
    chosen_BL = labels_BL != -100
    maskable_BL = ~padding_mask_BL & (ids_BL > 3)
    for row in range(ids_BL.shape[0]):
        assert chosen_BL[row].sum().item() == expected_count(maskable_BL[row].sum().item(), ratio)
    assert not (chosen_BL & ~maskable_BL).any(), "a pad or special position was chosen"
    assert torch.equal(labels_BL[chosen_BL], ids_BL[chosen_BL])
    assert torch.equal(input_ids_BL[~chosen_BL], ids_BL[~chosen_BL])
    assert (labels_BL[~chosen_BL] == -100).all()


def test_mask_small_rows_get_at_least_one_and_empty_rows_none():
    ids_BL = torch.tensor([[0, 7, 8, 2, 1], [0, 2, 1, 1, 1], [0, 9, 3, 2, 1]])
    g = torch.Generator().manual_seed(0)
    _, labels_BL = mask_tokens(ids_BL, ids_BL == 1, ratio=0.15, mask_id=4, vocab_size=20, generator=g)
    assert (labels_BL != -100).sum(dim=1).tolist() == [1, 0, 1]
    assert labels_BL[2].tolist() == [-100, 9, -100, -100, -100]


def test_mask_replacement_proportions():
    vocab, mask_id = 1000, 4
    ids_BL, padding_mask_BL = random_batch(2000, 64, vocab, seed=3)
    g = torch.Generator().manual_seed(2)
    input_ids_BL, labels_BL = mask_tokens(ids_BL, padding_mask_BL, ratio=0.5, mask_id=mask_id,
                                          vocab_size=vocab, generator=g)
    chosen_BL = labels_BL != -100
    corrupted = input_ids_BL[chosen_BL]
    original = ids_BL[chosen_BL]
    n = corrupted.numel()
    assert n > 20_000
    as_mask = (corrupted == mask_id).float().mean().item()
    kept = (corrupted == original).float().mean().item()
    randomised = ((corrupted != mask_id) & (corrupted != original)).float().mean().item()
    assert as_mask == pytest.approx(0.8, abs=0.015)
    assert kept == pytest.approx(0.1, abs=0.01)
    assert randomised == pytest.approx(0.1, abs=0.01)


@pytest.mark.parametrize("mask_id", [4, 11], ids=["beit3_mask", "xlmr_mask_last"])
def test_mask_random_ids_are_never_special_or_mask(mask_id):
    vocab = 12
    ids_BL = torch.full((400, 32), 6)
    ids_BL[:, 0], ids_BL[:, -1] = 0, 2
    g = torch.Generator().manual_seed(0)
    input_ids_BL, labels_BL = mask_tokens(ids_BL, torch.zeros_like(ids_BL, dtype=torch.bool), ratio=1.0,
                                          mask_id=mask_id, vocab_size=vocab, generator=g)
    random_ids = input_ids_BL[(labels_BL != -100) & (input_ids_BL != mask_id) & (input_ids_BL != 6)]
    allowed = set(range(4, vocab)) - {mask_id, 6}
    assert set(random_ids.tolist()) == allowed, "random replacements are not drawn from all non-special ids"


def test_mask_random_draw_excludes_mask_id():
    # vocab 7 with mask 4 leaves {5, 6} to draw from: a random replacement of a 6 is a 5 half the
    # time, so 5s make 5% of the chosen positions and masks 80%; drawing from {4, 5, 6} would give
    # 3.3% and 83.3%.
    ids_BL = torch.full((1000, 20), 6)
    g = torch.Generator().manual_seed(0)
    input_ids_BL, labels_BL = mask_tokens(ids_BL, torch.zeros_like(ids_BL, dtype=torch.bool), ratio=1.0,
                                          mask_id=4, vocab_size=7, generator=g)
    assert (labels_BL == 6).all()
    assert (input_ids_BL == 4).float().mean().item() == pytest.approx(0.8, abs=0.01)
    assert (input_ids_BL == 5).float().mean().item() == pytest.approx(0.05, abs=0.006)


def test_mask_chooses_positions_uniformly():
    ids_BL = torch.tensor([[0, *range(10, 20), 2]]).repeat(5000, 1)
    g = torch.Generator().manual_seed(0)
    _, labels_BL = mask_tokens(ids_BL, torch.zeros_like(ids_BL, dtype=torch.bool), ratio=0.3, mask_id=4,
                               vocab_size=30, generator=g)
    rate_L = (labels_BL != -100).float().mean(dim=0)
    assert rate_L[0] == rate_L[-1] == 0
    assert torch.allclose(rate_L[1:-1], torch.full((10,), 0.3), atol=0.03)


def test_mask_is_deterministic_given_the_seed():
    ids_BL, padding_mask_BL = random_batch(64, 32, 500)
    kw = dict(ratio=TEXT_MASK_RATIO, mask_id=4, vocab_size=500)
    a = mask_tokens(ids_BL, padding_mask_BL, generator=torch.Generator().manual_seed(7), **kw)
    b = mask_tokens(ids_BL, padding_mask_BL, generator=torch.Generator().manual_seed(7), **kw)
    c = mask_tokens(ids_BL, padding_mask_BL, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_mask_with_a_real_tokenizer(xlmr):
    rows = [xlmr.encode_for_model(s, 24) for s in SENTENCES]
    length = max(map(len, rows))
    ids_BL = torch.tensor([r + [xlmr.pad_id] * (length - len(r)) for r in rows])
    g = torch.Generator().manual_seed(0)
    input_ids_BL, labels_BL = mask_tokens(ids_BL, ids_BL == xlmr.pad_id, ratio=IMAGE_TEXT_MASK_RATIO,
                                          mask_id=xlmr.mask_id, vocab_size=xlmr.vocab_size, generator=g)
    assert (input_ids_BL < xlmr.vocab_size).all()
    assert (labels_BL[:, 0] == -100).all()


@pytest.mark.parametrize("kw, match", [
    (dict(ratio=1.5), "outside"),
    (dict(mask_id=2), "outside special_ids"),
    (dict(mask_id=50), "vocab_size"),
])
def test_mask_rejects_bad_arguments(kw, match):
    ids_BL = torch.tensor([[0, 5, 6, 2]])
    args = dict(ratio=0.15, mask_id=4, vocab_size=10, generator=torch.Generator()) | kw
    with pytest.raises(ValueError, match=match):
        mask_tokens(ids_BL, ids_BL == 1, **args)
    with pytest.raises(ValueError, match="bool tensor"):
        mask_tokens(ids_BL, torch.zeros(1, 3, dtype=torch.bool), ratio=0.15, mask_id=4, vocab_size=10,
                    generator=torch.Generator())


# --- packing -------------------------------------------------------------------------------------


def pack_oracle(docs, seq_len, eos_id):
    stream = [t for doc in docs for t in [*doc, eos_id]]
    return [stream[i * seq_len:i * seq_len + seq_len + 1] for i in range((len(stream) - 1) // seq_len)], stream


DOC_SETS = [
    [[5, 6, 7], [8], [], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]],
    [[5]] * 7,
    [list(range(100, 137))],
    [[1]],
    [],
]


def pack_documents(docs: Iterable[list[int]], seq_len: int, eos_id: int) -> Iterator[list[int]]:
    """One packer's chunks of ``seq_len + 1`` tokens of ``doc_0 + [eos] + doc_1 + [eos] + ...``,
    read lazily: only as many documents as the chunks need."""
    packer = TokenPacker(1, seq_len)
    for index, doc in enumerate(docs):
        for rows, _, _ in packer.add(index, [*doc, eos_id]):
            yield rows[0]



@pytest.mark.parametrize("docs", DOC_SETS)
@pytest.mark.parametrize("seq_len", [1, 2, 3, 4, 8])
def test_pack_matches_oracle_and_covers_every_target_once(docs, seq_len):
    chunks = list(pack_documents(iter(docs), seq_len, eos_id=2))
    expected, stream = pack_oracle(docs, seq_len, eos_id=2)
    assert chunks == expected
    assert all(len(c) == seq_len + 1 for c in chunks)
    n = len(chunks)
    assert [t for c in chunks for t in c[1:]] == stream[1:1 + n * seq_len]
    assert [t for c in chunks for t in c[:-1]] == stream[:n * seq_len]
    untargeted_tail = len(stream) - 1 - n * seq_len
    assert untargeted_tail < seq_len or not stream, "a complete chunk was dropped"


def test_pack_is_lazy_over_endless_documents():
    chunks = list(itertools.islice(pack_documents(itertools.repeat([7, 8, 9]), 5, eos_id=2), 3))
    assert chunks == [[7, 8, 9, 2, 7, 8], [8, 9, 2, 7, 8, 9], [9, 2, 7, 8, 9, 2]]


def test_pack_with_tokenized_text(beit3):
    docs = [beit3.encode(line) for line in CORPUS[:40]]
    chunks = list(pack_documents(docs, 16, beit3.eos_id))
    expected, _ = pack_oracle(docs, 16, beit3.eos_id)
    assert chunks == expected and len(chunks) > 10


def test_pack_rejects_zero_seq_len():
    with pytest.raises(ValueError, match="seq_len >= 1"):
        list(pack_documents([[5]], 0, eos_id=2))


@pytest.mark.parametrize("batch_size,seq_len", [(1, 4), (3, 5), (2, 50)])
def test_packer_batches_are_consecutive_chunks_and_resume_exactly(batch_size, seq_len):
    docs = [[*range(100 * d, 100 * d + n), 2] for d, n in enumerate([3, 17, 1, 40, 9, 0, 64, 5, 22, 11])]
    chunks = list(pack_documents([d[:-1] for d in docs], seq_len, eos_id=2))
    packer = TokenPacker(batch_size, seq_len)
    batches = [b for i, d in enumerate(docs) for b in packer.add(i, d)]
    expected = [chunks[i:i + batch_size] for i in range(0, len(chunks) - batch_size + 1, batch_size)]
    assert [rows for rows, _, _ in batches] == expected
    for j, (_, index, offset) in enumerate(batches):  # a packer started where batch j left off continues
        resumed = TokenPacker(batch_size, seq_len, skip=offset)
        rest = [rows for i, d in enumerate(docs[index:], start=index) for rows, _, _ in resumed.add(i, d)]
        assert rest == [rows for rows, _, _ in batches[j + 1:]]
