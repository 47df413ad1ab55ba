"""``lossmask pipeline CONFIG``: one curriculum phase end to end, generate → mix → prepare → train → gate.

A phase writes everything under ``OUT/phaseKEY/`` (``OUT`` is shared by all phases of a curriculum)::

    data/train.jsonl       generated training episodes        (lossmask generate-data)
    data/held_out.jsonl    generated held-out prompts          (lossmask generate-data --held-out)
    tokenizer/             only with ``tokenizer: build``       (lossmask build-tokenizer)
    data/mix.jsonl         with replay: train + earlier phases + pre-training text   (lossmask mix)
    dataset/               the prepared (packed) dataset       (lossmask prepare)
    model/                 the training run; model/final is its checkpoint          (lossmask train)
    gate.json              the gate reports                    (lossmask gate)
    pipeline_state.json    which step ran with which command

Curriculum order (``gate.CURRICULUM``): 1 → 2 → 3 → 4 → 1b → 5 → 6. Context extension (1b) sits right
before the tool phases, whose tool results need the longer context. Each phase starts from the previous
phase's checkpoint (``train --init-from``) and replays ``replay.share`` of every earlier phase's training
data plus ``replay.pretrain_share`` of pre-training text (a ``lossmask replay`` file;
``mix.replay_schedule``), so the mix is the phase's own data at the remaining share. The mix is sized so
that every generated episode of the phase is in it exactly once (``--total`` ≈ n / its share) and repeats
a replay source that is too small.

A tiny preset checks the plumbing of the whole chain in minutes; its models are too small to pass the gates
after phase 1 (a failed gate is reported, and the next phase still runs from that checkpoint).

Config (YAML; an unknown key at any level is an error naming it and the closest valid key):

- ``phase``: 1-6 or 1b. ``name``: a label. ``out``: the curriculum's root (default ``runs/curriculum``).
- ``model``: a preset (``tiny``, ``mypt-750m``) or a model directory; a later phase trains this
  architecture from ``previous``'s weights. ``previous``: the previous phase's key (its directory under
  ``out``), a phase directory, or null for the first phase.
- ``tokenizer``: ``build`` (the demo's byte-level BPE with the myPT tokens, trained on this phase's
  data), ``previous`` (the previous phase's checkpoint's tokenizer) or a tokenizer directory.
- ``data``: ``n``, ``held_out`` (gate prompts), ``languages``, ``seed``, ``options`` (generator options).
- ``replay``: ``phases`` (earlier phase keys or directories), ``share`` (of each), ``pretrain`` (a JSONL
  replay file or null), ``pretrain_share``.
- ``prepare``: ``format`` (mypt, what the gates render), ``weighted_mask``, ``pack`` (block size, or null
  where episodes are too long for packing to pay), ``pack_by_field``, ``max_length``, ``val_split``,
  ``workers``.
- ``train``: TrainConfig keys (``lossmask/train/config.py``), passed as ``--set`` overrides; null leaves a
  key at its default (a preset can unset ``epochs`` to set ``max_iters``). Architecture keys only apply
  to a preset trained from scratch (no ``previous``).
- ``gate``: ``regression`` (also gate every earlier phase), ``n`` (generated prompts per earlier phase),
  ``batch_size``, ``ood`` (the out-of-distribution warnings).
- ``presets``: named partial configs merged over the rest (``--preset tiny``: small sizes and iterations
  for a quick end-to-end check of the whole chain on a CPU).

Relative paths are relative to the working directory. Resuming: a step is skipped when its outputs exist
and ``pipeline_state.json`` says the same command made them; an interrupted training run resumes from its
last checkpoint. Once a step runs, every later step runs again (its inputs changed). Outputs made by a
different command are an error, never overwritten, unless ``force``.
"""
from __future__ import annotations

import difflib
import json
import math
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from lossmask.errors import LossmaskError

DEFAULT_OUT = "runs/curriculum"
STATE_FILE = "pipeline_state.json"

_TOP = ("phase", "name", "out", "model", "tokenizer", "previous", "data", "replay", "prepare", "train", "gate",
        "presets")
_DATA: dict[str, Any] = {"n": None, "held_out": 100, "languages": ["en", "de"], "seed": 0, "options": {}}
_REPLAY: dict[str, Any] = {"phases": [], "share": 0.03, "pretrain": None, "pretrain_share": 0.05}
_PREPARE: dict[str, Any] = {"format": "mypt", "weighted_mask": True, "pack": None, "pack_by_field": None,
                            "max_length": None, "val_split": 0.05, "workers": 1}
