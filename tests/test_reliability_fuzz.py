"""Fuzzing every input path with hypothesis: the JSONL and .txt readers, each input format, each renderer through the
mask, ``mix`` and ``convert``. (The dataset reader on corrupted files is fuzzed in test_reliability_corruption.py.)

The only acceptable outcomes are a correct result or the project's own error naming file and line (LossmaskError,
InputProblem, EpisodeError): never another exception, a hang (tests/reliability/common.no_hang) or a partial
output. "Correct" is checked against oracles that do not reuse the code under test: the record's own strings,
the chat template applied by transformers, the trained text each format documents. Budget: LOSSMASK_FUZZ_EXAMPLES
inputs per path (default 60; the number tried per path goes to the figures file, see tests/reliability/common.py).
"""
from __future__ import annotations

import gzip
import json
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from lossmask.episode import Conversation, MarkedText, Replay, Source, TextPair
from lossmask.errors import EpisodeError, InputError, InputProblem, LossmaskError
from lossmask.mask import Masker, MaskOptions
from lossmask.mix import mix
from lossmask.render import RenderOptions, make_renderer
from lossmask.render.base import Label
from lossmask.sources import parse_line, parse_record, read_episodes
from lossmask.special import SpecialStringGuard
from lossmask.tokenizer import TokenizerInfo
from tests.conftest import load_test_tokenizer
from tests.reliability.common import Tally, build_tokenizer, fuzz_settings, no_hang
from tests.reliability.hostile import FORMATS, chance, hostile_text, json_values, nonblank_text, raw_line, record

PROMPT_LABELS = (Label.USER, Label.SYSTEM)
POLICIES = ("reject", "neutralize", "allow")  # --special-in-content, the default first


def check_problem(problem: InputProblem, file: str, line: int) -> None:
    assert isinstance(problem, InputProblem)
    assert (problem.file, problem.line) == (file, line)
    assert problem.reason and problem.message and str(problem).startswith(f"{file}:{line}")


# -- the JSONL reader ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compressed", [False, True], ids=["jsonl", "jsonl.gz"])
def test_fuzz_jsonl_reader(tmp_path_factory, compressed):
    tally = Tally("fuzz: input paths", "JSONL reader" + (" (.gz)" if compressed else ""))

    @fuzz_settings()
    @given(st.lists(raw_line(), max_size=12), st.sampled_from([64 << 20, 64 << 20, 300]))
    def check(lines, limit):
        path = tmp_path_factory.mktemp("jsonl") / ("in.jsonl.gz" if compressed else "in.jsonl")
        data = b"".join(lines)
        path.write_bytes(gzip.compress(data) if compressed else data)
        with no_hang():
            got = list(read_episodes(path, max_line_bytes=limit))
        numbered = [(i, raw) for i, raw in enumerate(data.split(b"\n")[:-1] if data else [], 1) if raw.strip()]
        assert [item.line if isinstance(item, InputProblem) else item.source.line for item in got] == \
            [i for i, _ in numbered], "an episode was lost, invented or misnumbered"
        for item, (i, raw) in zip(got, numbered):
            tally("input lines")
            if isinstance(item, InputProblem):
                check_problem(item, str(path), i)
                tally(f"rejected: {item.reason}")
                continue
            assert item.source == Source(str(path), i)
            if len(raw) <= limit:  # the file reader and the line parser agree
                assert parse_line(raw, Source(str(path), i)) == item
            tally("parsed")

    check()
    tally.write(inputs=tally.counts["input lines"])


def test_fuzz_txt_reader(tmp_path_factory):
    """``.txt`` episodes split at separator lines: every non-blank episode comes back character for character."""
    tally = Tally("fuzz: input paths", ".txt reader")
    lines = st.one_of(st.text(st.characters(blacklist_characters="\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029",
                                            blacklist_categories=("Cs",)), max_size=20),
                      st.sampled_from(["<|endofepisode|>", "  <|endofepisode|>  ", "", "   ", "Response: x"]))

    @fuzz_settings()
    @given(st.lists(lines, max_size=15))
    def check(text_lines):
        path = tmp_path_factory.mktemp("txt") / "in.txt"
        path.write_text("".join(line + "\n" for line in text_lines), encoding="utf-8")
        expected, current, first = [], [], 0
        for number, line in enumerate(text_lines + ["<|endofepisode|>"], 1):
            if line.strip() == "<|endofepisode|>":
                while current and not current[-1].strip():
                    current.pop()
                if current:
                    expected.append((first, "\n".join(current)))
                current, first = [], 0
            elif current or line.strip():
                first = first or number
                current.append(line)
        with no_hang():
            got = list(read_episodes(path))
        assert [(e.source.line, e.text) for e in got] == expected
        assert all(isinstance(e, MarkedText) for e in got)
        tally("episodes", len(got))
        tally("files")

    check()
    tally.write(inputs=tally.counts["files"])


