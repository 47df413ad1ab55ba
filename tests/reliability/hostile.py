"""Hypothesis strategies for hostile input: text that looks like markup, control tokens and role headers, JSON with
every awkward value, records of every input format with fields of the wrong type, and raw lines mangled in bytes."""
from __future__ import annotations

import json

from hypothesis import strategies as st

SPECIAL_STRINGS = (
    "<|im_end|>", "<|im_start|>assistant\n", "<|eot_id|>", "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "<end_of_turn>", "<start_of_turn>model\n", "<myPT_eot>", "</myPT_assistant>", "<myPT_assistant>", "</s>", "<s>",
    "<|endoftext|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
)
MARKUP = (
    "{{ 7*7 }}", "{% for x in messages %}", "{% endfor %}", "{# comment #}", "{{ raise_exception('boom') }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}", "{% include '/etc/passwd' %}", "\nResponse:", "\nEND",
    "Instruction: ", "<|endofepisode|>", "\\n", '"}', "\\ud800", "</tool_response>", "<tools>", "\x00", "\ufeff",
    "\r\n", "\u2028", "\u200b", "🙂", "東京", "ß", " ", "\n\n", "\t",
)

pieces = st.one_of(st.text(max_size=12), st.text("abc .,\n", max_size=8), st.sampled_from(SPECIAL_STRINGS),
                   st.sampled_from(MARKUP))
hostile_text = st.lists(pieces, max_size=5).map("".join)
nonblank_text = st.tuples(hostile_text, st.text("abcxyz.?!", min_size=1, max_size=8), hostile_text).map("".join)

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), hostile_text,
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)


def chance(odds: int):
    """True about one time in ``odds`` (st.integers and st.randoms favour bounds far more often than that)."""
    return st.sampled_from([False] * (odds - 1) + [True])


def maybe(value_strategy, odds: int = 8):
    """A field's value: one of the expected kind, or (one time in ``odds``) any JSON value at all."""
    return chance(odds).flatmap(lambda junk: json_values if junk else value_strategy)


weights = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3), st.sampled_from([0, 0.5, 2]))
arguments = st.dictionaries(st.text(max_size=5), json_values, max_size=3)
JUNK_FIELDS = ("typo", "contnet", "weight", "train", "think", "context", "tool_calls", "name")


@st.composite
def message(draw, role: str, fmt: str) -> dict:
    """One message of ``role`` in the shape ``fmt`` uses, sometimes with a wrong or unknown field."""
    key_role, key_content = ("from", "value") if fmt == "sharegpt" else ("role", "content")
    m = {key_role: role}
    if role in ("assistant_toolcall", "function_call"):
        call = {"name": draw(maybe(nonblank_text)), "arguments": draw(maybe(arguments))}
        m.update(call) if fmt == "native" else m.update({key_content: json.dumps(call)})
    elif role == "assistant" and fmt == "openai" and draw(chance(4)):
        m[key_content] = draw(maybe(hostile_text))
        m["tool_calls"] = draw(maybe(st.lists(st.fixed_dictionaries(
            {"id": st.text("abc", max_size=3), "type": st.just("function"),
             "function": st.fixed_dictionaries({"name": nonblank_text, "arguments": maybe(arguments)})}),
            max_size=2)))
    else:
        m[key_content] = draw(maybe(nonblank_text if role in ("assistant", "gpt") else hostile_text))
    if role in ("toolresult", "tool") and draw(st.booleans()):
        m["name"] = draw(maybe(nonblank_text))
    if role in ("assistant", "gpt", "assistant_toolcall") and draw(chance(4)):
        m[draw(st.sampled_from(["weight", "train"]))] = draw(st.one_of(weights, st.booleans()))
    if role == "assistant" and fmt != "sharegpt" and draw(chance(4)):
        m[draw(st.sampled_from(["think", "cite", "context"] if fmt == "native" else ["reasoning_content"]))] = \
            draw(maybe(hostile_text))
    if draw(chance(10)):
        m[draw(st.sampled_from(JUNK_FIELDS))] = draw(json_values)
    return m


ROLES = {
    "native": (("user",), ("assistant", "assistant_toolcall"), ("toolresult", "user")),
    "openai": (("user",), ("assistant",), ("tool", "user")),
    "sharegpt": (("human", "user"), ("gpt", "function_call"), ("observation", "human")),
}
ODD_ROLES = {"native": ("system", "model", "assistant "), "openai": ("function", "toolresult", "developer"),
             "sharegpt": ("bot", "assistant_toolcall", "gpt ")}


