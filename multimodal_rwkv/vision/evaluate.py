"""VQA scoring: the VQAv2 answer normalisation and soft accuracy, plus exact match for multiple choice.

Normalisation follows the official VQA evaluation code (``vqaEval.py``: ``processPunctuation`` then
``processDigitArticle``): punctuation removed or turned into spaces, number words -> digits
("two" -> "2", "none" -> "0"), articles dropped, common contractions restored, lower case.

Soft accuracy (VQAv2): with n >= 2 human answers, each answer is left out in turn and the prediction
scores ``min(1, #matches among the other n-1 / 3)``; the score is the mean over the n rounds (n = 10
in VQAv2). Here both prediction and answers are normalised. With a single reference answer the
leave-one-out round is empty, so the score is exact match after normalisation instead.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from multimodal_rwkv.errors import DataError
from multimodal_rwkv.vision.processor import (IMAGE_TOKEN, check_image_folder, is_blank_question, is_unicode,
                                             missing_image, read_text_file, utf8_error)

logger = logging.getLogger(__name__)

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
         "?", "!"]
# As in the official code (its look-behind is written "(?!<=" there, which makes it a look-ahead).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _process_punctuation(text: str) -> str:
    out = text
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    words = []
    for w in text.lower().split():
        w = NUMBER_WORDS.get(w, w)
        if w not in ARTICLES:
            words.append(w)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _one_line(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """VQAv2 answer normalisation (see module doc)."""
    return _process_digit_article(_process_punctuation(_one_line(text)))


def _answer_key(text: str) -> str:
    """:func:`normalize_answer`, or where that leaves nothing (an answer that is only an article,
    such as the option letter "A"), the text lower-cased without punctuation: "A" is not ""."""
    return normalize_answer(text) or " ".join(_process_punctuation(_one_line(text)).lower().split())


def vqa_soft_accuracy(prediction: str, answers: list[str]) -> float:
    """VQAv2 soft accuracy in [0, 1] of one prediction against the human answers (see module doc).
    An answer that normalises to nothing (the letter "A", "the") is compared lower-cased instead,
    so an empty prediction never matches it."""
    if not answers:
        raise ValueError("vqa_soft_accuracy needs at least one reference answer")
    pred = _answer_key(prediction)
    gts = [_answer_key(a) for a in answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    accs = []
    for i in range(len(gts)):
        matches = sum(1 for j, g in enumerate(gts) if j != i and g == pred)
        accs.append(min(1.0, matches / 3.0))
    return sum(accs) / len(accs)


def format_multiple_choice(question: str, choices: list[str]) -> str:
    """LLaVA's multiple-choice prompt: question, "A. …" lines, then the answer-with-letter suffix."""
    lines = [question.strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)] + [MC_SUFFIX]
    return "\n".join(lines)


def mc_letter(prediction: str, choices: list[str]) -> str:
    """The option letter a prediction names: "B", "B.", "(B)", the exact text of a choice, or as
    LLaVA's ScienceQA scorer reads it, "B. dog" (a letter, ". ", anything) and "The answer is B."."""
    p = prediction.strip()
    m = re.fullmatch(r"\(?([A-Za-z])\)?[.:)]?", p)
    if m and LETTERS.index(m.group(1).upper()) < len(choices):
        return m.group(1).upper()
    for i, c in enumerate(choices):  # before "X. ...": a choice may itself read "E. coli"
        if p.lower() == str(c).strip().lower():
            return LETTERS[i]
    m = re.match(r"([A-Z])\. ", p)
    if m and LETTERS.index(m.group(1)) < len(choices):
        return m.group(1)
    said = re.findall(r"The answer is ([A-Z])\.", p)
    if len(said) == 1 and LETTERS.index(said[0]) < len(choices):
        return said[0]
    return p


def mc_accuracy(prediction: str, answers: list[str], choices: list[str]) -> float:
    """Exact match of the predicted option letter with the reference (a letter or a choice's text)."""
    want = {mc_letter(a, choices) for a in answers}
    return float(mc_letter(prediction, choices) in want)


@dataclass
class VQAQuestion:
    """One line of a questions file: {"question_id", "image", "question", "answers"?, "choices"?, "type"?}
    (LLaVA's eval files' "text" is read as "question", and a single "answer" as "answers")."""

    question_id: object
    image: str
    question: str
    answers: list[str] | None = None
    choices: list[str] | None = None
    where: str = ""
    qtype: str | None = None  # optional "type" field: accuracy is also reported per type

    @property
    def prompt(self) -> str:
        return format_multiple_choice(self.question, self.choices) if self.choices else self.question

    def score(self, prediction: str) -> float | None:
        if not self.answers:
            return None
        if self.choices:
            return mc_accuracy(prediction, self.answers, self.choices)
        return vqa_soft_accuracy(prediction, self.answers)


