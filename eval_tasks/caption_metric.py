"""COCO caption metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D, as the COCO caption server scores.

Microsoft COCO Captions: Data Collection and Evaluation Server (Chen et al., arXiv 1504.00325),
through ``pycocoevalcap`` (the ``captioning`` extra): candidates and references are lower-cased
and split by the Stanford PTB tokenizer (Java), then each scorer runs over the whole set. BLEU
(Papineni et al., 2002) is corpus-level with the closest reference length; CIDEr is the CIDEr-D
variant (Vedantam et al., arXiv 1411.5726: clipped counts, a Gaussian length penalty with sigma 6,
x10), with document frequencies over the references of the scored set. Scores are reported x100,
as papers do (BEiT-3 base: COCO CIDEr 133.6).

SPICE (arXiv 1607.08822) is not computed: pycocoevalcap downloads Stanford CoreNLP models at its
first use, and evaluation runs offline; :data:`SKIPPED_SCORERS` says so in ``results.json``.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence

__all__ = ["SKIPPED_SCORERS", "caption_scores", "caption_scores_of_sets"]

SKIPPED_SCORERS = {"SPICE": "needs the Stanford CoreNLP models that pycocoevalcap downloads at first use "
                            "(about 1 GB); evaluation runs without network"}
METRICS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")


@contextlib.contextmanager
def _without_tokenizer_speed():
    """Standard error at the file-descriptor level (Java's), less the PTB tokenizer's speed lines."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            for line in caught.read().decode(errors="replace").splitlines(keepends=True):
                if not line.startswith("PTBTokenizer tokenized"):
                    sys.stderr.write(line)


def caption_scores(references: Mapping[str, Sequence[str]], candidates: Mapping[str, str]) -> dict[str, float]:
    """Corpus scores (x100) of one candidate caption per image against that image's references.

    Args:
        references: image id -> its reference captions (at least one each).
        candidates: image id -> the caption to score; the same ids as ``references``.
    """
    return caption_scores_of_sets(references, {"": candidates})[""]


def caption_scores_of_sets(references: Mapping[str, Sequence[str]],
                           candidate_sets: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, float]]:
    """:func:`caption_scores` of each named set of candidates against the same references, in one
    pass: the references and all candidates are tokenized by one PTB tokenizer run each and one
    METEOR process scores them all (:func:`_meteor`), so a model's captions and its baselines cost
    little more than the model's alone."""
    for name, candidates in candidate_sets.items():
        if set(references) != set(candidates) or not references:
            missing = sorted(set(references) ^ set(candidates))[:5]
            raise ValueError(f"references and candidates{f' ({name})' if name else ''} must cover the same, "
                             f"non-empty set of images; they differ on {missing}")
    empty = [i for i, refs in references.items() if not refs]
    if empty:
        raise ValueError(f"images without a reference caption: {empty[:5]}")
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError:
        raise ImportError("caption metrics need pycocoevalcap: pip install 'multimodal_moe[captioning]'") from None
    if shutil.which("java") is None:
        raise RuntimeError("caption metrics need Java (pycocoevalcap's PTB tokenizer and METEOR run on it); "
                           "install a Java runtime, e.g. apt-get install default-jre-headless")
    ids = sorted(references)
    tokenizer = PTBTokenizer()
    with contextlib.redirect_stdout(io.StringIO()), _without_tokenizer_speed():  # BLEU prints its n-gram counts
        gts = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
        all_res = tokenizer.tokenize({(name, i): [{"caption": candidates[i]}]
                                      for name, candidates in candidate_sets.items() for i in ids})
        meteor = _meteor(Meteor)
        out = {}
        for name in candidate_sets:
            res = {i: [all_res[name, i][0] or "-"] for i in ids}  # METEOR's Java side stalls on an empty line
            bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
            scores = {f"BLEU_{n}": b for n, b in enumerate(bleu, 1)}
            try:
                scores["METEOR"], _ = meteor.compute_score(gts, res)
            except BaseException:  # its process may be half-way through a reply: never reuse it
                _discard_meteor()
                raise
            scores["ROUGE_L"], _ = Rouge().compute_score(gts, res)
            scores["CIDEr"], _ = Cider().compute_score(gts, res)
            out[name] = {k: round(100 * float(scores[k]), 4) for k in METRICS}
    return out


_METEOR: list = []  # the process's METEOR scorer, once started
atexit.register(_METEOR.clear)  # the scorer's __del__ ends its Java process


def _meteor(factory):
    """One METEOR scorer (a Java process) for the whole Python process, started at its first use
    (and again if its process has ended): its first score loads the paraphrase tables, about 5 s,
    which every later evaluation (a demo's ten, a fine-tune's end-of-run one and another) would
    pay again."""
    if not _METEOR or _METEOR[0].meteor_p.poll() is not None:  # pycocoevalcap's Popen of the jar
        _discard_meteor()
        _METEOR.append(factory())
    return _METEOR[0]


def _discard_meteor() -> None:
    """End the cached scorer's process without its ``__del__``, which waits for a lock that a
    failed score leaves held."""
    while _METEOR:
        meteor = _METEOR.pop()
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()
        if meteor.lock.locked():
            meteor.lock.release()
