"""Configs of the shard streams tasks read (and of their tokenizer), and how they become
loaders: the config side of :mod:`data_pipelines.streams`, which reads the shards."""

from __future__ import annotations

import warnings

from typing import Literal

from data_pipelines.paths import data_path
from data_pipelines.streams import Processor, ShardStream, StreamLoader
from data_pipelines.tokenizer import Tokenizer

from ..configurable import ConfigError, Configurable, config

__all__ = ["SingleStream", "StreamConfig", "TextStreamConfig", "TokenizerConfig"]


@config
class StreamConfig(Configurable):
    """One resampled shard stream.

    Attributes:
        shards: shard sets (directories, brace patterns or tar files); ``bundled:<rel>`` names
            a split of the bundled dataset, e.g. ``bundled:image/train``.
        batch_size: samples per batch on each rank.
        weights: relative sampling weight of each shard set (default: equal per shard).
        ratio: relative frequency of this stream among a task's streams (1 = every step).
        shuffle_buffer: samples in each loader worker's shuffle buffer.
    """

    shards: tuple[str, ...]
    batch_size: int = 32
    weights: tuple[float, ...] = ()
    ratio: float = 1.0
    shuffle_buffer: int = 1000

    def check(self) -> None:
        if not self.shards:
            raise ConfigError("shards", "is empty; name at least one shard directory, pattern or tar")
        if self.batch_size <= 0:
            raise ConfigError("batch_size", f"must be positive, got {self.batch_size}")
        if self.weights and (len(self.weights) != len(self.shards) or min(self.weights) < 0
                             or not sum(self.weights) > 0):
            raise ConfigError("weights", f"needs one non-negative weight per shard set ({len(self.shards)}), "
                                         f"not all zero; got {list(self.weights)}")
        if not 0 < self.ratio < float("inf"):
            raise ConfigError("ratio", f"must be positive and finite, got {self.ratio}")
        if self.shuffle_buffer < 0:
            raise ConfigError("shuffle_buffer", f"must be >= 0, got {self.shuffle_buffer}")

    def loader(self, processor: Processor, *, seed: int, num_workers: int, pin_memory: bool = False) -> StreamLoader:
        """A resumable loader of this stream's batches on this rank (``seed``: this stream's own;
        ``pin_memory``: batches in page-locked memory, for asynchronous copies to a GPU)."""
        stream = ShardStream([str(data_path(s)) for s in self.shards], processor, batch_size=self.batch_size,
                             weights=self.weights or None, shuffle_buffer=self.shuffle_buffer,
                             seed=seed)
        return StreamLoader(stream, num_workers=num_workers, pin_memory=pin_memory)


@config
class TextStreamConfig(StreamConfig):
    """A stream with text: :class:`StreamConfig` plus ``max_len``, the longest tokenised text
    (BOS and EOS included) or, for LM packing, the sequence length."""

    max_len: int = 64

    def check(self) -> None:
        StreamConfig.check(self)
        if self.max_len < 3:
            raise ConfigError("max_len", f"must be at least 3 (BOS, a token and EOS), got {self.max_len}")


@config
class TokenizerConfig(Configurable):
    """A sentencepiece model and its id layout (``data_pipelines.tokenizer``).

    Attributes:
        path: the ``.model`` file; ``bundled:tokenizer.model`` is the bundled 4096-piece one.
        layout: beit3 | xlmr (the official ``beit3.spm``) | auto (detect from the file).
    """

    path: str = "bundled:tokenizer.model"
    layout: Literal["auto", "beit3", "xlmr"] = "auto"

    def load(self, vocab_size: int | None = None) -> Tokenizer:
        """The tokenizer; with ``vocab_size`` (the model's text embedding rows), a config error
        unless every id it produces has a row, and a warning naming the rows it never produces."""
        path = data_path(self.path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer {self.path!r} not found (looked at {path})")
        tokenizer = Tokenizer.load(path, self.layout)
        if vocab_size is not None and tokenizer.vocab_size > vocab_size:
            raise ConfigError("tokenizer", f"{self.path} has {tokenizer.vocab_size} ids but the model's text "
                                           f"embedding only {vocab_size} rows; use the model's own tokenizer (for "
                                           f"converted BEiT-3 weights, beit3.spm with layout xlmr) or raise "
                                           f"model.vocab_size")
        if vocab_size is not None and tokenizer.vocab_size < vocab_size:
            warnings.warn(f"{self.path} has {tokenizer.vocab_size} ids but the model's text embedding "
                          f"{vocab_size} rows: rows {tokenizer.vocab_size}..{vocab_size - 1} are never used; set "
                          f"model.vocab_size={tokenizer.vocab_size} unless the tokenizer is meant to grow",
                          stacklevel=2)
        return tokenizer


class SingleStream:
    """One loader as a task's :class:`~multimodal_moe.tasks.base.TrainData` (named for its skip counts)."""

    def __init__(self, name: str, loader: StreamLoader):
        self.name, self.loader = name, loader

    def __iter__(self):
        return iter(self.loader)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def skipped(self) -> dict[str, dict[str, int]]:
        return {self.name: dict(self.loader.skipped)}