# -- each input format -------------------------------------------------------------------------------------------------
def expected_strings(fmt: str, rec: dict) -> list[str]:
    """Strings of a record that a successful parse must carry over verbatim (the oracle for 'nothing altered')."""
    if fmt == "alpaca":
        return [rec["output"]]
    if fmt in ("marked_text", "replay"):
        return [rec["text"]]
    if fmt == "input_full":
        return [rec["full_text"][len(rec["input_text"]):]]
    if fmt == "prompt_completion" and isinstance(rec["completion"], str):
        return [rec["completion"]]
    return []


def episode_strings(episode) -> list[str]:
    if isinstance(episode, Conversation):
        return [m.content for m in episode.messages] + [episode.system or ""]
    if isinstance(episode, TextPair):
        return [episode.prompt, episode.completion]
    return [episode.text]


@pytest.mark.parametrize("fmt", FORMATS)
def test_fuzz_each_input_format(fmt):
    tally = Tally("fuzz: input paths", f"input format {fmt}")
    forced = "auto" if fmt == "replay" else fmt

    @fuzz_settings(scale=2)
    @given(record(fmt), st.sampled_from(["auto", forced]))
    def check(rec, input_format):
        source = Source("data.jsonl", 7)
        with no_hang():
            try:
                episode = parse_record(rec, source, input_format)
            except InputError as exc:
                check_problem(exc.problem, "data.jsonl", 7)
                tally(f"rejected: {exc.problem.reason}")
                return
        assert episode.source == source
        for text in expected_strings(fmt, rec):
            assert text in episode_strings(episode), f"{text!r} did not survive parsing"
        if isinstance(episode, Conversation):
            assert any(m.loss_weight > 0 for m in episode.messages)
            assert all(math.isfinite(m.loss_weight) and m.loss_weight >= 0 for m in episode.messages)
            for m in episode.messages:
                if m.role == "assistant_toolcall":
                    assert isinstance(m.arguments, dict) and m.name.strip()
        tally(f"parsed as {type(episode).__name__}")

    check()
    tally.write(inputs=sum(tally.counts.values()))


@st.composite
def valid_native(draw) -> tuple[dict, list[tuple[str, str]]]:
    """A native conversation that must parse, and the (role, content) pairs it must parse into."""
    turns = draw(st.integers(1, 3))
    messages, expected = [], []
    for _ in range(turns):
        user, answer = draw(hostile_text), draw(nonblank_text)
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        expected += [("user", user), ("assistant", answer)]
    return {"messages": messages, "system": draw(hostile_text)}, expected


def test_fuzz_valid_records_parse_into_exactly_their_content():
    tally = Tally("fuzz: input paths", "valid conversations (content kept exactly)")

    @fuzz_settings(scale=2)
    @given(valid_native(), st.booleans())
    def check(case, as_openai):
        rec, expected = case
        if as_openai:  # the same conversation in OpenAI form: a system message instead of the top-level field
            rec = {"messages": [{"role": "system", "content": rec["system"]}] + rec["messages"]}
        episode = parse_record(rec, Source("f", 1))
        assert [(m.role, m.content) for m in episode.messages] == expected
        assert episode.system == (rec["messages"][0]["content"] if as_openai else rec["system"])
        tally("parsed exactly")

    check()
    tally.write(inputs=tally.counts["parsed exactly"])


