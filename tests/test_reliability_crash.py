"""Crash safety: SIGKILL prepare, mix, pack and train at random points; a full disk, a read-only output, two writers.

Every command runs in a forked child of a fork server (tests/reliability/zygote.py) that is killed with its whole
process group. After each kill: the final path holds nothing, the old output untouched, or the complete new
output byte for byte; a re-run succeeds and gives the reference bytes; ``train --resume`` continues from the
last complete checkpoint and ends with exactly the weights of an uninterrupted run. Kill times are stratified
over the command's measured duration (``LOSSMASK_CRASH_KILLS`` per command, seeded by ``LOSSMASK_CRASH_SEED``),
plus kills aimed at the moment a temporary output appears (mid-write).
"""
from __future__ import annotations

import glob
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lossmask.store import exclusive_lock, open_dataset
from lossmask.train.checkpoint import STATE_DIR, checkpoint_dirs, load_trainer_state
from lossmask.validate import validate_dataset
from tests.reliability.common import CRASH_KILLS, CRASH_SEED, Tally, build_tokenizer, tree_bytes, write_jsonl
from tests.reliability.zygote import TRACEBACK, Zygote

TRAIN_CONFIG = """hidden_size: 32
num_layers: 2
num_heads: 4
intermediate_size: 64
block_size: 96
batch_size: 4
lr: 1.0e-3
max_iters: 8
save_interval: 2
keep_checkpoints: 2
eval_interval: 0
log_interval: 1
"""


def episode(i: int) -> dict:
    return {
        "system": "Be terse.",
        "messages": [
            {"role": "user", "content": f"Question {i}? " * (1 + i % 4)},
            {"role": "assistant", "content": f"Answer {i}. " * (1 + i % 7)},
        ],
    }


@pytest.fixture(scope="module")
def zygote():
    server = Zygote(train=True)
    yield server
    server.close()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("crash")
    build_tokenizer(root / "tok")
    write_jsonl(root / "in.jsonl", [episode(i) for i in range(1200)])
    write_jsonl(root / "small.jsonl", [episode(i) for i in range(300)])
    (root / "train.yaml").write_text(TRAIN_CONFIG)
    return root


def prepare_argv(work: Path, out: Path, *extra) -> list:
    return ["prepare", work / "in.jsonl", "--tokenizer", work / "tok", "--format", "mypt", "--quiet", "--out", out,
            *extra]


def kill_plan(duration: float, targets: list[str], key: str) -> list[dict]:
    """CRASH_KILLS kill times stratified over ``duration`` (one uniform draw per slice), then one kill per target."""
    rng = random.Random(f"{CRASH_SEED}:{key}")
    times = [{"kill_after": duration * (i + rng.random()) / CRASH_KILLS} for i in range(CRASH_KILLS)]
    return times + [{"kill_on": t} for t in targets]


def slot(path: Path, allowed: dict[str, object]) -> str:
    """What a killed command left at its final path: the name of the allowed content it equals, or 'absent'."""
    if not (path.exists() or path.is_symlink()):
        return "absent"
    content = tree_bytes(path) if path.is_dir() else path.read_bytes()
    for name, expected in allowed.items():
        if content == expected:
            return name
    if path.is_dir() and allowed:
        expected = next(iter(allowed.values()))
        differ = sorted(set(content) ^ set(expected) | {k for k in content if k in expected and content[k] != expected[k]})
        raise AssertionError(f"{path} is neither absent nor a complete allowed output; differing files: {differ}")
    raise AssertionError(f"{path} is neither absent nor a complete allowed output ({len(content)} bytes)")


