"""Forget rules for a user's corpus: which documents are forget, retain or unlabelled.

A rule is one :class:`ForgetRule`, built from any of

- a label field (``label_field="label"``): a record's value ``"forget"`` or ``"retain"``;
  absent, null, ``""`` or ``"unlabelled"`` leaves the document unlabelled;
- a keyword list (``words=["tree", "forest"]``, whole words, any case) or a regular
  expression (``regex=r"\\bbio\\w*"``, case-insensitive): a match makes the document forget,
  no match retain;
- a Python callable (API only): ``fn(record) -> True/"forget" | False/"retain" | None``,
  where ``record`` is the document's dict (``"text"`` plus its other fields).

Where a document carries a label field value, that value wins; otherwise the keyword/regex/
callable rule decides; with no such rule the document is unlabelled. Unlabelled documents are
trained on as retain data (the trainer does not know they might be forget data).

An optional evaluation field (``topic_field="topic"``) marks documents that belong to the
forget domain without a forget label. They are never used as training labels; held-out ones
measure absorption (loss on topical documents the trainer was not told about).

    rule = ForgetRule(words=["tree", "forest"])
    rule.status({"text": "A tall tree."}, "docs.jsonl:3")        # FORGET
    rule.spans("A tall tree.")                                     # [(7, 11)]
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

FORGET, RETAIN, UNLABELLED = 1, 0, -1
STATUS_NAMES = {FORGET: "forget", RETAIN: "retain", UNLABELLED: "unlabelled"}
_UNLABELLED_VALUES = (None, "", "unlabelled", "unlabeled", "none")
_FALSE_TOPIC = ("", "0", "false", "no", "none", "null")


class LabelError(ValueError):
    """A document's label (or the rule itself) is unusable; the message names the file and
    line or field."""


@dataclass
class ForgetRule:
    label_field: str | None = None
    words: Sequence[str] = ()
    regex: str | None = None
    fn: Callable[[dict], object] | None = None
    topic_field: str | None = None
    _pattern: re.Pattern | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.words = tuple(w.strip() for w in (self.words or ()) if w and w.strip())
        if self.words and self.regex:
            raise LabelError("give a keyword list or a regex as the forget rule, not both "
                             "(a regex can express a keyword list: r'\\b(?:tree|forest)\\b')")
        if self.fn is not None and (self.words or self.regex):
            raise LabelError("give a callable or a keyword list/regex as the forget rule, not both")
        if self.fn is not None and not callable(self.fn):
            raise LabelError(f"fn must be callable, got {type(self.fn).__name__}")
        if self.words:
            self._pattern = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in self.words) + r")\b",
                                       re.IGNORECASE)
        elif self.regex:
            try:
                self._pattern = re.compile(self.regex, re.IGNORECASE)
            except re.error as e:
                raise LabelError(f"--forget-regex {self.regex!r} is not a valid regular expression: {e}") from None
        if not (self.label_field or self._pattern is not None or self.fn is not None):
            raise LabelError("a forget rule needs a label field, a keyword list, a regex or a callable")

    # ------------------------------------------------------------------ description
    def describe(self) -> str:
        parts = []
        if self.label_field:
            parts.append(f"field {self.label_field!r} = forget/retain")
        if self.words:
            parts.append("keywords " + ", ".join(self.words))
        if self.regex:
            parts.append(f"regex {self.regex!r}")
        if self.fn is not None:
            parts.append(f"callable {getattr(self.fn, '__qualname__', repr(self.fn))}")
        text = "; else ".join(parts)
        return text + (f" (evaluation field {self.topic_field!r})" if self.topic_field else "")

    def key(self) -> str:
        """A string identifying the rule, for caches. A callable is identified by its module,
        name and bytecode (a changed body changes the key)."""
        fn = ""
        if self.fn is not None:
            code = getattr(self.fn, "__code__", None)
            body = code.co_code + repr(code.co_consts).encode() if code is not None else repr(self.fn).encode()
            fn = f"{getattr(self.fn, '__module__', '')}.{getattr(self.fn, '__qualname__', '')}:" \
                 f"{hashlib.sha256(body).hexdigest()[:12]}"
        return repr((self.label_field, self.words, self.regex, fn, self.topic_field))

    @property
    def has_keywords(self) -> bool:
        return self._pattern is not None

    # ------------------------------------------------------------------ per document
    def status(self, record: dict, where: str = "document") -> int:
        """FORGET, RETAIN or UNLABELLED for one document (``where``: "file:line" for errors)."""
        if self.label_field is not None and self.label_field in record:
            v = record[self.label_field]
            if isinstance(v, str):
                v = v.strip().lower()
            if v == "forget":
                return FORGET
            if v == "retain":
                return RETAIN
            if v not in _UNLABELLED_VALUES:
                raise LabelError(f"{where}: field {self.label_field!r} is {record[self.label_field]!r}; "
                                 "expected \"forget\", \"retain\" or absent/null (unlabelled)")
        if self._pattern is not None:
            return FORGET if self._pattern.search(record["text"]) else RETAIN
        if self.fn is not None:
            try:
                v = self.fn(record)
            except Exception as e:
                raise LabelError(f"{where}: the forget callable raised {type(e).__name__}: {e}") from e
            if v is True or v == "forget":
                return FORGET
            if v is False or v == "retain":
                return RETAIN
            if v is None or v == "unlabelled":
                return UNLABELLED
            raise LabelError(f"{where}: the forget callable returned {v!r}; expected True/'forget', "
                             "False/'retain' or None (unlabelled)")
        return UNLABELLED

    def is_topic(self, record: dict, where: str = "document") -> bool:
        """Whether the evaluation field marks the document as belonging to the forget domain."""
        if self.topic_field is None:
            return False
        v = record.get(self.topic_field)
        if v is None or isinstance(v, bool):
            return bool(v)
        if isinstance(v, (int, float)):
            return v != 0
        if isinstance(v, str):
            return v.strip().lower() not in _FALSE_TOPIC
        raise LabelError(f"{where}: evaluation field {self.topic_field!r} is {v!r}; expected a bool, "
                         "a number or a string")

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Character spans of the keyword/regex matches (none for label-field or callable rules);
        their tokens are left out of the ``forget_loss_no_keywords`` metric."""
        if self._pattern is None:
            return []
        return [m.span() for m in self._pattern.finditer(text) if m.end() > m.start()]


def rule_from_args(label_field: str | None = None, forget_words: Sequence[str] | None = None,
                   forget_regex: str | None = None, topic_field: str | None = None) -> ForgetRule:
    """The rule of the CLI flags; the paper's keyword rule (tree/forest/woodland) when none is given."""
    words = []
    for w in forget_words or ():
        words += [p for p in w.split(",") if p.strip()]   # "--forget-words a,b c" works too
    if not (label_field or words or forget_regex):
        from .corpus import FORGET_WORDS

        words = list(FORGET_WORDS)
    return ForgetRule(label_field=label_field, words=words, regex=forget_regex, topic_field=topic_field)
