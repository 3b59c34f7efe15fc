"""Evaluating a causal LM: perplexity and bits per byte on held-out text, and zero-shot
multiple choice by log-likelihood.

- ``perplexity``: each document is tokenised and closed with EOS, cut into windows of at most
  T + 1 tokens (no overlap); every token after a window's first is predicted from the tokens
  before it in its window. Perplexity = exp(total NLL / predicted tokens); bits per byte =
  total NLL / ln 2 / the UTF-8 bytes of the documents (tokenizer-independent).
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

from data_pipelines.shards import shard_urls
from data_pipelines.skips import SkipCounter, decode_text
from data_pipelines.streams import tar_samples
from data_pipelines.tokenizer import Tokenizer
from multimodal_moe.layers import MixtureOfTokensConfig
from multimodal_moe.tasks.base import data_path

__all__ = ["multiple_choice", "perplexity", "read_documents"]


def read_documents(shards: Iterable[str]) -> list[str]:
    """The ``txt`` field of every sample of the shard sets (``bundled:text/val`` ...)."""
    docs = []
    for shard_set in shards:
        for sample in tar_samples(shard_urls(str(data_path(shard_set))), SkipCounter()):
            if "txt" in sample:
                docs.append(decode_text(sample["txt"]))
    return docs


def _batch_multiple(model) -> int:
    """The multiple of rows a batch of ``model`` needs: the group sizes of its Mixture-of-Tokens
    layers (1 without any)."""
    sizes = [m.cfg.group_size for m in model.modules() if isinstance(getattr(m, "cfg", None), MixtureOfTokensConfig)]
    return math.lcm(1, *sizes)


@torch.no_grad()
def _token_logprobs(model, rows: list[list[int]], pad_id: int) -> list[torch.Tensor]:
    """For each row of ids, the log-probability of each of its tokens after the first. Padding
    is masked (so it takes no expert capacity and no share of a mixture of tokens), and rows of
    padding fill the batch up to a multiple of the model's Mixture-of-Tokens group size."""
    length, multiple = max(len(r) for r in rows), _batch_multiple(model)
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


@torch.no_grad()
def perplexity(model, tokenizer: Tokenizer, documents: list[str], *, seq_len: int, batch_size: int = 16) -> dict:
    """Perplexity and bits per byte of ``documents`` (see the module docstring)."""
    model.eval()
    windows = []
    for doc in documents:
        ids = [*tokenizer.encode(doc), tokenizer.eos_id]
        windows += [ids[i:i + seq_len + 1] for i in range(0, len(ids) - 1, seq_len)]
    windows = [w for w in windows if len(w) > 1]
    nll, tokens = 0.0, 0
    for start in range(0, len(windows), batch_size):
        for logp in _token_logprobs(model, windows[start:start + batch_size], tokenizer.pad_id):
            nll -= float(logp.sum())
            tokens += len(logp)
    n_bytes = sum(len(doc.encode("utf-8")) for doc in documents)
    return {"perplexity": math.exp(nll / max(tokens, 1)), "bits_per_byte": nll / math.log(2) / max(n_bytes, 1),
            "tokens": tokens, "documents": len(documents)}


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
