"""Phase pipelines: config validation, the dry-run commands, and phases 1-2 end to end on the tiny preset."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from rich.console import Console

from lossmask.errors import LossmaskError
from lossmask.pipeline import load_pipeline, mix_inputs, plan, run

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "pipelines"
PHASES = ("1", "2", "3", "4", "1b", "5", "6")


def test_dry_run_prints_every_step_of_phase_2_as_a_cli_command(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pipeline = load_pipeline(CONFIGS / "phase2.yaml", {"out": "runs/c", "replay.pretrain": "pre training.jsonl"})
    result = run(pipeline, dry_run=True)
    assert capsys.readouterr().out.splitlines() == [
        "lossmask generate-data 2 --n 30000 --seed 2 --languages en de --out runs/c/phase2/data/train.jsonl",
        ("lossmask generate-data 2 --n 200 --seed 2 --languages en de --held-out "
         "--out runs/c/phase2/data/held_out.jsonl"),
        ("lossmask mix --inputs runs/c/phase2/data/train.jsonl:0.92 runs/c/phase1/data/train.jsonl:0.03 "
         "'pre training.jsonl:0.05' --output runs/c/phase2/data/mix.jsonl --total 32609 --allow-repeat --shuffle "
         "--seed 2"),
        ("lossmask prepare runs/c/phase2/data/mix.jsonl --tokenizer runs/c/phase1/model/final "
         "--out runs/c/phase2/dataset --format mypt --weighted-mask --val-split 0.05 --seed 2 --pack 1024"),
        ("lossmask train --data runs/c/phase2/dataset --model models/mypt-750m-base --out runs/c/phase2/model "
         "--init-from runs/c/phase1/model/final --set lr=5.5e-05 --set min_lr=5.5e-06 --set warmup_iters=100 "
         "--set decay=cosine --set epochs=2 --set batch_size=16 --set grad_accum=4 --set block_size=1024 "
         "--set neftune_alpha=5.0 --set weight_decay=0.1 --set grad_clip=1.0 --set eval_interval=200 "
         "--set eval_iters=20 --set save_interval=500 --set keep_checkpoints=2"),
        ("lossmask gate 2 --model runs/c/phase2/model/final --prompts runs/c/phase2/data/held_out.jsonl --regression "
         "--report runs/c/phase2/gate.json"),
    ]
    assert result.ran == [] and list(tmp_path.iterdir()) == []  # a dry run writes nothing


def test_tiny_preset_builds_its_tokenizer_and_shrinks_the_run():
    lines = [s.shell for s in plan(load_pipeline(CONFIGS / "phase1.yaml", {"out": "r"}, preset="tiny"))]
    assert lines[2] == "lossmask build-tokenizer r/phase1/data/train.jsonl --out r/phase1/tokenizer"
    assert lines[3].startswith("lossmask prepare r/phase1/data/train.jsonl --tokenizer r/phase1/tokenizer ")  # no mix
    assert "--model tiny" in lines[4] and "--set max_iters=40" in lines[4] and "epochs" not in lines[4]
    assert [s.name for s in plan(load_pipeline(CONFIGS / "phase1.yaml"))] == [
        "generate", "generate-held-out", "mix", "prepare", "train", "gate"]


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("preset", [None, "tiny"])
def test_every_shipped_config_loads_and_replays_every_earlier_phase(phase, preset):
    pipeline = load_pipeline(CONFIGS / f"phase{phase}.yaml", preset=preset)
    assert pipeline.phase == phase and pipeline.prepare["format"] == "mypt"
    order = list(PHASES)
    earlier = order[: order.index(phase)]
    assert [Path(p).name for p in pipeline.replay["phases"]] == [f"phase{k}" for k in earlier]
    assert (pipeline.previous is None) == (phase == "1")
    if pipeline.previous is not None:
        assert pipeline.previous.name == f"phase{earlier[-1]}"
    inputs = mix_inputs(pipeline, pipeline.dir / "data" / "train.jsonl")
    if len(inputs) > 1:
        assert abs(sum(i.weight for i in inputs) - 1) < 1e-9
        assert all(0.01 <= i.weight <= 0.05 for i in inputs[1:])
    if preset is None:
        assert 1.5e-5 <= pipeline.train["lr"] <= 7e-5 and 5 <= pipeline.train["neftune_alpha"] <= 10


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


BASE = "phase: 2\nmodel: tiny\ntokenizer: tok\ndata: {n: 10}\n"


@pytest.mark.parametrize(
    "text, message",
    [
        (BASE + "trian: {}\n", r"unknown key 'trian'; did you mean 'train'\?"),
        (BASE + "train: {lrr: 1}\n", r"train: unknown config key 'lrr'; did you mean 'lr'\?"),
        (BASE + "replay: {share: 0.03, phase: []}\n", r"replay: unknown key 'phase'; did you mean 'phases'\?"),
        (BASE.replace("data: {n: 10}", "data: {held_out: 3}"), r"missing required key 'data.n'"),
        (BASE.replace("model: tiny\n", ""), r"missing required key 'model'"),
        (BASE + "phase: 7\n", r"unknown phase 7"),
        (BASE + "previous: '1'\ntrain: {hidden_size: 64}\n", r"train.hidden_size only applies to a preset"),
        (BASE.replace("tokenizer: tok", "tokenizer: previous"), r"tokenizer: previous needs a previous phase"),
        (BASE + "prepare: {format: chat-template}\n", r"prepare.format must be mypt"),
        (BASE + "replay: {share: 0.9}\n", r"replay.share must be a number from 0.001 to 0.5"),
        (BASE + "train: {epochs: 2, max_iters: 5}\n", r"sets both max_iters and epochs"),
        ("- a list\n", r"must be a mapping"),
    ],
)
def test_config_errors_name_the_key(tmp_path, text, message):
    with pytest.raises(LossmaskError, match=message):
        load_pipeline(write(tmp_path, text))


def test_presets_and_overrides_merge_over_the_config(tmp_path):
    presets = "presets:\n  small: {data: {n: 3}, train: {epochs: null, max_iters: 5}}\n"
    path = write(tmp_path, BASE + "train: {lr: 1.0e-4, epochs: 2}\n" + presets)
    small = load_pipeline(path, {"train.lr": 0.5, "out": "elsewhere"}, preset="small")
    assert small.data["n"] == 3 and small.train == {"lr": 0.5, "max_iters": 5} and small.out == Path("elsewhere")
    with pytest.raises(LossmaskError, match="no preset 'huge'.*presets: small"):
        load_pipeline(path, preset="huge")
    with pytest.raises(LossmaskError, match="unknown key 'dta'"):
        load_pipeline(path, {"dta.n": 3})


SMALL = {  # the tiny preset, smaller still, so both phases run in seconds
    "data.n": 120, "data.held_out": 8, "gate.n": 8, "train.max_iters": 4, "train.block_size": 128,
    "prepare.pack": 128, "train.eval_iters": 1, "train.eval_interval": 0,
}


def test_phases_1_and_2_run_end_to_end_on_the_tiny_preset_and_resume(tmp_path):
    out = tmp_path / "runs"
    phase1 = load_pipeline(CONFIGS / "phase1.yaml", {**SMALL, "out": str(out), "train.hidden_size": 32,
                                                     "train.num_layers": 1, "train.num_heads": 2,
                                                     "train.intermediate_size": 64}, preset="tiny")
    first = run(phase1)
    assert first.ran == ["generate", "generate-held-out", "tokenizer", "prepare", "train", "gate"]
    assert [r.phase for r in first.gate_reports] == ["1"] and first.gate_reports[0].ood is not None
    phase2 = load_pipeline(CONFIGS / "phase2.yaml", {**SMALL, "out": str(out)}, preset="tiny")
    console = Console(record=True, width=200)
    second = run(phase2, console=console)
    assert second.ran == ["generate", "generate-held-out", "mix", "prepare", "train", "gate"]
    assert ("the previous phase's gate failed" in console.export_text()) == (first.passed is False)
    assert [r.phase for r in second.gate_reports] == ["1", "2"] and second.passed is not None

    d = out / "phase2"
    own = (d / "data" / "train.jsonl").read_text().splitlines()
    mixed = (d / "data" / "mix.jsonl").read_text().splitlines()
    replayed = [line for line in mixed if json.loads(line)["_meta"]["generator"] == "format_lock"]
    assert len(own) == 120 and Counter(mixed) - Counter(replayed) == Counter(own)  # every episode, once
    assert round(len(replayed) / len(mixed), 2) == 0.03 and set(replayed) <= set(
        (out / "phase1" / "data" / "train.jsonl").read_text().splitlines())
    metadata = json.loads((d / "dataset" / "dataset_metadata.json").read_text())
    assert metadata["render"]["format"] == "mypt" and metadata["render"]["weighted_mask"] is True
    run_info = json.loads((d / "model" / "final" / "lossmask_train.json").read_text())
    assert run_info["init_from"] == str(out / "phase1" / "model" / "final")
    gate = json.loads((d / "gate.json").read_text())
    assert [r["phase"] for r in gate["reports"]] == ["1", "2"] and gate["passed"] == second.passed
    state = json.loads((d / "pipeline_state.json").read_text())
    assert all(state[s.name] == {"command": s.command, "done": True} for s in plan(phase2))

    again = run(phase2)
    assert again.ran == [] and len(again.skipped) == 6 and again.gate_reports is None
    assert again.passed == second.passed  # read back from gate.json

    (d / "model" / "final").unlink()  # an interrupted run: checkpoints, no final
    resumed = run(phase2)
    assert resumed.ran == ["train", "gate"] and (d / "model" / "final").is_dir()

    changed = load_pipeline(CONFIGS / "phase2.yaml", {**SMALL, "out": str(out), "data.n": 100}, preset="tiny")
    with pytest.raises(LossmaskError, match="train.jsonl already exists but was not made by this command"):
        run(changed)
    forced = run(changed, force=True)
    assert forced.ran == [s.name for s in plan(changed)]
    assert len((d / "data" / "train.jsonl").read_text().splitlines()) == 100


def test_missing_inputs_say_which_phase_to_run_first(tmp_path):
    phase2 = load_pipeline(CONFIGS / "phase2.yaml", {**SMALL, "out": str(tmp_path)}, preset="tiny")
    with pytest.raises(LossmaskError, match=r"mix: input .*phase1/data/train.jsonl does not exist; run the earlier"):
        run(phase2)