def hidden(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def kill_and_check(zygote, tally: Tally, log: Path, argv_for, kills: list[dict], allowed_for, rerun_for, expected):
    """Run each kill, check what is left at the final path, then that a re-run gives ``expected``."""
    for i, kill in enumerate(kills):
        out, argv = argv_for(i)
        if "kill_on" in kill:
            kill = {"kill_on": kill["kill_on"].format(parent=out.parent, name=out.name)}
        result = zygote.run(argv, log, **kill)
        assert result["rc"] in (0, -9), result["output"]
        tally("killed" if result["killed"] else "finished before the kill")
        tally(f"left at the final path: {slot(out, allowed_for(i))}")
        tally("hidden temporaries left by the kill", len(hidden(out.parent, out.name)))
        again = zygote.run(rerun_for(i), log)
        assert again["rc"] == 0, again["output"]
        content = tree_bytes(out) if out.is_dir() else out.read_bytes()
        assert content == expected, f"re-run after kill {i} does not reproduce the reference output"
        left = hidden(out.parent, out.name)
        if out.is_dir():
            assert left == [], f"the re-run left temporaries of the killed run: {left}"
        tally("hidden temporaries still there after the re-run", len(hidden(out.parent, out.name)))
        tally("re-run reproduced the reference")


def test_prepare_killed_anywhere_leaves_nothing_or_a_complete_dataset(zygote, work, tmp_path):
    tally = Tally("crash safety", "prepare (SIGKILL)")
    ref = zygote.run(prepare_argv(work, tmp_path / "ref"), tmp_path / "log")
    old = zygote.run(prepare_argv(work, tmp_path / "old", "--seed", "1"), tmp_path / "log")
    assert ref["rc"] == 0 and old["rc"] == 0, ref["output"] + old["output"]
    reference, previous = tree_bytes(tmp_path / "ref"), tree_bytes(tmp_path / "old")
    assert reference != previous
    targets = ["{parent}/.{name}.tmp-*/train/tokens.bin", "{parent}/.{name}.tmp-*/dataset_metadata.json"]
    kills = kill_plan(ref["seconds"], targets, "prepare")

    def argv_for(i):  # odd kills replace an existing dataset (--force): the old one must survive intact
        out = tmp_path / f"k{i}"
        if i % 2:
            shutil.copytree(tmp_path / "old", out)
        return out, prepare_argv(work, out, *(["--force"] if i % 2 else []))

    def allowed_for(i):
        return {"new dataset": reference, "old dataset intact": previous} if i % 2 else {"new dataset": reference}

    kill_and_check(zygote, tally, tmp_path / "log", argv_for, kills, allowed_for,
                   lambda i: prepare_argv(work, tmp_path / f"k{i}", "--force"), reference)
    assert validate_dataset(tmp_path / "k0").ok
    tally.write(kills=len(kills))


def test_pack_killed_anywhere_leaves_nothing_or_a_complete_dataset(zygote, work, tmp_path):
    tally = Tally("crash safety", "pack (SIGKILL)")
    assert zygote.run(prepare_argv(work, tmp_path / "src"), tmp_path / "log")["rc"] == 0
    pack = ["pack", tmp_path / "src", "--out"]
    ref = zygote.run(pack + [tmp_path / "ref", "--block", "256"], tmp_path / "log")
    old = zygote.run(pack + [tmp_path / "old", "--block", "128"], tmp_path / "log")
    assert ref["rc"] == 0 and old["rc"] == 0, ref["output"] + old["output"]
    reference, previous = tree_bytes(tmp_path / "ref"), tree_bytes(tmp_path / "old")
    kills = kill_plan(ref["seconds"], ["{parent}/.{name}.tmp-*/train/blocks.idx"], "pack")

    def argv_for(i):
        out = tmp_path / f"k{i}"
        if i % 2:
            shutil.copytree(tmp_path / "old", out)
        return out, pack + [out, "--block", "256"] + (["--force"] if i % 2 else [])

    def allowed_for(i):
        return {"new dataset": reference, "old dataset intact": previous} if i % 2 else {"new dataset": reference}

    kill_and_check(zygote, tally, tmp_path / "log", argv_for, kills, allowed_for,
                   lambda i: pack + [tmp_path / f"k{i}", "--block", "256", "--force"], reference)
    tally.write(kills=len(kills))


def test_prepare_pack_killed_anywhere_leaves_nothing_or_a_complete_dataset(zygote, work, tmp_path):
    tally = Tally("crash safety", "prepare --pack (SIGKILL)")
    ref = zygote.run(prepare_argv(work, tmp_path / "ref", "--pack", "256"), tmp_path / "log")
    assert ref["rc"] == 0, ref["output"]
    reference = tree_bytes(tmp_path / "ref")
    targets = ["{parent}/.{name}.unpacked/dataset_metadata.json", "{parent}/.{name}.tmp-*/train/blocks.idx"]
    kills = kill_plan(ref["seconds"], targets, "prepare-pack")
    kill_and_check(
        zygote, tally, tmp_path / "log",
        lambda i: (tmp_path / f"k{i}", prepare_argv(work, tmp_path / f"k{i}", "--pack", "256")),
        kills, lambda i: {"new dataset": reference},
        lambda i: prepare_argv(work, tmp_path / f"k{i}", "--pack", "256", "--force"), reference,
    )
    tally.write(kills=len(kills))


def test_rerun_removes_the_staging_of_a_killed_prepare_pack(zygote, work, tmp_path):
    out = tmp_path / "ds"
    killed = zygote.run(prepare_argv(work, out, "--pack", "256"), tmp_path / "log",
                        kill_on=f"{tmp_path}/.ds.unpacked/dataset_metadata.json")
    assert killed["killed"] and (tmp_path / ".ds.unpacked").is_dir()
    assert zygote.run(prepare_argv(work, out, "--pack", "256", "--force"), tmp_path / "log")["rc"] == 0
    assert hidden(tmp_path, "ds") == []


def test_prepare_pack_replaces_a_half_removed_staging(zygote, work, tmp_path):
    """A kill while the staging was being removed leaves part of it, without its metadata: the next run clears it."""
    (tmp_path / ".ds.unpacked" / "val").mkdir(parents=True)
    (tmp_path / ".ds.unpacked" / "val" / "tokens.bin").write_bytes(b"\0" * 64)
    result = zygote.run(prepare_argv(work, tmp_path / "ds", "--pack", "256"), tmp_path / "log")
    assert result["rc"] == 0, result["output"]
    assert hidden(tmp_path, "ds") == [] and validate_dataset(tmp_path / "ds").ok


def test_a_second_prepare_pack_is_refused_and_leaves_the_first_runs_staging(zygote, work, tmp_path):
    staging = tmp_path / ".ds.unpacked"
    staging.mkdir()
    (staging / "dataset_metadata.json").write_text("{}")  # the running first run's staging
    with exclusive_lock(tmp_path / ".ds.pack.lock", tmp_path / "ds"):  # held by the first run
        result = zygote.run(prepare_argv(work, tmp_path / "ds", "--pack", "256"), tmp_path / "log")
    assert result["rc"] == 1 and "another process is writing" in result["output"], result["output"]
    assert (staging / "dataset_metadata.json").read_text() == "{}" and not (tmp_path / "ds").exists()


def test_mix_killed_anywhere_leaves_no_partial_output(zygote, work, tmp_path):
    tally = Tally("crash safety", "mix (SIGKILL)")
    inputs = ["--inputs", f"{work}/in.jsonl:0.8", f"{work}/small.jsonl:0.2", "--shuffle", "--shuffle-memory", "65536"]
    ref = zygote.run(["mix", *inputs, "--output", tmp_path / "ref.jsonl"], tmp_path / "log")
    old = zygote.run(["mix", *inputs, "--seed", "1", "--output", tmp_path / "old.jsonl"], tmp_path / "log")
    assert ref["rc"] == 0 and old["rc"] == 0, ref["output"] + old["output"]
    reference, previous = (tmp_path / "ref.jsonl").read_bytes(), (tmp_path / "old.jsonl").read_bytes()
    kills = kill_plan(ref["seconds"], ["{parent}/.{name}.*.tmp", "{parent}/.{name}.*/selected*"], "mix")

    def argv_for(i):
        out = tmp_path / f"k{i}.jsonl"
        if i % 2:
            shutil.copyfile(tmp_path / "old.jsonl", out)
        return out, ["mix", *inputs, "--output", out]

    def allowed_for(i):
        return {"new output": reference, "old output intact": previous} if i % 2 else {"new output": reference}

    kill_and_check(zygote, tally, tmp_path / "log", argv_for, kills, allowed_for,
                   lambda i: ["mix", *inputs, "--output", tmp_path / f"k{i}.jsonl"], reference)
    tally.write(kills=len(kills))


def check_checkpoints(run: Path) -> int | None:
    """Every checkpoint that looks complete is complete and loadable; returns the newest iteration."""
    for iteration, path in checkpoint_dirs(run):
        assert (path / "config.json").is_file() and (path / STATE_DIR / "optimizer.pt").is_file()
        assert load_file(str(path / "model.safetensors"))
        state, _, _ = load_trainer_state(path, 0)
        assert state["iteration"] == iteration
    named = {p.name for p in (run / "checkpoints").glob("iter_*")} if (run / "checkpoints").is_dir() else set()
    assert named == {p.name for _, p in checkpoint_dirs(run)}, "a checkpoint directory without its trainer state"
    found = checkpoint_dirs(run)
    return found[-1][0] if found else None


def test_train_killed_anywhere_resumes_to_the_same_weights(zygote, work, tmp_path):
    tally = Tally("crash safety", "train --resume (SIGKILL)")
    data = tmp_path / "ds"
    made = zygote.run(["prepare", work / "small.jsonl", "--tokenizer", work / "tok", "--format", "mypt", "--quiet",
                       "--val-split", "0", "--out", data], tmp_path / "log")
    assert made["rc"] == 0, made["output"]

    def train(out: Path, *extra) -> list:
        return ["train", "--data", data, "--model", "tiny", "--config", work / "train.yaml", "--out", out, "--quiet",
                *extra]

    ref = zygote.run(train(tmp_path / "ref"), tmp_path / "log")
    assert ref["rc"] == 0, ref["output"]
    reference = load_file(str(tmp_path / "ref" / "final" / "model.safetensors"))
    assert not list((tmp_path / "ref" / "final").glob("*.bin"))  # weights are safetensors, never a pickle
    warm = zygote.run(train(tmp_path / "warm"), tmp_path / "log")  # the first run in a server pays one-off costs
    assert warm["rc"] == 0, warm["output"]
    kills = kill_plan(warm["seconds"], [f"{tmp_path}/k{{i}}/checkpoints/.tmp-iter_0000004/*"], "train")
    for i, kill in enumerate(kills):
        out = tmp_path / f"k{i}"
        if "kill_on" in kill:
            kill = {"kill_on": kill["kill_on"].replace("{i}", str(i))}
        result = zygote.run(train(out), tmp_path / "log", **kill)
        assert result["rc"] in (0, -9), result["output"]
        tally("killed" if result["killed"] else "finished before the kill")
        newest = check_checkpoints(out)
        half = glob.glob(f"{out}/checkpoints/.tmp-iter_*")
        tally("half-written checkpoint left (never picked up)", len(half))
        if result["rc"] == 0:
            continue
        resumed = zygote.run(train(out, "--resume"), tmp_path / "log")
        if newest is None:
            assert resumed["rc"] == 1 and "nothing to resume" in resumed["output"], resumed["output"]
            resumed = zygote.run(train(out, "--overwrite"), tmp_path / "log")
            tally("no checkpoint yet: resume refused, fresh run")
        else:
            tally(f"resumed from iteration {newest}")
            metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            assert [m["iter"] for m in metrics if "loss" in m] == list(range(1, 9)), "a window logged twice or lost"
        assert resumed["rc"] == 0, resumed["output"]
        final = load_file(str(out / "final" / "model.safetensors"))
        assert final.keys() == reference.keys()
        assert all(torch.equal(final[k], reference[k]) for k in reference), "resumed run ended with other weights"
        tally("same final weights as the uninterrupted run")
    tally.write(kills=len(kills))


# -- two writers ---------------------------------------------------------------------------------------------------
def test_two_prepares_into_one_output_are_refused_not_interleaved(zygote, work, tmp_path):
    tally = Tally("concurrency", "prepare ×2 into one output")
    big = write_jsonl(tmp_path / "big.jsonl", [episode(i) for i in range(12000)])
    out = tmp_path / "ds"
    argv = ["prepare", big, "--tokenizer", work / "tok", "--format", "mypt", "--quiet", "--out", out]
    first = subprocess.Popen([sys.executable, "-m", "lossmask.cli", *map(str, argv)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not glob.glob(f"{tmp_path}/.ds.tmp-*/train/tokens.bin"):
            assert first.poll() is None and time.monotonic() < deadline, "the first prepare never started writing"
            time.sleep(0.01)
        for extra in ([], ["--force"]):
            second = zygote.run(argv + extra, tmp_path / "log")
            assert second["rc"] == 1, second["output"]
            assert "another process is writing" in second["output"] and str(out) in second["output"]
            tally("second writer refused")
        output, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, output
    assert validate_dataset(out).ok and len(open_dataset(out)) > 0
    assert hidden(tmp_path, "ds") == []
    tally("first writer's dataset complete and valid")
    tally.write()


# -- full disk and read-only output ---------------------------------------------------------------------------------
LIMIT = 150_000  # RLIMIT_FSIZE: the tokenizer copy fits, the token files do not


def full_disk_cases(work: Path, tmp: Path) -> dict[str, tuple[list, Path]]:
    small = work / "small.jsonl"
    return {
        "prepare": (prepare_argv(work, tmp / "out"), tmp / "out"),
        "mix": (["mix", "--inputs", f"{work}/in.jsonl:0.8", f"{small}:0.2", "--output", tmp / "out"], tmp / "out"),
        "pack": (["pack", tmp / "src", "--block", "256", "--out", tmp / "out"], tmp / "out"),
    }


@pytest.mark.parametrize("command", ["prepare", "mix", "pack"])
def test_full_disk_leaves_nothing_that_looks_complete(zygote, work, tmp_path, command):
    tally = Tally("full disk (RLIMIT_FSIZE, EFBIG)", command)
    if command == "pack":
        assert zygote.run(prepare_argv(work, tmp_path / "src"), tmp_path / "log")["rc"] == 0
    argv, out = full_disk_cases(work, tmp_path)[command]
    result = zygote.run(argv, tmp_path / "log", fsize=LIMIT)
    assert result["rc"] not in (0, -9), result["output"]
    assert "File too large" in result["output"]
    assert slot(out, {}) == "absent"
    tally("failed, nothing at the final path")
    tally("traceback instead of a lossmask error" if result["rc"] == TRACEBACK else "lossmask error")
    again = zygote.run(argv, tmp_path / "log")
    assert again["rc"] == 0, again["output"]
    if out.is_dir():
        assert validate_dataset(out).ok and hidden(tmp_path, "out") == []
    tally("re-run with room succeeded")
    tally.write()


def test_full_disk_keeps_the_old_dataset_when_replacing_it(zygote, work, tmp_path):
    out = tmp_path / "out"
    assert zygote.run(prepare_argv(work, out, "--seed", "1"), tmp_path / "log")["rc"] == 0
    before = tree_bytes(out)
    result = zygote.run(prepare_argv(work, out, "--force"), tmp_path / "log", fsize=LIMIT)
    assert result["rc"] not in (0, -9) and tree_bytes(out) == before


def test_full_disk_while_checkpointing_keeps_the_last_checkpoint(zygote, work, tmp_path):
    data = tmp_path / "ds"
    assert zygote.run(["prepare", work / "small.jsonl", "--tokenizer", work / "tok", "--format", "mypt", "--quiet",
                       "--val-split", "0", "--out", data], tmp_path / "log")["rc"] == 0
    argv = ["train", "--data", data, "--model", "tiny", "--config", work / "train.yaml", "--out", tmp_path / "run",
            "--quiet"]
    stopped = zygote.run(argv + ["--stop-after", "2"], tmp_path / "log")
    assert stopped["rc"] == 0, stopped["output"]
    size = (tmp_path / "run" / "checkpoints" / "iter_0000002" / "model.safetensors").stat().st_size
    full = zygote.run(argv + ["--resume"], tmp_path / "log", fsize=size - 1)
    assert full["rc"] not in (0, -9), full["output"]
    assert check_checkpoints(tmp_path / "run") == 2
    assert not glob.glob(f"{tmp_path}/run/checkpoints/.tmp-*") and not (tmp_path / "run" / "final").exists()
    assert zygote.run(argv + ["--resume"], tmp_path / "log")["rc"] == 0


def test_full_disk_leaves_no_partial_temporary_directory(zygote, work, tmp_path):
    result = zygote.run(prepare_argv(work, tmp_path / "out"), tmp_path / "log", fsize=LIMIT)
    assert result["rc"] not in (0, -9)
    assert [n for n in hidden(tmp_path, "out") if ".tmp-" in n] == []


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory no one can create entries in: chmod 555, or (as root, whom chmod does not stop) chattr +i."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], check=False).returncode != 0:
        pytest.skip("running as root (chmod does not stop root) and chattr +i is unavailable on this file system")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def read_only_cases(work: Path, tmp: Path, ro: Path) -> dict[str, list]:
    return {
        "prepare": prepare_argv(work, ro / "out"),
        "mix": ["mix", "--inputs", f"{work}/small.jsonl:1", "--output", ro / "out"],
        "pack": ["pack", tmp / "src", "--block", "256", "--out", ro / "out"],
        "train": ["train", "--data", tmp / "src", "--model", "tiny", "--config", work / "train.yaml", "--out",
                  ro / "out", "--quiet"],
    }


@pytest.mark.parametrize("command", ["prepare", "mix", "pack", "train"])
def test_read_only_output_fails_and_writes_nothing(zygote, work, tmp_path, read_only_dir, command):
    tally = Tally("read-only output (chattr +i as root)", command)
    if command in ("pack", "train"):
        assert zygote.run(prepare_argv(work, tmp_path / "src"), tmp_path / "log")["rc"] == 0
    result = zygote.run(read_only_cases(work, tmp_path, read_only_dir)[command], tmp_path / "log")
    assert result["rc"] not in (0, -9), result["output"]
    assert list(read_only_dir.iterdir()) == []
    tally("failed, nothing written")
    tally("traceback instead of a lossmask error" if result["rc"] == TRACEBACK else "lossmask error")
    tally.write()


@pytest.mark.parametrize("fault, command", [
    ("full disk", "prepare"),
    ("full disk", "mix"),
    ("full disk", "pack"),
    ("read-only", "prepare"),
    ("read-only", "mix"),
    ("read-only", "pack"),
    ("read-only", "train"),
])
def test_write_failures_end_in_a_clear_error(zygote, work, tmp_path, request, fault, command):
    if command in ("pack", "train"):
        assert zygote.run(prepare_argv(work, tmp_path / "src"), tmp_path / "log")["rc"] == 0
    if fault == "full disk":
        argv = full_disk_cases(work, tmp_path)[command][0]
        result = zygote.run(argv, tmp_path / "log", fsize=LIMIT)
    else:
        ro = request.getfixturevalue("read_only_dir")
        result = zygote.run(read_only_cases(work, tmp_path, ro)[command], tmp_path / "log")
    assert result["rc"] == 1 and "Traceback" not in result["output"], result["output"]
    assert f"lossmask {command}: error:" in result["output"]
