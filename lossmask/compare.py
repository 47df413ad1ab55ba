"""``lossmask compare``: checkpoints side by side on one eval file (e.g. base, SFT and DPO).

Models are loaded one after another, never two at once: each is scored, deleted, garbage-collected and
(on CUDA) its cached memory released before the next one loads.

The eval file is JSONL. An episode line gives a prompt: everything before its final assistant message
(a conversation may also end with a user message; earlier assistant turns are history). A pair line
(pairs.py schema) gives its prompt and a held-out pair; a prompt is generated from once, however many
lines share it. Each model renders prompts with its own tokenizer and the renderer of ``render`` (chat
template by default), exactly as training rendered them: the prompt is the rendered text up to the first
token the mask would train.

Criteria (the pattern checks say so in the report):

- format compliance (pattern check): greedy generation of up to ``max_new_tokens`` tokens must contain the
  format's end sequence (the text of the stop span(s) the renderer trains: ``<|im_end|>``,
  ``</myPT_assistant><myPT_eot>``, ``\\nEND``, EOS) after a non-blank answer; the answer must hold no
  special token but the format's inner block tags (mypt think/cite/toolcall, balanced) and no role marker
  written as text at a line start (``User:``, ``Assistant:``, ``Instruction:``, ``Response:``,
  ``System:``); nothing but whitespace may follow the end. Failures are counted by their first reason.
- refusal rate (pattern check): generations matching ``negatives.REFUSAL_PATTERN`` among prompts that
  should be answered (every prompt but those with ``_meta.should_refuse: true``).
- preference accuracy (log-likelihood): the share of pairs whose chosen side has the higher
  ``Σ w·log p`` over its trained tokens (masked exactly as ``prepare --pairs`` masks it); also per token
  (the mean log-probability), which does not favour the shorter response.
- average length: generated tokens up to and including the end sequence (all of them when it is missing).
"""
from __future__ import annotations

import gc
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lossmask.episode import TRAINED_BY_DEFAULT, Conversation, Episode, Message, Source
from lossmask.errors import EpisodeError, InputError, LossmaskError
from lossmask.render import RenderOptions
from lossmask.render.base import Label, Rendered

ROLE_MARKER = re.compile(r"^\s*(User|Assistant|Instruction|Response|System)\s*:", re.MULTILINE)
BLOCK_TAGS = ("myPT_think", "myPT_cite", "myPT_toolcall")  # tags an answer may hold (balanced)
_DUMMY_ANSWER = "x"


@dataclass
class _Prompt:
    episode: Episode  # the prompt with a placeholder answer as its only trained turn
    should_refuse: bool


@dataclass
class ModelScores:
    """One model's results; rates are None when there was nothing to measure them on."""

    name: str
    path: str
    prompts: int = 0
    format_compliance: float | None = None
    format_failures: dict[str, int] = field(default_factory=dict)
    answerable: int = 0
    refusal_rate: float | None = None
    pairs: int = 0
    pairs_skipped: int = 0  # pairs that could not be rendered/masked with this model's tokenizer
    preference_accuracy: float | None = None
    preference_accuracy_per_token: float | None = None
    mean_length: float | None = None
    samples: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Comparison:
    eval_file: str
    max_new_tokens: int
    models: list[ModelScores]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_models(spec: str) -> list[tuple[str, str]]:
    """``"base=DIR,sft=DIR,dpo=DIR"`` → [(name, path), ...] in order; names must be unique."""
    out: list[tuple[str, str]] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise LossmaskError(f"--models item {item!r} must be NAME=CHECKPOINT (e.g. sft=runs/sft/final)")
        if any(name.strip() == n for n, _ in out):
            raise LossmaskError(f"--models names {name.strip()!r} twice; give every model its own name")
        out.append((name.strip(), path.strip()))
    if not out:
        raise LossmaskError("--models names no model; give NAME=CHECKPOINT,...")
    return out