# -- each renderer, through the guard and the mask ------------------------------------------------------------------
class Pipeline:
    """Guard + renderer + masker for one tokenizer and format, as a prepare worker runs them (one guard per policy)."""

    def __init__(self, tok, options: RenderOptions):
        self.tok = tok
        self.info = TokenizerInfo.of(tok)
        self.renderer = make_renderer(tok, self.info, options)
        self.guards = {policy: SpecialStringGuard(self.info.special_tokens, policy) for policy in POLICIES}
        self.masker = Masker(tok, MaskOptions())

    def run(self, episode, policy: str):
        """(guarded episode, rendered list, examples); raises the EpisodeError that rejects the episode."""
        guarded, _ = self.guards[policy].apply(episode)
        rendered = self.renderer.render(guarded)
        examples = self.masker.mask(rendered)
        for example in examples:
            if isinstance(example, EpisodeError):
                raise example
        return guarded, rendered, examples


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    from lossmask.tokenizer import load_tokenizer

    path = tmp_path_factory.mktemp("tiny") / "tok"
    build_tokenizer(path)
    return load_tokenizer(str(path))


RENDERERS = ["chat-template:qwen3", "chat-template:llama3_1", "chat-template:gemma3", "mypt:tiny", "instruction:tiny",
             "instruction:llama2", "text:qwen3"]


@st.composite
def conversation(draw) -> dict:
    messages = []
    for _ in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": draw(hostile_text)})
        answer = {"role": "assistant", "content": draw(nonblank_text)}
        if draw(st.integers(0, 4)) == 0:
            answer["weight"] = draw(st.sampled_from([0, 0.5, 2.0]))
        messages.append(answer)
    assume(any(m.get("weight", 1) > 0 for m in messages if m["role"] == "assistant"))
    rec = {"messages": messages}
    if draw(st.booleans()):
        rec["system"] = draw(nonblank_text)
    return rec


def template_messages(episode: Conversation) -> list[dict]:
    out = [{"role": "system", "content": episode.system}] if episode.system is not None else []
    return out + [{"role": m.role, "content": m.content} for m in episode.messages]


def trained_text(tok, example) -> str:
    ids = [int(t) for t, w in zip(example.input_ids, example.weights) if w > 0]
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def check_chat_template(pipe: Pipeline, episode: Conversation, rendered) -> None:
    """Each trained turn starts exactly where transformers' own generation prompt for that turn ends."""
    msgs = template_messages(episode)

    def render(upto, gen):
        return pipe.tok.apply_chat_template(msgs[:upto], tokenize=False, add_generation_prompt=gen)

    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"
             and episode.messages[i - (episode.system is not None)].loss_weight > 0]
    whole = len(rendered) == 1 and "history_split" not in rendered[0].notes and render(len(msgs), False) == \
        rendered[0].text
    if whole:
        text = rendered[0].text
        starts = {s.start for s in rendered[0].spans if s.weight > 0}
        for i in turns:
            prompt = render(i, True)
            if text.startswith(prompt):
                assert len(prompt) in starts, f"turn {i} is not trained from the end of its generation prompt"
        for m in msgs:
            if m["role"] != "assistant":  # data is rendered literally, never evaluated as template code
                assert m["content"].strip() in text
        return
    assert len(rendered) == len(turns)
    for i, r in zip(turns, rendered):
        prompt = render(i, True)
        assert r.text == render(i + 1, False) and r.text.startswith(prompt)
        assert min(s.start for s in r.spans if s.weight > 0) == len(prompt)


def check_mypt(pipe: Pipeline, episode: Conversation, examples) -> None:
    expected = ""
    for m in episode.messages:
        if m.role == "assistant" and m.loss_weight > 0:
            expected += m.content + "</myPT_assistant><myPT_eot>"
    assert trained_text(pipe.tok, examples[0]) == expected


def check_instruction(pipe: Pipeline, episode: Conversation, examples) -> None:
    def soft(text: str) -> str:  # legacy SentencePiece writes a space after an added token (llama2, --allow)
        for token in pipe.info.added_tokens:
            text = text.replace(token + " ", token)
        return text

    got, at = soft(trained_text(pipe.tok, examples[0])), 0
    for m in episode.messages:
        if m.role == "assistant" and m.loss_weight > 0:
            piece = soft((" " + m.content + "\nEND").lstrip(" "))
            found = got.find(piece, at)
            assert found >= 0, f"{piece!r} is not trained (trained: {got!r})"
            at = found + len(piece)


