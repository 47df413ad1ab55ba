"""Text + labelled spans → token ids + per-token weights, verified. One generic function for every format.

The whole rendered text is tokenized once, in batches, with character offsets (add_special_tokens=False:
BOS is whatever the renderer wrote, so it is never doubled). Spans become token weights through the
offsets; no part of the text is ever re-tokenized to find a boundary.

Straddling tokens: a token whose characters are partly inside a trained span (SentencePiece ``▁Hello``
after ``Response:``, a BPE merge across a seam). ``--straddle include`` (default) trains it: it carries
characters the model has to produce. ``exclude`` leaves it untrained. Either way they are counted.

Verification, on every example: each trained span is covered by its tokens without gaps, and those
tokens decode back to exactly the text they cover (the span, widened only by straddling tokens). A
tokenizer whose decoder drops the single leading space of a sequence (Llama-2 style) is allowed that one
space. An example that fails is rejected with its reason, never kept.

Truncation (``--max-length``): ``turn`` (default) cuts after the last complete trained assistant turn
that fits; ``keep-start`` keeps the first N tokens; ``drop`` rejects the episode. An example left with
zero trained tokens is never written.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import chain

import numpy as np

from lossmask.errors import EpisodeError
from lossmask.example import Example
from lossmask.render.base import Label, Rendered
from lossmask.tokenizer import exact_backend

STRADDLE_POLICIES = ("include", "exclude")
TRUNCATION_POLICIES = ("turn", "keep-start", "drop")


@dataclass(frozen=True)
class MaskOptions:
    max_length: int | None = None
    truncation: str = "turn"
    straddle: str = "include"

    def __post_init__(self):
        if self.truncation not in TRUNCATION_POLICIES:
            raise ValueError(f"truncation must be one of {TRUNCATION_POLICIES}")
        if self.straddle not in STRADDLE_POLICIES:
            raise ValueError(f"straddle must be one of {STRADDLE_POLICIES}")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError("max_length must be positive")


class Masker:
    """Tokenizes whole rendered texts once, unpadded and untruncated, and turns their spans into weights."""

    def __init__(self, tokenizer, options: MaskOptions = MaskOptions()):
        self.backend = exact_backend(tokenizer)
        self.options = options
        added = sorted((t.content for t in self.backend.get_added_tokens_decoder().values()), key=len, reverse=True)
        self._after_added = re.compile("(" + "|".join(map(re.escape, added)) + ") ") if added else None

    def mask(self, rendered: list[Rendered]) -> list[Example | EpisodeError]:
        """Mask a batch; each item is an Example or the EpisodeError that rejects it."""
        if self.backend.truncation is not None or self.backend.padding is not None:
            self.backend = exact_backend(self.backend)  # the shared backend was switched since: copy, exact
        encodings = self.backend.encode_batch([r.text for r in rendered], add_special_tokens=False)
        out: list[Example | EpisodeError] = []
        for r, enc in zip(rendered, encodings):
            try:
                out.append(self._one(r, enc.ids, enc.offsets))
            except EpisodeError as exc:
                out.append(exc)
        return out

    def _one(self, r: Rendered, ids_list: list[int], offsets: list[tuple[int, int]]) -> Example:
        n = len(ids_list)
        ids = np.array(ids_list, dtype=np.uint32)
        offs = np.fromiter(chain.from_iterable(offsets), dtype=np.int64, count=2 * n).reshape(n, 2)
        starts, ends = offs[:, 0], offs[:, 1]
        char_labels = np.full(len(r.text) + 1, Label.TEMPLATE, dtype=np.uint8)
        for s in r.spans:
            char_labels[s.start:s.end] = s.label
        labels = char_labels[np.minimum(starts, len(r.text))]
        weights = np.zeros(n, dtype=np.float32)
        if n > 1 and (np.any(starts[1:] < starts[:-1]) or np.any(ends[1:] < ends[:-1])):
            raise EpisodeError("verify_failed", "the tokenizer returned offsets that are not in text order")
        gaps = np.flatnonzero(starts[1:] > np.maximum.accumulate(ends)[:-1]) + 1  # tokens after uncovered text
        straddling = 0
        ranges: list[tuple[int, int]] = []  # token ranges of trained spans, merged, for one decode
        for span in r.trained_spans:
            lo = int(ends.searchsorted(span.start, side="right"))
            hi = int(starts.searchsorted(span.end, side="left"))
            if hi <= lo:
                raise EpisodeError("verify_failed", f"trained text {r.text[span.start:span.end]!r} maps to no token")
            head_out, tail_out = bool(starts[lo] < span.start), bool(ends[hi - 1] > span.end)
            straddling += int(head_out) + int(tail_out and (hi - 1 > lo or not head_out))
            if gaps.size and np.any((gaps > lo) & (gaps < hi)) or starts[lo] > span.start or ends[hi - 1] < span.end:
                raise EpisodeError(
                    "verify_failed",
                    f"trained text {r.text[span.start:span.end]!r} has characters no token covers",
                    hint="the tokenizer normalizes or drops these characters; report this example",
                )
            if self.options.straddle == "exclude":
                lo, hi = lo + int(head_out), hi - int(tail_out)
            if hi > lo:
                weights[lo:hi] = np.maximum(weights[lo:hi], span.weight)
                labels[lo:hi] = span.label
                if ranges and lo <= ranges[-1][1]:
                    ranges[-1] = (ranges[-1][0], max(hi, ranges[-1][1]))
                else:
                    ranges.append((lo, hi))
        if not ranges:
            raise EpisodeError(
                "zero_trained_tokens",
                "this example trains on zero tokens",
                hint="check train/weight overrides; an example with nothing to learn is never written",
            )
        self._verify(r.text, ids_list, starts, ends, ranges)
        truncated = False
        limit = self.options.max_length
        if limit is not None and n > limit:
            cut = self._cut(r, starts, n, limit)
            ids, weights, labels = ids[:cut], weights[:cut], labels[:cut]
            truncated = True
            if not np.any(weights > 0):
                raise EpisodeError(
                    "zero_trained_after_truncation",
                    f"after truncation to {limit} tokens no trained token is left ({n} tokens before)",
                    hint="raise --max-length, or shorten the prompt",
                )
        return Example(ids, weights, labels, r.source, straddling=straddling, truncated=truncated)

    def _cut(self, r: Rendered, starts: np.ndarray, n: int, limit: int) -> int:
        policy = self.options.truncation
        if policy == "drop":
            raise EpisodeError(
                "too_long",
                f"{n} tokens is more than --max-length {limit}",
                hint="raise --max-length, or use --truncation turn / keep-start",
            )
        if policy == "keep-start":
            return limit
        fits = [int(np.searchsorted(starts, end, side="left")) for end in r.turn_ends]
        fits = [k for k in fits if k <= limit]
        if not fits:
            raise EpisodeError(
                "too_long",
                f"{n} tokens is more than --max-length {limit} and no complete assistant turn fits",
                hint="raise --max-length, or use --truncation keep-start",
            )
        return max(fits)

    def _decodes_to(self, got: str, expected: str) -> bool:
        """Exact, up to the spaces SentencePiece decoders add or drop by design.

        Llama-2-style decoders strip the first leading space of a sequence, and legacy SentencePiece
        normalizers put a ``▁`` (decoded as a space) in front of text that follows an added token.
        """
        if got == expected or (expected.startswith(" ") and got == expected[1:]):
            return True
        if self._after_added is None:
            return False
        soft_got = self._after_added.sub(r"\1", got)
        soft_expected = self._after_added.sub(r"\1", expected)
        return soft_got == soft_expected or soft_got == soft_expected.removeprefix(" ")

    def _verify(self, text: str, ids: list[int], starts, ends, ranges: list[tuple[int, int]]) -> None:
        """The trained tokens decode back to exactly the text they cover: one decode per example."""
        pieces = [text[int(starts[lo]):int(ends[hi - 1])] for lo, hi in ranges]
        trained = [t for lo, hi in ranges for t in ids[lo:hi]]
        if self._decodes_to(self.backend.decode(trained, skip_special_tokens=False), "".join(pieces)):
            return
        for (lo, hi), expected in zip(ranges, pieces):  # find the range at fault, for the message
            got = self.backend.decode(ids[lo:hi], skip_special_tokens=False)
            if not self._decodes_to(got, expected):
                raise EpisodeError(
                    "verify_failed",
                    f"trained tokens decode to {got!r} but the renderer meant to train {expected!r}",
                    hint="the tokenizer normalizes these characters; report this example",
                )