def read_eval_file(path: str | Path) -> tuple[list[_Prompt], list]:
    """(prompts, pairs) of an eval file; a bad line is an error naming file, line and field."""
    from lossmask.pairs import is_pair_record, parse_pair
    from lossmask.sources import load_line, parse_record

    name = str(path)
    if not Path(name).is_file():
        raise LossmaskError(f"eval file {name} does not exist (or is not a file)")
    prompts: list[_Prompt] = []
    pairs = []
    with open(name, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.isspace():
                continue
            source = Source(name, lineno)
            try:
                obj = load_line(raw)
                if is_pair_record(obj):
                    pair = parse_pair(obj, source)
                    pairs.append(pair)
                    prompts.append(_Prompt(pair.chosen, _should_refuse(obj)))
                    continue
                episode = _as_prompt(_parse_prompt(obj, source, parse_record))
            except EpisodeError as exc:
                raise LossmaskError(str(exc.at(name, lineno))) from None
            except InputError as exc:
                raise LossmaskError(str(exc)) from None
            prompts.append(_Prompt(episode, _should_refuse(obj)))
    if not prompts:
        raise LossmaskError(f"eval file {name} holds no prompt")
    return prompts, pairs


def _should_refuse(obj: dict) -> bool:
    meta = obj.get("_meta")
    return isinstance(meta, dict) and meta.get("should_refuse") is True


def _parse_prompt(obj: Any, source: Source, parse_record) -> Episode:
    """An episode line; a conversation that ends with a user message gets a placeholder answer."""
    messages = obj.get("messages") if isinstance(obj, dict) else None
    last = messages[-1] if isinstance(messages, list) and messages else None
    if isinstance(last, dict) and last.get("role") == "user":
        obj = {**obj, "messages": [*messages, {"role": "assistant", "content": _DUMMY_ANSWER}]}
    return parse_record(obj, source)


def _as_prompt(episode: Episode) -> Episode:
    """The episode with its final assistant message a placeholder, the only trained turn (history untrained)."""
    if not isinstance(episode, Conversation):
        return episode
    messages = list(episode.messages)
    if messages[-1].role != "assistant":
        messages.append(Message("assistant", _DUMMY_ANSWER))
    history = [replace(m, train=False, weight=None) if m.role in TRAINED_BY_DEFAULT else m for m in messages[:-1]]
    return replace(episode, messages=(*history, Message("assistant", _DUMMY_ANSWER)))


def prompt_and_end(rendered: Rendered) -> tuple[str, str]:
    """(the text before the first trained token, the end sequence: the text of the trailing stop spans)."""
    trained = rendered.trained_spans
    if not trained or trained[-1].label != Label.STOP:
        raise LossmaskError("the renderer trains no stop for this prompt's answer: cannot judge format compliance")
    first = len(trained) - 1
    while first > 0 and trained[first - 1].label == Label.STOP:
        first -= 1
    end = "".join(rendered.text[s.start : s.end] for s in trained[first:])
    return rendered.text[: trained[0].start], end


def judge_format(generation: str, end: str, special_tokens: set[str]) -> str | None:
    """The first reason a generation breaks the format (``no_stop``, ``empty``, ``bad_tags``, ``role_marker``,
    ``text_after``), or None when it complies. A pattern check (see the module docstring)."""
    at = generation.find(end)
    if at < 0:
        return "no_stop"
    answer, after = generation[:at], generation[at + len(end) :]
    if not answer.strip():
        return "empty"
    if not _tags_valid(answer, special_tokens):
        return "bad_tags"
    if ROLE_MARKER.search(answer):
        return "role_marker"
    if after.strip():
        return "text_after"
    return None


def _tags_valid(answer: str, special_tokens: set[str]) -> bool:
    allowed = {f"<{t}>": t for t in BLOCK_TAGS} | {f"</{t}>": t for t in BLOCK_TAGS}
    found = sorted((m.start(), tok) for tok in special_tokens if tok for m in re.finditer(re.escape(tok), answer))
    open_tags: list[str] = []
    for _, tok in found:
        if tok not in allowed:
            return False
        if tok.startswith("</"):
            if not open_tags or open_tags.pop() != allowed[tok]:
                return False
        else:
            open_tags.append(allowed[tok])
    return not open_tags


def compare_models(
    models: list[tuple[str, str]],
    eval_file: str | Path,
    *,
    render: RenderOptions = RenderOptions(),
    max_new_tokens: int = 64,
    batch_size: int = 16,
    samples: int = 3,
    json_out: str | Path | None = None,
) -> Comparison:
    """Score every model on the eval file, one model in memory at a time (see the module docstring)."""
    import torch

    from lossmask.train.generate import load_for_inference

    if max_new_tokens < 1 or batch_size < 1:
        raise LossmaskError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
    prompts, pairs = read_eval_file(eval_file)
    report = Comparison(str(eval_file), max_new_tokens, [])
    for name, path in models:
        model, tokenizer = load_for_inference(path)
        try:
            report.models.append(_score(name, str(path), model, tokenizer, prompts, pairs, render,
                                        max_new_tokens, batch_size, samples))
        finally:
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if json_out is not None:
        from lossmask.train.checkpoint import write_json

        write_json(Path(json_out), report.to_dict())
    return report


def _score(name, path, model, tokenizer, prompts, pairs, render, max_new_tokens, batch_size, n_samples) -> ModelScores:
    from lossmask.negatives import looks_like_refusal
    from lossmask.render import make_renderer
    from lossmask.tokenizer import TokenizerInfo

    info = TokenizerInfo.of(tokenizer)
    renderer = make_renderer(tokenizer, info, render)
    rendered: dict[str, tuple[str, bool]] = {}  # prompt text -> (end sequence, should refuse); pairs share prompts
    for p in prompts:
        try:
            text, end = prompt_and_end(renderer.render(p.episode)[0])
        except EpisodeError as exc:
            raise LossmaskError(f"{p.episode.source.file}:{p.episode.source.line}: {exc}") from None
        rendered.setdefault(text, (end, p.should_refuse))
    texts = list(rendered)
    ends = [rendered[t][0] for t in texts]
    scores = ModelScores(name, path, prompts=len(texts))
    generated = generate_batch(model, tokenizer, texts, ends, max_new_tokens, batch_size)
    special = set(info.special_tokens)
    failures: dict[str, int] = {}
    lengths = []
    refused = answerable = 0
    for text, end, (generation, length) in zip(texts, ends, generated):
        reason = judge_format(generation, end, special)
        if reason is not None:
            failures[reason] = failures.get(reason, 0) + 1
        lengths.append(length)
        if not rendered[text][1]:
            answerable += 1
            refused += looks_like_refusal(generation.split(end)[0])
        if len(scores.samples) < n_samples:
            scores.samples.append({"prompt": text[-200:], "generation": generation, "verdict": reason or "ok"})
    scores.format_compliance = 1 - sum(failures.values()) / len(texts)
    scores.format_failures = dict(sorted(failures.items()))
    scores.answerable = answerable
    scores.refusal_rate = refused / answerable if answerable else None
    scores.mean_length = sum(lengths) / len(lengths)
    if pairs:
        _preference(scores, model, tokenizer, pairs, render, batch_size)
    return scores


def _preference(scores: ModelScores, model, tokenizer, pairs, render: RenderOptions, batch_size: int) -> None:
    """Preference accuracy by summed (and per-token) log-likelihood of the two sides of each pair."""
    import torch

    from lossmask.pairs import encode_pairs
    from lossmask.train.data import collate
    from lossmask.train.dpo import sequence_logps
    from lossmask.train.loss import forward_logits

    encoded = [e for e in encode_pairs(pairs, tokenizer, render) if isinstance(e, tuple)]
    scores.pairs, scores.pairs_skipped = len(encoded), len(pairs) - len(encoded)
    if not encoded:
        return
    device = next(model.parameters()).device
    wins = wins_per_token = 0
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            items = [{"input_ids": ex.input_ids, "loss_mask": ex.weights} for pair in chunk for ex in pair]
            batch = collate(items, max(len(it["input_ids"]) for it in items)).to(device)
            logps = sequence_logps(forward_logits(model, batch), batch.targets, batch.weights)
            weights = batch.weights.sum(dim=1)
            chosen, rejected = logps[0::2], logps[1::2]
            wins += int((chosen > rejected).sum())
            wins_per_token += int((chosen / weights[0::2] > rejected / weights[1::2]).sum())
    scores.preference_accuracy = wins / len(encoded)
    scores.preference_accuracy_per_token = wins_per_token / len(encoded)


def generate_batch(
    model, tokenizer, texts: list[str], ends: list[str], max_new_tokens: int, batch_size: int
) -> list[tuple[str, int]]:
    """Greedy (generation, length) per prompt text: stopped at its end sequence, EOS or ``max_new_tokens``.

    Prompts are batched by length with left padding. ``length`` counts generated tokens up to and
    including the end sequence (all generated tokens when it is missing); the generation is decoded with
    its special tokens and without the batch's padding.
    """
    import torch
    from transformers import StoppingCriteriaList

    from lossmask.train.generate import StopOnText

    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    vocab = tokenizer.get_vocab()
    stop_ids = {tokenizer.eos_token_id} | {vocab[e] for e in ends if e in vocab}
    stop_ids.discard(None)
    device = next(model.parameters()).device
    out: list[tuple[str, int]] = [("", 0)] * len(texts)
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attention = torch.zeros_like(ids)
            for k, i in enumerate(rows):
                ids[k, width - len(encoded[i]) :] = torch.tensor(encoded[i], dtype=torch.long)
                attention[k, width - len(encoded[i]) :] = 1
            stops = sorted({ends[i] for i in rows})
            with torch.no_grad():
                generated = model.generate(
                    input_ids=ids.to(device), attention_mask=attention.to(device), max_new_tokens=max_new_tokens,
                    do_sample=False, eos_token_id=sorted(stop_ids) or None, pad_token_id=pad,
                    stopping_criteria=StoppingCriteriaList([StopOnText(tokenizer, stops, width)]),
                )
            for k, i in enumerate(rows):
                out[i] = _trim(tokenizer, generated[k, width:].tolist(), ends[i], stop_ids, pad)
    finally:
        model.train(was_training)
    return out


def _trim(tokenizer, new: list[int], end: str, stop_ids: set[int], pad: int) -> tuple[str, int]:
    """The generation up to its end sequence, else up to its first stop id (EOS), else without the padding
    generate adds after a finished row."""
    for k in range(1, len(new) + 1):
        if end in tokenizer.decode(new[:k], skip_special_tokens=False):
            return tokenizer.decode(new[:k], skip_special_tokens=False), k
    stop = next((k for k, t in enumerate(new) if t in stop_ids), None)
    if stop is not None:
        new = new[: stop + 1]
    while new and new[-1] == pad and pad not in stop_ids:
        new = new[:-1]
    return tokenizer.decode(new, skip_special_tokens=False), len(new)


def print_comparison(report: Comparison, console: Console | None = None) -> None:
    """The side-by-side table; pattern-check criteria are named as such."""
    console = console or Console()
    table = Table(title=f"lossmask compare on {report.eval_file}", title_justify="left")
    table.add_column("criterion", style="bold")
    for m in report.models:
        table.add_column(m.name, justify="right")

    def rate(value: float | None) -> str:
        return "-" if value is None else f"{value:.1%}"

    models = report.models
    first = models[0] if models else ModelScores("", "")
    rows = [
        (f"format compliance (pattern check, {first.prompts} prompts)", [rate(m.format_compliance) for m in models]),
        ("  failures", [", ".join(f"{k} {v}" for k, v in m.format_failures.items()) or "-" for m in models]),
        (f"refusal rate (pattern check, {first.answerable} prompts to answer)", [rate(m.refusal_rate) for m in models]),
        (f"preference accuracy (Σ log-likelihood, {first.pairs} pairs)",
         [rate(m.preference_accuracy) for m in models]),
        ("preference accuracy (per-token log-likelihood)", [rate(m.preference_accuracy_per_token) for m in models]),
        (f"average length (generated tokens, max {report.max_new_tokens})",
         ["-" if m.mean_length is None else f"{m.mean_length:.1f}" for m in models]),
    ]
    for label, values in rows:
        table.add_row(label, *values)
    console.print(table)
    for m in report.models:
        if m.pairs_skipped:
            console.print(f"[yellow]{m.name}: {m.pairs_skipped} pairs could not be masked with its tokenizer (skipped)")
