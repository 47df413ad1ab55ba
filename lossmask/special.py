"""Special-token strings inside content: a user pasting ``<|im_end|>`` must not silently end a turn.

Tokenizers turn the text of a special token into the control token wherever it appears, so content
that contains one changes the structure the model sees. Policies (``--special-in-content``):

- ``reject`` (default): the episode is rejected with the field and the token named.
- ``neutralize``: a zero-width space (U+200B) is inserted after the first character of each occurrence,
  so it is tokenized as ordinary text; counted in the summary.
- ``allow``: keep it; it becomes the control token (for data that embeds control tokens on purpose).

Only conversation content is checked. Raw text episodes (prompt/completion text, text with a response
marker, replay text) are pre-rendered model input and are tokenized as written.
"""
from __future__ import annotations

import dataclasses
import json
import re

from lossmask.episode import Conversation, Episode
from lossmask.errors import EpisodeError

SPECIAL_POLICIES = ("reject", "neutralize", "allow")
ZERO_WIDTH_SPACE = "\u200b"


class SpecialStringGuard:
    """Finds special-token strings in conversation content and applies the policy; owns the compiled pattern."""

    def __init__(self, special_tokens: tuple[str, ...], policy: str = "reject"):
        if policy not in SPECIAL_POLICIES:
            raise ValueError(f"policy must be one of {SPECIAL_POLICIES}, got {policy!r}")
        self.policy = policy
        tokens = sorted((t for t in special_tokens if t), key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, tokens))) if tokens and policy != "allow" else None

    def apply(self, episode: Episode) -> tuple[Episode, int]:
        """Return the episode to render and how many occurrences were neutralized."""
        if self.pattern is None or not isinstance(episode, Conversation):
            return episode, 0
        count = 0
        system = episode.system
        if system is not None:
            system, n = self._check(system, "system")
            count += n
        messages = []
        for i, m in enumerate(episode.messages):
            changes = {}
            for name in ("content", "context", "think", "cite", "name"):
                value = getattr(m, name)
                if value:
                    new, n = self._check(value, f"messages[{i}].{name}")
                    if n:
                        changes[name] = new
                        count += n
            if m.arguments:
                self._check(json.dumps(m.arguments, ensure_ascii=False), f"messages[{i}].arguments", fixable=False)
            messages.append(dataclasses.replace(m, **changes) if changes else m)
        if not count:
            return episode, 0
        return dataclasses.replace(episode, system=system, messages=tuple(messages)), count

    def _check(self, text: str, field: str, fixable: bool = True) -> tuple[str, int]:
        match = self.pattern.search(text)
        if match is None:
            return text, 0
        if self.policy == "reject" or not fixable:
            raise EpisodeError(
                "special_token_in_content",
                f"{field} contains the special token string {match.group(0)!r}, which the tokenizer would "
                "turn into a control token",
                field=field,
                hint="remove it, or pass --special-in-content neutralize (tokenize it as text) "
                "or allow (keep it as a control token)",
            )
        found = 0

        def breakup(m: re.Match) -> str:
            nonlocal found
            found += 1
            s = m.group(0)
            return s[0] + ZERO_WIDTH_SPACE + s[1:]

        return self.pattern.sub(breakup, text), found