@dataclass
class QuestionFile:
    questions: list[VQAQuestion] = field(default_factory=list)
    bad_lines: list[str] = field(default_factory=list)  # "file:line: reason"


def read_questions(path, image_folder=None) -> QuestionFile:
    """Read a VQA questions JSONL file (UTF-8; a leading byte-order mark is ignored). Bad lines
    (invalid JSON, not valid UTF-8, a bad field, a missing image file) are collected as
    "file:line: reason" (and logged), not raised; the rest are returned. Images are resolved
    against ``image_folder`` (default: the file's folder)."""
    path = Path(path)
    text, clean = read_text_file(path, "questions file")
    root = Path(image_folder) if image_folder else path.parent
    if image_folder:  # said once, not as a missing image on every line
        check_image_folder(root)
    out = QuestionFile()
    seen = set()
    # "\n" only: str.splitlines() would also cut at U+2028, U+0085, ... that JSON strings may hold
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        why = None if clean else utf8_error(line)
        if why:
            out.bad_lines.append(f"{where}: {why}")
            continue
        try:
            q = _parse_question(json.loads(line), root, where)
            if q.question_id in seen:
                raise DataError(f"duplicate question_id {q.question_id!r}")
            seen.add(q.question_id)
            out.questions.append(q)
        except json.JSONDecodeError as e:
            out.bad_lines.append(f"{where}: invalid JSON ({e.msg})")
        except DataError as e:
            out.bad_lines.append(f"{where}: {e}")
    for b in out.bad_lines:  # returned in bad_lines (the CLI prints them): logged once, quietly
        logger.debug("skipping %s", b)
    return out


def _parse_question(d, root: Path, where: str) -> VQAQuestion:
    if not isinstance(d, dict):
        raise DataError("line is not a JSON object")
    if "question" not in d and "text" in d:  # LLaVA's eval question files call the question "text"
        d = {**d, "question": d["text"]}
    if "answers" not in d and "answer" in d:
        d = {**d, "answers": d["answer"]}
    for k in ("question_id", "image", "question"):
        if k not in d:
            raise DataError(f"missing {k!r}" + (" (or LLaVA's 'text')" if k == "question" else ""))
    if not isinstance(d["question"], str):
        raise DataError("'question' must be a non-empty string")
    if d["question"].count(IMAGE_TOKEN) > 1:  # where the one image goes (none: before the question)
        raise DataError(f"'question' has {d['question'].count(IMAGE_TOKEN)} {IMAGE_TOKEN} placeholders for "
                        "its one image")
    if is_blank_question(d["question"]):
        raise DataError("'question' must be a non-empty string")
    if not is_unicode(d["question"]):
        raise DataError("'question' holds an unpaired surrogate (\\ud800-\\udfff), not text")
    if not isinstance(d["image"], str) or not d["image"].strip():
        raise DataError("'image' must be a file name")
    qid = d["question_id"]
    if not isinstance(qid, (str, int)) or isinstance(qid, bool):
        raise DataError("'question_id' must be a string or an integer")
    answers = d.get("answers")
    if answers is not None:
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not all(isinstance(a, (str, dict)) for a in answers):
            raise DataError("'answers' must be a list of strings")
        # VQAv2 annotation style [{"answer": ...}] is accepted too
        answers = [a.get("answer") if isinstance(a, dict) else a for a in answers]
        if not all(isinstance(a, str) for a in answers):
            raise DataError("'answers' must be a list of strings")
        answers = answers or None
    choices = d.get("choices")
    if choices is not None and (not isinstance(choices, list) or not choices or len(choices) > len(LETTERS)
                                or not all(isinstance(c, (str, int, float)) and not isinstance(c, bool) for c in choices)):
        raise DataError(f"'choices' must be a non-empty list of at most {len(LETTERS)} strings or numbers")
    if choices and answers:  # a reference no prediction can match: a mistake in the file, not a 0 score
        for a in answers:
            if mc_letter(a, [str(c) for c in choices]) not in LETTERS[:len(choices)]:
                raise DataError(f"answer {a!r} is neither an option letter A-{LETTERS[len(choices) - 1]} nor "
                                "one of the choices")
    img = Path(d["image"])
    img = img if img.is_absolute() else root / img
    why = missing_image(img)
    if why is not None:  # (a folder named like an image was "not found")
        raise DataError(f"{why}: {img}")
    qtype = d.get("type")
    if qtype is not None and (isinstance(qtype, bool) or not isinstance(qtype, (str, int))
                              or not is_unicode(str(qtype))):
        raise DataError("'type' must be a string or an integer (it names a group in the per-type accuracy)")
    if choices and not all(is_unicode(str(c)) for c in choices):
        raise DataError("'choices' holds an unpaired surrogate (\\ud800-\\udfff), not text")
    return VQAQuestion(qid, str(img), d["question"], answers, [str(c) for c in choices] if choices else None, where,
                       str(qtype) if qtype is not None else None)
