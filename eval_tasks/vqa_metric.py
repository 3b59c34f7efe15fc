"""The official VQA accuracy (VQAv2, Antol et al. 2015 / Goyal et al. 2017, arXiv 1612.00837).

Reimplements the rules of the VQA evaluation code (``vqaEval.py`` of the VQA API):

- a prediction is cleaned: newlines and tabs become spaces, then :func:`process_punctuation`,
  then :func:`process_digit_article`; the ground-truth answers get :func:`process_punctuation`
  only when the ten are not all the same string (as the official code does);
- a question's accuracy is the mean, over its ten answers, of min(1, matches among the *other*
  nine / 3) (:func:`vqa_accuracy`); for ten answers this equals 0, 0.3, 0.6, 0.9 or 1 for a
  prediction that 0, 1, 2, 3 or >= 4 annotators gave;
- the overall score is the mean over questions (x 100 in the report), and so is the score of each
  question type and of each answer type (VQAv2's ``yes/no``, ``number``, ``other``).

Two quirks are kept for parity: the period regex's look-behind is mistyped as ``(?!<=\\d)``
(so it never looks behind), and ``re.UNICODE`` (= 32) is passed as ``count``, so at most 32
periods are removed. Deviation: per-question-type accuracy is the mean over that type's
questions (the official breakdown uses the loop's last value, a known bug).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Sequence

__all__ = ["normalize_answer", "process_digit_article", "process_punctuation", "vqa_accuracy", "vqa_baselines",
           "vqa_report"]

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"
_ARTICLES = {"a", "an", "the"}
# The official table of contractions written without their apostrophe ("dont" -> "don't").
_CONTRACTIONS = dict(pair.split("=") for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd
howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've
it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've
mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've
oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't
shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've
somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd
someoned've=someone'd've someone'dve=someone'd've someonell=someone'll someones=someone's
somethingd=something'd somethingd've=something'd've something'dve=something'd've somethingll=something'll
thats=that's thered=there'd thered've=there'd've there'dve=there'd've therere=there're theres=there's
theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've
twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll
whatre=what're whats=what's whatve=what've whens=when's whered=where'd wheres=where's whereve=where've
whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll
whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've
wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've
y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've youll=you'll
youre=you're youve=you've
""".split())


def process_punctuation(text: str) -> str:
    """Each punctuation mark is deleted when it touches a space anywhere in ``text`` (or when
    ``text`` has a comma between digits), else replaced by a space; then periods not followed
    by a digit are removed (at most 32, as the official code)."""
    out = text
    digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in _PUNCTUATION:
        out = out.replace(p, "" if (p + " " in text or " " + p in text or digit_comma) else " ")
    return _PERIOD.sub("", out, count=32)


def process_digit_article(text: str) -> str:
    """Lower-case; number words to digits; articles dropped; apostrophe-less contractions fixed."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(answer: str) -> str:
    """A prediction (or a vocabulary answer) as the official evaluation compares it."""
    return process_digit_article(process_punctuation(answer.replace("\n", " ").replace("\t", " ").strip()))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """One question's accuracy: mean over its answers of min(1, matches among the others / 3)."""
    if not answers:
        raise ValueError("a question needs at least one ground-truth answer")
    prediction = normalize_answer(prediction)
    gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    scores = []
    for i in range(len(gts)):
        matches = sum(1 for j, a in enumerate(gts) if j != i and a == prediction)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)


def _per_type(types: Sequence[str], scores: Sequence[float], *, skip_untyped: bool = False) -> dict[str, float]:
    per_type = defaultdict(list)
    for t, s in zip(types, scores):
        if t or not skip_untyped:
            per_type[t].append(s)
    return {t: 100 * sum(v) / len(v) for t, v in sorted(per_type.items())}


def vqa_report(predictions: Sequence[str], answers: Sequence[Sequence[str]],
               question_types: Sequence[str] | None = None, answer_types: Sequence[str] | None = None) -> dict:
    """``vqa_accuracy`` overall (x 100), per question type (``per_question_type``) and per answer
    type (``per_answer_type``; questions whose answer type is "" are left out of it), over
    parallel lists."""
    types = {"question types": question_types, "answer types": answer_types}
    if len(predictions) != len(answers) or any(t is not None and len(t) != len(answers) for t in types.values()):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions"
                         + "".join(f" and {len(t)} {name}" for name, t in types.items() if t is not None))
    scores = [vqa_accuracy(p, a) for p, a in zip(predictions, answers)]
    out = {"vqa_accuracy": 100 * sum(scores) / max(len(scores), 1), "questions": len(scores)}
    if question_types is not None:
        out["per_question_type"] = _per_type(question_types, scores)
    if answer_types is not None:
        out["per_answer_type"] = _per_type(answer_types, scores, skip_untyped=True)
    return out


def vqa_baselines(answers: Sequence[Sequence[str]], vocabulary: Sequence[str]) -> dict:
    """Two reference points for a model's accuracy on these questions (x 100):
    ``majority``: always answering the most common majority answer of the questions;
    ``chance``: answering a uniformly random vocabulary entry (its expected accuracy)."""
    heads = Counter(Counter(normalize_answer(a) for a in row).most_common(1)[0][0] for row in answers if row)
    majority = heads.most_common(1)[0][0] if heads else ""
    vocab = {normalize_answer(v) for v in vocabulary}
    # only answers some annotator gave can score: sum those, divide by the vocabulary size
    chance = [sum(vqa_accuracy(a, row) for a in {normalize_answer(x) for x in row} & vocab) / max(len(vocab), 1)
              for row in answers]
    return {"majority_answer": majority,
            "majority_vqa_accuracy": vqa_report([majority] * len(answers), answers)["vqa_accuracy"],
            "chance_vqa_accuracy": 100 * sum(chance) / max(len(chance), 1)}
