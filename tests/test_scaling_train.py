"""Training beyond one process on CPU: FSDP through `accelerate launch`, and resuming on another process count.

Both run real `lossmask train` commands in subprocesses (torchrun / accelerate launch, gloo).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lossmask.generate.format_lock import generate_format_lock, write_jsonl
from lossmask.prepare import PrepareOptions, prepare
from lossmask.render import RenderOptions
from lossmask.tiny_tokenizer import build_tiny_tokenizer

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
TINY = ["--quiet", "--set", "max_iters=4", "--set", "hidden_size=32", "--set", "num_layers=1", "--set", "num_heads=2",
        "--set", "intermediate_size=64", "--set", "eval_iters=1", "--set", "block_size=256"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scaling")
    records = generate_format_lock(200, seed=3)
    write_jsonl(records, root / "train.jsonl")
    build_tiny_tokenizer((m["content"] for r in records for m in r["messages"]), root / "tok", vocab_size=512)
    prepare(PrepareOptions([str(root / "train.jsonl")], str(root / "tok"), str(root / "ds"), val_split=0.1,
                           render=RenderOptions(format="mypt"), pack=256), progress=False)
    return root / "ds"


def run(launcher: list[str], dataset: Path, out: Path, *extra: str) -> None:
    cmd = [*launcher, "-m", "lossmask.cli", "train", "--data", str(dataset), "--model", "tiny", "--out", str(out),
           *TINY, *extra]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=1e-4)


def test_fsdp_on_cpu_matches_ddp(dataset, tmp_path):
    run(torchrun(2), dataset, tmp_path / "ddp", "--set", "batch_size=2")
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(REPO / "configs" / "accelerate" / "fsdp_cpu.yaml")]
    run(accelerate, dataset, tmp_path / "fsdp", "--set", "batch_size=2")
    assert sorted(p.name for p in (tmp_path / "fsdp" / "final" / "trainer_state").glob("rng_rank*.pt")) == [
        "rng_rank0.pt", "rng_rank1.pt"]  # really two processes
    ddp = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    fsdp = [json.loads(line) for line in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in ddp if "val_loss" in r] == [r["iter"] for r in fsdp if "val_loss" in r] == [0, 4]
    assert [r["val_loss"] for r in fsdp if "val_loss" in r] == pytest.approx(
        [r["val_loss"] for r in ddp if "val_loss" in r], rel=1e-5)
    assert_same_weights(tmp_path / "ddp", tmp_path / "fsdp")


def test_resume_on_another_process_count(dataset, tmp_path):
    """Two processes stop after 2 windows; one process (same global batch) finishes: same weights."""
    run(torchrun(2), dataset, tmp_path / "whole", "--set", "batch_size=2")
    run(torchrun(2), dataset, tmp_path / "split", "--set", "batch_size=2", "--stop-after", "2")
    assert not (tmp_path / "split" / "final").exists()
    run([sys.executable], dataset, tmp_path / "split", "--set", "batch_size=4", "--resume")
    assert_same_weights(tmp_path / "whole", tmp_path / "split")
    proc = subprocess.run([sys.executable, "-m", "lossmask.cli", "train", "--data", str(dataset), "--model", "tiny",
                           "--out", str(tmp_path / "split"), *TINY, "--set", "batch_size=3", "--resume"],
                          env=ENV, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 1 and "window_size" in proc.stderr  # another global batch is refused, clearly