@pytest.mark.parametrize("renderer", RENDERERS)
def test_fuzz_each_renderer_through_the_mask(renderer, tiny_tok):
    fmt, tok_name = renderer.split(":")
    tok = tiny_tok if tok_name == "tiny" else load_test_tokenizer(tok_name)
    pipe = Pipeline(tok, RenderOptions(format=fmt, response_marker="\nResponse:" if fmt == "text" else None))
    tally = Tally("fuzz: renderers (render + mask + verify)", renderer)
    records = conversation() if fmt != "text" else st.one_of(
        st.fixed_dictionaries({"prompt": hostile_text, "completion": nonblank_text}),
        st.fixed_dictionaries({"_replay": st.just(True), "text": nonblank_text}),
        st.tuples(hostile_text, nonblank_text).map(lambda t: {"text": t[0] + "\nResponse:" + t[1]}))

    @fuzz_settings()
    @given(records, st.sampled_from(POLICIES))
    def check(rec, policy):
        episode = parse_record(rec, Source("f.jsonl", 3))
        with no_hang():
            try:
                guarded, rendered, examples = pipe.run(episode, policy)
            except EpisodeError as exc:
                problem = exc.at("f.jsonl", 3)
                check_problem(problem, "f.jsonl", 3)
                if exc.reason == "special_token_in_content":
                    assert policy == "reject" and exc.field
                tally(f"rejected: {exc.reason}")
                return
        for example in examples:
            trained = example.weights > 0
            assert trained.any() and np.all(np.isfinite(example.weights)) and np.all(example.weights >= 0)
            assert not np.isin(example.labels[trained], [int(x) for x in PROMPT_LABELS]).any()
        if policy != "allow" and isinstance(guarded, Conversation):  # no control token hides in any content
            texts = [guarded.system or ""] + [m.content for m in guarded.messages]
            assert not [t for t in pipe.info.special_tokens for text in texts if t in text]
        if fmt == "chat-template":
            check_chat_template(pipe, guarded, rendered)
        elif fmt == "mypt":
            check_mypt(pipe, guarded, examples)
        elif fmt == "instruction":
            check_instruction(pipe, guarded, examples)
        elif isinstance(guarded, (TextPair, MarkedText)):  # a token straddling the seam may add prompt characters
            if isinstance(guarded, TextPair):
                prompt, answer = guarded.prompt, guarded.completion.removesuffix(tok.eos_token) + tok.eos_token
            else:
                prompt, _, answer = guarded.text.partition("\nResponse:")
                prompt += "\nResponse:"
            got = trained_text(tok, examples[0])
            assert got.endswith(answer) and prompt.endswith(got[: len(got) - len(answer)]), (got, answer)
            assert (got != answer) == (examples[0].straddling > 0)
        elif isinstance(guarded, Replay):
            assert trained_text(tok, examples[0]) == guarded.text
        tally(f"trained correctly ({policy})")

    check()
    tally.write(inputs=sum(tally.counts.values()))


# -- mix -------------------------------------------------------------------------------------------------------------
@st.composite
def mix_source(draw) -> list[bytes]:
    lines = []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["object"] * 6 + ["bom", "json", "bytes", "blank"]))
        if kind in ("object", "bom"):
            obj = draw(st.dictionaries(st.sampled_from(["text", "_meta", "id"]), json_values, max_size=3))
            line = (b"\xef\xbb\xbf" if kind == "bom" else b"") + json.dumps(obj, ensure_ascii=draw(st.booleans())).encode()
        elif kind == "json":
            line = json.dumps(draw(json_values)).encode()
        elif kind == "bytes":
            line = draw(st.binary(max_size=20)).replace(b"\n", b"")
        else:
            line = b"  "
        lines.append(line.replace(b"\n", b"\\n"))
    return lines


