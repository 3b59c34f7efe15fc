"""Evaluating a causal LM: perplexity and bits per byte on held-out text, and zero-shot
multiple choice by log-likelihood.

- ``perplexity``: each document is tokenised and closed with EOS, cut into windows of at most
  T + 1 tokens (no overlap); every token after a window's first is predicted from the tokens
  before it in its window. Perplexity = exp(total NLL / predicted tokens); bits per byte =
  total NLL / ln 2 / the UTF-8 bytes of the documents (tokenizer-independent). Documents that
  name their language (a ``json`` ``{"lang": ...}`` in their sample) are also scored per
  language, as MH-MoE (arXiv 2404.15045) compares its multilingual models language by language.
- ``multiple choice`` (HellaSwag / PIQA style, from a local JSONL of ``{"context", "choices",
  "label"}``): each choice is scored by the log-likelihood of its tokens after the context,
  divided by its token count (``accuracy``; ``accuracy_unnormalized`` uses the plain sum).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from data_pipelines.paths import data_path
from data_pipelines.shards import shard_urls
from data_pipelines.skips import SkipCounter, decode_json, decode_text
from data_pipelines.tars import tar_samples
from data_pipelines.tokenizer import Tokenizer
from multimodal_moe.tasks.base import batch_multiple

__all__ = ["multiple_choice", "perplexity", "read_documents", "read_documents_and_languages"]


def read_documents_and_languages(shards: Iterable[str]) -> tuple[list[str], list[str | None]]:
    """The ``txt`` field of every sample of the shard sets (``bundled:text/val`` ...) and, for
    each, the ``lang`` of its ``json`` (None without one)."""
    docs, languages = [], []
    for shard_set in shards:
        for sample in tar_samples(shard_urls(str(data_path(shard_set))), SkipCounter()):
            if "txt" in sample:
                docs.append(decode_text(sample["txt"]))
                languages.append(decode_json(sample["json"]).get("lang") if "json" in sample else None)
    return docs, languages


def read_documents(shards: Iterable[str]) -> list[str]:
    """The ``txt`` field of every sample of the shard sets."""
    return read_documents_and_languages(shards)[0]


@torch.no_grad()
def _token_logprobs(model, rows: list[list[int]], pad_id: int) -> list[torch.Tensor]:
    """For each row of ids, the log-probability of each of its tokens after the first. Padding
    is masked (so it takes no expert capacity and no share of a mixture of tokens), and rows of
    padding fill the batch up to a multiple of the model's Mixture-of-Tokens group size."""
    length, multiple = max(len(r) for r in rows), batch_multiple(model.cfg)
    ids = torch.full((-(-len(rows) // multiple) * multiple, length), pad_id, dtype=torch.long)
    padding = torch.ones(ids.shape, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        padding[i, :len(r) - 1] = False  # the inputs: every token but the last
    device = next(model.parameters()).device
    ids, padding = ids.to(device), padding.to(device)
    logp = F.log_softmax(model.logits(model(ids[:, :-1], padding[:, :-1]).hidden).float(), dim=-1)
    picked = logp.gather(2, ids[:, 1:, None]).squeeze(2).cpu()
    return [picked[i, :len(r) - 1] for i, r in enumerate(rows)]


def _scores(documents: list[str], nll: list[float], tokens: list[int]) -> dict:
    total, count = sum(nll), sum(tokens)
    n_bytes = sum(len(doc.encode("utf-8")) for doc in documents)
    return {"perplexity": math.exp(total / max(count, 1)), "bits_per_byte": total / math.log(2) / max(n_bytes, 1),
            "tokens": count, "documents": len(documents)}


@torch.no_grad()
def perplexity(model, tokenizer: Tokenizer, documents: list[str], *, seq_len: int, batch_size: int = 16,
               languages: list[str | None] | None = None) -> dict:
    """Perplexity and bits per byte of ``documents`` (see the module docstring). Given
    ``languages``, one per document (None: unknown), also ``per_language``: ``{lang: the same
    numbers over that language's documents}``, languages in the order they first occur."""
    if languages is not None and len(languages) != len(documents):
        raise ValueError(f"{len(languages)} languages for {len(documents)} documents; give one per document")
    model.eval()
    windows, owners = [], []  # every window and the index of its document
    for d, doc in enumerate(documents):
        ids = [*tokenizer.encode(doc), tokenizer.eos_id]
        for i in range(0, len(ids) - 1, seq_len):
            windows.append(ids[i:i + seq_len + 1])
            owners.append(d)
    nll, tokens = [0.0] * len(documents), [0] * len(documents)
    for start in range(0, len(windows), batch_size):
        scored = _token_logprobs(model, windows[start:start + batch_size], tokenizer.pad_id)
        for d, logp in zip(owners[start:start + batch_size], scored):
            nll[d] -= float(logp.sum())
            tokens[d] += len(logp)
    results = _scores(documents, nll, tokens)
    if languages is not None and any(languages):
        results["per_language"] = {}
        for lang in dict.fromkeys(lang for lang in languages if lang):
            picked = [d for d, other in enumerate(languages) if other == lang]
            results["per_language"][lang] = _scores([documents[d] for d in picked], [nll[d] for d in picked],
                                                    [tokens[d] for d in picked])
    return results


@torch.no_grad()
def multiple_choice(model, tokenizer: Tokenizer, path: str | Path) -> dict:
    """Zero-shot accuracy on a JSONL of ``{"context": str, "choices": [str, ...], "label": int}``."""
    model.eval()
    correct = correct_sum = total = 0
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            context, choices, label = item["context"], list(item["choices"]), int(item["label"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{n}: expected {{\"context\", \"choices\", \"label\"}} ({e})") from None
        if not 0 <= label < len(choices):
            raise ValueError(f"{path}:{n}: label {label} is not an index of its {len(choices)} choices")
        prefix = [tokenizer.bos_id, *tokenizer.encode(context)]
        rows = [prefix + tokenizer.encode(choice) for choice in choices]
        scores = [logp[len(prefix) - 1:] for logp in _token_logprobs(model, rows, tokenizer.pad_id)]
        normalized = [float(s.sum()) / max(len(s), 1) for s in scores]
        summed = [float(s.sum()) for s in scores]
        correct += max(range(len(choices)), key=normalized.__getitem__) == label
        correct_sum += max(range(len(choices)), key=summed.__getitem__) == label
        total += 1
    return {"accuracy": 100 * correct / max(total, 1), "accuracy_unnormalized": 100 * correct_sum / max(total, 1),
            "questions": total}
