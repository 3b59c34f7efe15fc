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

import contextlib
import io
import shutil
from collections.abc import Mapping, Sequence

__all__ = ["SKIPPED_SCORERS", "caption_scores"]

SKIPPED_SCORERS = {"SPICE": "needs the Stanford CoreNLP models that pycocoevalcap downloads at first use "
                            "(about 1 GB); evaluation runs without network"}
METRICS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")


def caption_scores(references: Mapping[str, Sequence[str]], candidates: Mapping[str, str]) -> dict[str, float]:
    """Corpus scores (x100) of one candidate caption per image against that image's references.

    Args:
        references: image id -> its reference captions (at least one each).
        candidates: image id -> the caption to score; the same ids as ``references``.
    """
    if set(references) != set(candidates) or not references:
        missing = sorted(set(references) ^ set(candidates))[:5]
        raise ValueError(f"references and candidates must cover the same, non-empty set of images; they differ "
                         f"on {missing}")
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
    gts = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
    res = tokenizer.tokenize({i: [{"caption": candidates[i]}] for i in ids})
    res = {i: [c or "-"] for i, (c,) in res.items()}  # METEOR's Java side stalls on an empty line
    scores: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # BLEU prints its n-gram counts
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores.update({f"BLEU_{n}": b for n, b in enumerate(bleu, 1)})
    scores["METEOR"], _ = Meteor().compute_score(gts, res)  # its Java process ends with the object
    scores["ROUGE_L"], _ = Rouge().compute_score(gts, res)
    scores["CIDEr"], _ = Cider().compute_score(gts, res)
    return {k: round(100 * float(scores[k]), 4) for k in METRICS}