_GATE: dict[str, Any] = {"regression": True, "n": None, "batch_size": 32, "ood": True}


@dataclass(frozen=True)
class Pipeline:
    """A validated phase config (see the module docstring)."""

    source: str
    phase: str
    name: str
    out: Path
    model: str
    tokenizer: str
    previous: Path | None
    data: dict[str, Any]
    replay: dict[str, Any]
    prepare: dict[str, Any]
    train: dict[str, Any]
    gate: dict[str, Any]

    @property
    def dir(self) -> Path:
        return phase_dir(self.out, self.phase)


@dataclass
class Step:
    """One step: the CLI command it equals, what it reads and writes, and the function that does it.

    ``action(redo, resume)``: ``redo`` replaces outputs a previous run left; ``resume`` continues an
    interrupted one (training). ``complete()`` says whether the outputs are all there.
    """

    name: str
    command: list[str]
    inputs: list[Path]
    outputs: list[Path]
    action: Callable[[bool, bool], Any]
    complete: Callable[[], bool]
    resumable: bool = False

    @property
    def shell(self) -> str:
        return shlex.join(self.command)


@dataclass
class PipelineResult:
    """What ``run`` did: steps run and skipped, the gate reports when the gate ran, and whether the gates
    passed (read back from ``gate.json`` when the gate step was skipped; None for a dry run)."""

    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    gate_reports: list | None = None
    passed: bool | None = None


# ---- config --------------------------------------------------------------------------------------------


def phase_dir(out: Path, phase: str) -> Path:
    return Path(out) / f"phase{phase}"


def load_pipeline(path: str | Path, overrides: dict[str, Any] | None = None, preset: str | None = None) -> Pipeline:
    """Read a pipeline config, merge ``presets[preset]`` and then ``overrides`` over it, and validate it.

    ``overrides`` keys may be dotted (``{"train.lr": 1e-4}``) or nested mappings.
    """
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise LossmaskError(f"cannot read pipeline config {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise LossmaskError(f"{path}{line}: invalid YAML: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(raw, dict):
        raise LossmaskError(f"{path}: a pipeline config must be a mapping of keys, got {type(raw).__name__}")
    where = str(path)
    _check_keys(raw, _TOP, where)
    presets = raw.pop("presets", None) or {}
    if not isinstance(presets, dict):
        raise LossmaskError(f"{where}: presets must be a mapping of preset name -> partial config")
    if preset is not None:
        if preset not in presets:
            known = ", ".join(presets) or "none"
            raise LossmaskError(f"{where}: no preset {preset!r} in this config (presets: {known})")
        _check_keys(presets[preset], _TOP[:-1], f"{where}: presets.{preset}")
        raw = _merge(raw, presets[preset])
    if overrides:
        raw = _merge(raw, _undot(overrides))
        _check_keys(raw, _TOP[:-1], f"{where} (overrides)")
    return _validate(raw, where)


def _validate(raw: dict, where: str) -> Pipeline:
    from lossmask.gate.run import phase_key
    from lossmask.train.config import config_from_dict
    from lossmask.train.models import ARCH_FIELDS

    for key in ("phase", "model", "tokenizer"):
        if raw.get(key) in (None, ""):
            raise LossmaskError(f"{where}: missing required key {key!r}")
    phase = phase_key(raw["phase"])
    out = Path(_string(raw.get("out", DEFAULT_OUT), "out", where))
    data = _section(raw.get("data"), _DATA, "data", where)
    replay = _section(raw.get("replay"), _REPLAY, "replay", where)
    prepare = _section(raw.get("prepare"), _PREPARE, "prepare", where)
    gate = _section(raw.get("gate"), _GATE, "gate", where)
    train = raw.get("train") or {}
    if not isinstance(train, dict):
        raise LossmaskError(f"{where}: train must be a mapping of TrainConfig keys")
    config_from_dict(train, f"{where}: train")
    train = {key: value for key, value in train.items() if value is not None}  # null: TrainConfig's default
    previous = raw.get("previous")
    previous_dir = None if previous in (None, "") else _phase_path(out, previous)
    tokenizer = _string(raw["tokenizer"], "tokenizer", where)
    if tokenizer == "previous" and previous_dir is None:
        raise LossmaskError(f"{where}: tokenizer: previous needs a previous phase (set previous)")
    arch = [k for k in train if k in ARCH_FIELDS]
    if previous_dir is not None and arch:
        raise LossmaskError(
            f"{where}: train.{arch[0]} only applies to a preset trained from scratch; this phase starts from "
            f"{previous_dir}: remove it"
        )
    _check_data(data, where)
    _check_replay(replay, where)
    _check_prepare(prepare, where)
    _check_gate(gate, where)
    replay = {**replay, "phases": [str(_phase_path(out, p)) for p in replay["phases"]]}
    return Pipeline(
        source=where, phase=phase, name=str(raw.get("name") or f"phase {phase}"), out=out,
        model=_string(raw["model"], "model", where), tokenizer=tokenizer, previous=previous_dir,
        data=data, replay=replay, prepare=prepare, train=dict(train), gate=gate,
    )


def _phase_path(out: Path, value: Any) -> Path:
    """A phase key ("1", 2, "1b") → its directory under ``out``; anything else is a directory path."""
    from lossmask.gate.run import PHASE_KEYS

    text = str(value).strip()
    key = text.lower().removeprefix("phase")
    return phase_dir(out, key) if key in PHASE_KEYS else Path(text)


def _check_keys(data: Any, allowed: tuple[str, ...] | dict, where: str) -> None:
    if not isinstance(data, dict):
        raise LossmaskError(f"{where}: expected a mapping, got {type(data).__name__}")
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(allowed)}"
            raise LossmaskError(f"{where}: unknown key {key!r}{hint}")