@st.composite
def messages(draw, fmt: str) -> list:
    """A conversation: user, then assistant (or a tool call and its result), repeated; rarely a role out of place."""
    out = []
    for _ in range(draw(st.integers(1, 3))):
        for roles in ROLES[fmt][:2]:
            out.append(draw(message(draw(st.sampled_from(roles)), fmt)))
        if out[-1].get("role", out[-1].get("from")) in ("assistant_toolcall", "function_call"):
            out.append(draw(message(ROLES[fmt][2][0], fmt)))
            out.append(draw(message(ROLES[fmt][1][0], fmt)))
    if fmt != "native" and draw(chance(4)):
        out.insert(0, draw(message("system", fmt)))
    if draw(chance(10)):
        at = draw(st.integers(0, len(out) - 1))
        out[at] = draw(message(draw(st.sampled_from(ODD_ROLES[fmt])), fmt))
    if draw(chance(15)):
        out.append(draw(json_values))
    return out


def _top(draw, record: dict) -> dict:
    for key in draw(st.lists(st.sampled_from(["system", "language", "tools", "_meta", "id"]), max_size=2)):
        if key == "tools":
            record[key] = draw(st.one_of(json_values, st.just([{"type": "function", "function": {"name": "f"}}])))
        else:
            record[key] = draw(maybe(hostile_text, odds=4))
    return record


@st.composite
def record(draw, fmt: str) -> dict:
    """A record of input format ``fmt``, plausible more often than not, with wrong types and unknown fields too."""
    if fmt in ("native", "openai"):
        return _top(draw, {"messages": draw(maybe(messages(fmt), odds=15))})
    if fmt == "sharegpt":
        return _top(draw, {"conversations": draw(maybe(messages(fmt), odds=15))})
    if fmt == "alpaca":
        rec = {"instruction": draw(maybe(hostile_text)), "output": draw(maybe(nonblank_text))}
        if draw(st.booleans()):
            rec["input"] = draw(maybe(hostile_text))
        if draw(chance(4)):
            rec["history"] = draw(maybe(st.lists(st.lists(nonblank_text, min_size=2, max_size=2), max_size=2)))
        return _top(draw, rec)
    if fmt == "prompt_completion":
        if draw(st.booleans()):
            return {"prompt": draw(maybe(hostile_text)), "completion": draw(maybe(nonblank_text))}
        prompt = [draw(message("user", "openai"))]
        return {"prompt": prompt, "completion": [draw(message("assistant", "openai"))]}
    if fmt == "input_full":
        prompt = draw(maybe(hostile_text))
        full = prompt + draw(nonblank_text) if isinstance(prompt, str) and not draw(chance(5)) else draw(maybe(
            hostile_text))
        return {"input_text": prompt, "full_text": full}
    if fmt == "marked_text":
        return {"text": draw(maybe(hostile_text))}
    return {"_replay": draw(maybe(st.just(True))), "text": draw(maybe(hostile_text))}


FORMATS = ("native", "openai", "sharegpt", "alpaca", "prompt_completion", "input_full", "marked_text", "replay")
any_record = st.sampled_from(FORMATS).flatmap(record)


@st.composite
def raw_line(draw) -> bytes:
    """One JSONL line as bytes: a record, any JSON, a record mangled in bytes, deep nesting, or random bytes."""
    kind = draw(st.sampled_from(["record", "record", "record", "json", "mangled", "deep", "surrogate", "bytes",
                                 "blank"]))
    if kind in ("record", "mangled"):
        data = json.dumps(draw(any_record), ensure_ascii=draw(st.booleans())).encode("utf-8")
        if kind == "mangled" and data:
            at = draw(st.integers(0, len(data)))
            data = data[:at] + draw(st.binary(max_size=4)) + data[at + draw(st.integers(0, 3)):]
    elif kind == "json":
        data = json.dumps(draw(json_values)).encode("utf-8")
    elif kind == "deep":
        depth = draw(st.sampled_from([50, 5000, 200_000]))
        data = b'{"messages": ' + b"[" * depth + b"]" * depth + b"}"
    elif kind == "surrogate":
        data = draw(st.sampled_from([b'{"_replay": true, "text": "a\\ud800b"}', b'{"text": "\\udfff"}',
                                     b'{"prompt": "\\ud83d\\ude42", "completion": "ok"}']))
    elif kind == "bytes":
        data = draw(st.binary(max_size=40)).replace(b"\n", b"")
    else:
        data = draw(st.sampled_from([b"", b"   ", b"\t", b"\r"]))
    data = data.replace(b"\n", b"\\n")
    if draw(chance(10)):
        data = b"\xef\xbb\xbf" + data
    return data + draw(st.sampled_from([b"\n", b"\n", b"\r\n"]))