def valid_lines(lines: list[bytes]) -> list[bytes]:
    out = []
    for raw in lines:
        try:
            value = json.loads(raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8"))
        except (ValueError, RecursionError):
            continue
        if isinstance(value, dict):
            out.append(raw.removeprefix(b"\xef\xbb\xbf") + b"\n")
    return out


def refusal(message: str) -> str:
    for key, label in (("weight", "bad weight"), ("has no lines", "a source with no lines"),
                       ("--total", "bad --total"), ("has only", "a share larger than its source")):
        if key in message:
            return label
    return message


def test_fuzz_mix(tmp_path_factory):
    tally = Tally("fuzz: input paths", "mix")
    weight = chance(6).flatmap(lambda junk: st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                                                      st.sampled_from(["-1", "nan", "inf", "x", "0", ""]))
                               if junk else st.sampled_from(["1", "0.15", "19.0", "2", "0.5", "0.85"]))
    total = chance(3).flatmap(lambda given_: st.integers(-1, 30) if given_ else st.none())

    @fuzz_settings()
    @given(st.lists(st.tuples(mix_source(), weight), min_size=1, max_size=3), st.booleans(), st.booleans(),
           st.booleans(), st.sampled_from(["skip", "fail"]), total, st.booleans())
    def check(sources, shuffle, allow_repeat, tag, on_error, total, tiny_memory):
        root = tmp_path_factory.mktemp("mix")
        specs = []
        for i, (lines, w) in enumerate(sources):
            (root / f"s{i}.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))
            specs.append(f"{root}/s{i}.jsonl:{w}")
        out = root / "out.jsonl"
        with no_hang():
            try:
                report = mix(specs, out, total=total, shuffle=shuffle, allow_repeat=allow_repeat, tag_source=tag,
                             on_error=on_error, seed=3, shuffle_memory=64 if tiny_memory else 1 << 20)
            except InputError as exc:
                problem = exc.problem
                bad = Path(problem.file).read_bytes().split(b"\n")[problem.line - 1]
                assert not valid_lines([bad]) or problem.reason == "bad_type", f"{problem} names a good line"
                assert not out.exists() and sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []
                tally(f"refused: {problem.reason} (file:line named)")
                return
            except LossmaskError as exc:
                assert not out.exists(), "a failed mix left an output"
                assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []
                tally("refused: " + refusal(str(exc)))
                return
        written = out.read_bytes().split(b"\n")[:-1]
        assert len(written) == report.total == sum(s.taken for s in report.sources)
        pool = Counter()
        for (lines, _), s in zip(sources, report.sources):
            good = valid_lines(lines)
            assert s.available == len(good)
            if not tag:
                for line in good:
                    pool[line] += s.taken // max(1, len(good)) + 1 if allow_repeat else 1
        if not tag:  # every output line is an input line, byte for byte, and none is used more than allowed
            assert not Counter(line + b"\n" for line in written) - pool, "mix wrote a line no input has"
        else:
            assert all(json.loads(line)["_meta"]["mix_source"] for line in written)
        tally("mixed correctly")

    check()
    tally.write(inputs=sum(tally.counts.values()))


# -- convert ---------------------------------------------------------------------------------------------------------
tool_call = st.one_of(
    st.fixed_dictionaries({"name": nonblank_text, "arguments": st.dictionaries(st.text(max_size=4), st.integers())})
    .map(json.dumps),
    st.sampled_from(["{'name': 'f', 'arguments': {'a': 1}}", "f(a=1, b='x')", "[f(), g(x=[1, 2])]", "os.system('x')",
                     "__import__('os').system('touch /tmp/pwned')", "f(*a)", "{not json", "[]", "{\"name\": 1}"]),
    hostile_text,
)
calls = st.lists(tool_call.map(lambda c: f"<tool_call>{c}</tool_call>"), min_size=1, max_size=2).map("".join)
xml_text = st.one_of(
    st.tuples(st.text("abc .", max_size=10), calls).map("".join),
    st.lists(st.one_of(hostile_text, calls, st.sampled_from(["<tool_call>", "</tool_call>", "<tools>[]</tools>",
                                                             "<tool_response>{}</tool_response>"])),
             max_size=3).map("".join),
)


@st.composite
def chat_row(draw, kind: str) -> dict:
    """A conversation row: system?, then human/gpt turns (tool-xml: a call, its response, the answer)."""
    text = xml_text if kind == "tool-xml" else hostile_text
    turns = [{"from": "system", "value": draw(text)}] if draw(chance(3)) else []
    for _ in range(draw(st.integers(1, 3))):
        turns.append({"from": draw(st.sampled_from(["human", "user"])), "value": draw(hostile_text)})
        turns.append({"from": draw(st.sampled_from(["gpt", "assistant"])), "value": draw(text)})
        if kind == "tool-xml" and draw(chance(2)):
            turns.append({"from": draw(st.sampled_from(["tool", "observation"])),
                          "value": f"<tool_response>{draw(hostile_text)}</tool_response>"})
            turns.append({"from": "gpt", "value": draw(nonblank_text)})
    if draw(chance(8)):
        turns[draw(st.integers(0, len(turns) - 1))]["from"] = draw(st.sampled_from(["bot", "system", "tool", "x"]))
    return {"conversations": turns}


@st.composite
def oasst_rows(draw, tree: int) -> list[dict]:
    """Message rows of one tree: a prompt and replies alternating roles, ranked; some deleted, some out of place."""
    rows = [{"message_id": f"t{tree}m0", "parent_id": None, "role": "prompter"}]
    for j in range(1, draw(st.integers(1, 7))):
        parent = draw(st.sampled_from(rows))
        role = "assistant" if parent["role"] == "prompter" else "prompter"
        rows.append({"message_id": f"t{tree}m{j}", "parent_id": parent["message_id"], "role": role})
    for row in rows:
        row.update(text=draw(hostile_text), lang=draw(st.sampled_from(["en", "de", None])),
                   rank=draw(st.sampled_from([0, 1, 2, None])), deleted=draw(chance(8)),
                   review_result=not draw(chance(8)), message_tree_id=f"t{tree}")
    if draw(chance(6)):  # a cycle, a dangling parent or a wrong role
        row = draw(st.sampled_from(rows))
        row[draw(st.sampled_from(["parent_id", "role"]))] = draw(st.sampled_from(["missing", row["message_id"], "x"]))
    return rows


@st.composite
def convert_rows(draw, kind: str) -> list[dict]:
    rows = []
    for i in range(draw(st.integers(1, 5))):
        if kind == "alpaca":
            rows.append({"instruction": draw(hostile_text), "input": draw(hostile_text), "output": draw(hostile_text)})
        elif kind == "oasst2":
            rows += draw(oasst_rows(i))
        else:
            rows.append(draw(chat_row(kind)))
    return rows


@pytest.mark.parametrize("kind", ["alpaca", "sharegpt", "tool-xml", "oasst2"])
def test_fuzz_convert(kind, tmp_path_factory, monkeypatch):
    import datasets

    from lossmask.convert import convert

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-cache")))
    datasets.disable_progress_bars()
    tally = Tally("fuzz: input paths", f"convert {kind}")

    @fuzz_settings(scale=0.25)
    @given(convert_rows(kind), st.one_of(st.none(), st.integers(1, 3)))
    def check(rows, max_examples):
        root = tmp_path_factory.mktemp("convert")
        source = root / "rows.jsonl"
        source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        out = root / "out.jsonl"
        with no_hang():
            try:
                report = convert(kind, str(source), str(out), max_examples=max_examples)
            except LossmaskError:
                assert not out.exists()
                tally("refused with a lossmask error")
                return
        lines = out.read_bytes().decode("utf-8").split("\n")[:-1]  # JSONL lines end at \n only
        assert len(lines) == report.episodes_written
        for n, line in enumerate(lines, 1):  # every written line is an episode prepare accepts
            parse_record(json.loads(line), Source(str(out), n))
        if kind != "oasst2":
            assert report.rows_read == len(rows) == report.valid + sum(report.rejected.values())
        assert report.episodes_written == min(report.valid, max_examples or report.valid)
        assert not (Path("/tmp/pwned")).exists()
        tally("converted", report.episodes_written)
        for reason, n in report.rejected.items():
            tally(f"rejected: {reason}", n)
        tally("sources")

    check()
    tally.write(inputs=tally.counts["sources"] + tally.counts["refused with a lossmask error"])


# -- empty inputs ----------------------------------------------------------------------------------------------------
def test_empty_and_blank_files_are_clear_errors(tmp_path, tiny_tok):
    from lossmask.prepare import PrepareOptions, prepare

    for content in (b"", b"\n\n  \n"):
        path = tmp_path / "empty.jsonl"
        path.write_bytes(content)
        assert list(read_episodes(path)) == []
        with pytest.raises(LossmaskError, match="no episode was kept from 0 input episodes"):
            prepare(PrepareOptions([str(path)], tiny_tok.name_or_path, str(tmp_path / "ds"),
                                   render=RenderOptions(format="mypt")), progress=False)
        assert not (tmp_path / "ds").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".ds")]
        with pytest.raises(LossmaskError, match="has no lines"):
            mix([f"{path}:1"], tmp_path / "out.jsonl")
        assert not (tmp_path / "out.jsonl").exists()