def _section(data: Any, defaults: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    data = {} if data is None else data
    _check_keys(data, defaults, f"{where}: {name}")
    return {**defaults, **data}


def _merge(base: dict, over: dict) -> dict:
    """``over`` merged into ``base``: mappings merge key by key, except generator ``options`` (replaced whole)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "options":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _undot(overrides: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        *parents, last = str(key).split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def _string(value: Any, key: str, where: str) -> str:
    if not isinstance(value, (str, int)) or isinstance(value, bool) or str(value).strip() == "":
        raise LossmaskError(f"{where}: {key} must be a non-empty string, got {value!r}")
    return str(value)


def _number(value: Any, key: str, where: str, low: float, high: float, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise LossmaskError(f"{where}: {key} must be {kind} from {low:g} to {high:g}, got {value!r}")


def _check_data(data: dict, where: str) -> None:
    if data["n"] is None:
        raise LossmaskError(f"{where}: missing required key 'data.n' (training episodes to generate)")
    _number(data["n"], "data.n", where, 1, math.inf, integer=True)
    _number(data["held_out"], "data.held_out", where, 1, math.inf, integer=True)
    _number(data["seed"], "data.seed", where, 0, math.inf, integer=True)
    languages = data["languages"]
    if not isinstance(languages, list) or not languages or not all(isinstance(x, str) for x in languages):
        raise LossmaskError(f"{where}: data.languages must be a list of language codes, e.g. [en, de]")
    if not isinstance(data["options"], dict):
        raise LossmaskError(f"{where}: data.options must be a mapping of generator options")


def _check_replay(replay: dict, where: str) -> None:
    if not isinstance(replay["phases"], list):
        raise LossmaskError(f"{where}: replay.phases must be a list of earlier phases (keys or directories)")
    _number(replay["share"], "replay.share", where, 0.001, 0.5)
    _number(replay["pretrain_share"], "replay.pretrain_share", where, 0, 0.5)
    if replay["pretrain"] is not None:
        _string(replay["pretrain"], "replay.pretrain", where)


def _check_prepare(prepare: dict, where: str) -> None:
    if prepare["format"] != "mypt":
        raise LossmaskError(f"{where}: prepare.format must be mypt: the curriculum's gates render myPT prompts")
    if not isinstance(prepare["weighted_mask"], bool):
        raise LossmaskError(f"{where}: prepare.weighted_mask must be true or false")
    for key in ("pack", "max_length"):
        if prepare[key] is not None:
            _number(prepare[key], f"prepare.{key}", where, 2, math.inf, integer=True)
    if prepare["pack_by_field"] is not None and prepare["pack"] is None:
        raise LossmaskError(f"{where}: prepare.pack_by_field needs prepare.pack")
    _number(prepare["val_split"], "prepare.val_split", where, 0, 0.5)
    _number(prepare["workers"], "prepare.workers", where, 1, 1024, integer=True)


def _check_gate(gate: dict, where: str) -> None:
    for key in ("regression", "ood"):
        if not isinstance(gate[key], bool):
            raise LossmaskError(f"{where}: gate.{key} must be true or false")
    if gate["n"] is not None:
        _number(gate["n"], "gate.n", where, 1, math.inf, integer=True)
    _number(gate["batch_size"], "gate.batch_size", where, 1, math.inf, integer=True)


# ---- the plan --------------------------------------------------------------------------------------------


def plan(p: Pipeline) -> list[Step]:
    """The phase's steps in order, each with its CLI command and the function that does it."""
    d = p.dir
    train_file, held_file = d / "data" / "train.jsonl", d / "data" / "held_out.jsonl"
    steps = [_generate_step(p, train_file, held_out=False), _generate_step(p, held_file, held_out=True)]
    if p.tokenizer == "build":
        tokenizer = d / "tokenizer"
        steps.append(Step(
            "tokenizer", ["lossmask", "build-tokenizer", str(train_file), "--out", str(tokenizer)], [train_file],
            [tokenizer], lambda redo, resume: build_tokenizer([train_file], tokenizer),
            lambda: (tokenizer / "tokenizer.json").is_file(),
        ))
    elif p.tokenizer == "previous":
        tokenizer = checkpoint(p.previous)
    else:
        tokenizer = Path(p.tokenizer)
    data = train_file
    inputs = mix_inputs(p, train_file)
    if len(inputs) > 1:
        data = d / "data" / "mix.jsonl"
        steps.append(_mix_step(p, inputs, data))
    steps.append(_prepare_step(p, data, tokenizer, d / "dataset"))
    steps.append(_train_step(p, d / "dataset", d / "model"))
    steps.append(_gate_step(p, checkpoint(d), held_file, d / "gate.json"))
    return steps


def checkpoint(phase_directory: Path) -> Path:
    """The final checkpoint of a phase directory's training run."""
    return Path(phase_directory) / "model" / "final"


def mix_inputs(p: Pipeline, train_file: Path) -> list:
    """This phase's data plus its replay sources with their weights (``mix.replay_schedule``)."""
    from lossmask.mix import replay_schedule

    earlier = [str(Path(d) / "data" / "train.jsonl") for d in p.replay["phases"]]
    pretrain = p.replay["pretrain"] if p.replay["pretrain_share"] > 0 else None
    if not earlier and pretrain is None:
        return [str(train_file)]
    return replay_schedule(str(train_file), earlier, pretrain, earlier_share=p.replay["share"],
                           pretrain_share=p.replay["pretrain_share"])


def _generate_step(p: Pipeline, out: Path, held_out: bool) -> Step:
    n = p.data["held_out"] if held_out else p.data["n"]
    command = ["lossmask", "generate-data", p.phase, "--n", str(n), "--seed", str(p.data["seed"]),
               "--languages", *p.data["languages"]]
    if held_out:
        command.append("--held-out")
    for key, value in p.data["options"].items():
        command += ["--option", f"{key}={_cli_value(value)}"]
    command += ["--out", str(out)]

    def action(redo: bool, resume: bool) -> int:
        from lossmask.generate import generate_phase
        from lossmask.generate.format_lock import write_jsonl

        records = generate_phase(p.phase, n, p.data["seed"], p.data["languages"], held_out, **p.data["options"])
        return write_jsonl(records, out)

    return Step("generate-held-out" if held_out else "generate", command, [], [out], action, out.is_file)


def mix_total(inputs: list, n: int) -> int:
    """The mix size at which the phase's own data (``inputs[0]``) gets exactly its ``n`` lines: every
    generated episode once (``mix.plan_counts`` rounds the shares by largest remainder)."""
    from lossmask.mix import plan_counts

    weights = [Fraction(repr(float(i.weight))) for i in inputs]
    guess = math.ceil(n * sum(weights) / weights[0])
    plenty = [10**15] * len(inputs)  # repeats are allowed: only the rounding matters here
    for total in (guess, guess - 1, guess + 1):
        if plan_counts(inputs, weights, plenty, total, True)[0] == n:
            return total
    return guess


def _mix_step(p: Pipeline, inputs: list, out: Path) -> Step:
    total = mix_total(inputs, p.data["n"])
    command = ["lossmask", "mix", "--inputs", *map(str, inputs), "--output", str(out), "--total", str(total),
               "--allow-repeat", "--shuffle", "--seed", str(p.data["seed"])]

    def action(redo: bool, resume: bool):
        from lossmask.mix import print_mix_report

        report = _mix(inputs, out, total, p.data["seed"])
        print_mix_report(report)
        return report

    return Step("mix", command, [Path(i.path) for i in inputs], [out], action, out.is_file)


def _mix(inputs: list, output: Path, total: int, seed: int):
    """The one call into ``lossmask.mix``: the sources blended at their weights, shuffled."""
    from lossmask.mix import mix

    return mix(inputs, output, total=total, shuffle=True, seed=seed, allow_repeat=True)


def _prepare_step(p: Pipeline, data: Path, tokenizer: Path, out: Path) -> Step:
    o = p.prepare
    command = ["lossmask", "prepare", str(data), "--tokenizer", str(tokenizer), "--out", str(out),
               "--format", o["format"]]
    if o["weighted_mask"]:
        command.append("--weighted-mask")
    command += ["--val-split", _cli_value(o["val_split"]), "--seed", str(p.data["seed"])]
    for key in ("pack", "pack_by_field", "max_length"):
        if o[key] is not None:
            command += [f"--{key.replace('_', '-')}", str(o[key])]
    if o["workers"] != 1:
        command += ["--workers", str(o["workers"])]

    def action(redo: bool, resume: bool):
        from lossmask.mask import MaskOptions
        from lossmask.prepare import PrepareOptions, prepare
        from lossmask.render import RenderOptions
        from lossmask.report import print_prepare_summary

        summary = prepare(PrepareOptions(
            inputs=[str(data)], tokenizer=str(tokenizer), out=str(out),
            render=RenderOptions(format=o["format"], weighted_mask=o["weighted_mask"]),
            mask=MaskOptions(max_length=o["max_length"]), val_split=o["val_split"], seed=p.data["seed"],
            workers=o["workers"], pack=o["pack"], pack_by_field=o["pack_by_field"], force=redo,
        ), progress=False)
        print_prepare_summary(summary)
        return summary

    inputs = [data, tokenizer] if p.tokenizer in ("build", "previous") else [data]  # else maybe a hub id
    return Step("prepare", command, inputs, [out], action, lambda: (out / "dataset_metadata.json").is_file())


def _train_step(p: Pipeline, dataset: Path, out: Path) -> Step:
    init = checkpoint(p.previous) if p.previous is not None else None
    command = ["lossmask", "train", "--data", str(dataset), "--model", p.model, "--out", str(out)]
    if init is not None:
        command += ["--init-from", str(init)]
    for key, value in p.train.items():
        command += ["--set", f"{key}={_cli_value(value)}"]

    def action(redo: bool, resume: bool):
        from lossmask.train import TrainArgs, config_from_dict, run_training

        config = config_from_dict(p.train, f"{p.source}: train")
        return run_training(TrainArgs(
            model=p.model, data=str(dataset), out=str(out), config=config, init_from=init, resume=resume,
            overwrite=redo,
        ))

    inputs = [dataset] + ([init] if init is not None else [])
    return Step("train", command, inputs, [out], action, (out / "final").is_dir, resumable=True)


def _gate_step(p: Pipeline, model: Path, prompts: Path, report_file: Path) -> Step:
    g = p.gate
    command = ["lossmask", "gate", p.phase, "--model", str(model), "--prompts", str(prompts)]
    if g["regression"]:
        command.append("--regression")
        if g["n"] is not None:
            command += ["--n", str(g["n"])]
    if g["batch_size"] != 32:
        command += ["--batch-size", str(g["batch_size"])]
    if not g["ood"]:
        command.append("--no-ood")
    command += ["--report", str(report_file)]

    def action(redo: bool, resume: bool):
        from lossmask.gate import gate_checkpoint

        return gate_checkpoint(p.phase, model, prompts, regression=g["regression"], report=report_file, n=g["n"],
                               ood=g["ood"], batch_size=g["batch_size"])

    return Step("gate", command, [model, prompts], [report_file], action, report_file.is_file)


def _cli_value(value: Any) -> str:
    """A config value as ``--set``/``--option`` writes it (parsed back as YAML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def build_tokenizer(inputs: list[Path], out: Path, vocab_size: int = 2048):
    """``lossmask build-tokenizer``: the demo's byte-level BPE with the myPT tokens, trained on JSONL records."""
    from lossmask.tiny_tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer((text for path in inputs for text in record_texts(path)), out, vocab_size)


def record_texts(path: Path):
    """Every text of a JSONL file's records a tokenizer should learn: system, messages (content, context,
    think, cite, tool-call arguments) and replay text."""
    from lossmask.mix import json_object, open_lines

    for line, raw in open_lines(str(path)):
        if raw.isspace():
            continue
        record = json_object(raw, str(path), line)
        for key in ("system", "text"):
            if isinstance(record.get(key), str):
                yield record[key]
        for message in record.get("messages") or []:
            for key in ("content", "context", "think", "cite"):
                if isinstance(message.get(key), str):
                    yield message[key]
            if message.get("arguments") is not None:
                yield json.dumps({"name": message.get("name"), "arguments": message["arguments"]}, ensure_ascii=False)


# ---- running -----------------------------------------------------------------------------------------------


def dry_run_lines(p: Pipeline) -> list[str]:
    """Every step's command, shell-quoted, one per line: what ``--dry-run`` prints."""
    return [step.shell for step in plan(p)]


def run(p: Pipeline, dry_run: bool = False, force: bool = False, console=None, stdout=None) -> PipelineResult:
    """Run (or with ``dry_run`` print) the phase's steps; skip the complete ones (module docstring)."""
    if dry_run:
        for line in dry_run_lines(p):
            print(line, file=stdout or sys.stdout)
        return PipelineResult()
    from rich.console import Console
    from rich.markup import escape

    console = console or Console()
    if p.previous is not None and _gate_passed(p.previous / "gate.json") is False:
        console.print(f"[yellow]warning:[/] the previous phase's gate failed ({escape(str(p.previous / 'gate.json'))}); "
                      "this phase starts from its checkpoint anyway")
    steps = plan(p)
    state_file = p.dir / STATE_FILE
    state = _read_state(state_file)
    result = PipelineResult()
    upstream_ran = False
    for step in steps:
        recorded = state.get(step.name) or {}
        same = recorded.get("command") == step.command
        complete = step.complete()
        if complete and same and recorded.get("done") and not force and not upstream_ran:
            console.print(f"[dim]skip {step.name}: done ({escape(step.shell)})[/]")
            result.skipped.append(step.name)
            if step.name == "gate":
                result.passed = _gate_passed(step.outputs[0])
            continue
        existing = any(path.exists() or path.is_symlink() for path in step.outputs)
        if existing and not same and not force:
            raise LossmaskError(
                f"{step.name}: {', '.join(map(str, step.outputs))} already exists but was not made by this "
                f"command:\n  {step.shell}\n(see {state_file}); pass --force to redo it, or choose another out"
            )
        resume = step.resumable and same and not complete and not force and not upstream_ran and _started(step)
        _check_inputs(step)
        console.rule(f"[bold]{escape(p.name)}: {step.name}")
        console.print(escape(step.shell), soft_wrap=True, highlight=False)
        state[step.name] = {"command": step.command, "done": False}
        _write_state(state_file, state)
        started = time.perf_counter()
        value = step.action(existing and not resume, resume)
        state[step.name] = {"command": step.command, "done": True}
        _write_state(state_file, state)
        console.print(f"[dim]{step.name} done in {time.perf_counter() - started:.1f} s[/]")
        if step.name == "gate":
            result.gate_reports = value
            result.passed = all(r.passed for r in value)
        result.ran.append(step.name)
        upstream_ran = True
    return result


def _gate_passed(report_file: Path) -> bool | None:
    try:
        return json.loads(report_file.read_text(encoding="utf-8")).get("passed")
    except (OSError, ValueError, AttributeError):
        return None


def _started(step: Step) -> bool:
    """Whether a training step left a run behind (checkpoints) that it can resume."""
    from lossmask.train.checkpoint import checkpoint_dirs

    return step.outputs[0].is_dir() and bool(checkpoint_dirs(step.outputs[0]))


def _check_inputs(step: Step) -> None:
    missing = [path for path in step.inputs if not path.exists()]
    if missing:
        hint = ""
        if any(path.name == "final" for path in missing):
            hint = "; run the previous phase's pipeline first"
        elif any(path.name == "train.jsonl" for path in missing):
            hint = "; run the earlier phases' pipelines first (replay.phases)"
        else:
            hint = "; build a pre-training replay file with `lossmask replay`, or set replay.pretrain: null"
        raise LossmaskError(f"{step.name}: input {missing[0]} does not exist{hint}")


def _read_state(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LossmaskError(f"{path} is not a readable pipeline state ({exc}); delete it and pass --force") from exc
    return state if isinstance(state, dict) else {}


def _write_state(path: Path, state: dict) -> None:
    from lossmask.mix import atomic_file

    with atomic_file(path) as f:
        f.write((json.dumps(state, indent=2) + "\n").encode("utf-8"))
