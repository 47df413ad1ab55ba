"""Two CPU processes (torchrun, gloo) train exactly like one process on the same global batch.

The test launches this file as the worker script: ``python tests/test_train_distributed.py OUT BATCH``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MAX_ITERS = 4


def _data(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(4, 20))
        mask = (rng.random(length) < 0.5).astype(np.float32)
        out.append(
            {"input_ids": rng.integers(0, 64, length).astype(np.uint32), "loss_mask": mask, "source": ("mem", 1)}
        )
    return out


def _train(out: str, batch_size: int):
    from lossmask.train import TrainArgs, config_from_dict, run_training

    cfg = config_from_dict(
        {
            "hidden_size": 32,
            "num_layers": 2,
            "num_heads": 4,
            "intermediate_size": 64,
            "vocab_size": 64,
            "block_size": 32,
            "batch_size": batch_size,
            "grad_accum": 2,
            "max_iters": MAX_ITERS,
            "lr": 1e-2,
            "log_interval": 1,
            "eval_interval": 2,
            "eval_iters": 3,
        }
    )
    args = TrainArgs(model="tiny", data=_data(21, 0), val_data=_data(7, 1), out=out, config=cfg, progress=False)
    return run_training(args)


def test_two_processes_match_one(tmp_path):
    import torch
    from safetensors.torch import load_file

    from lossmask.train.metrics import read_metrics

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        __file__,
        str(tmp_path / "two"),
        "2",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one = _train(str(tmp_path / "one"), 4)

    two_metrics, one_metrics = read_metrics(tmp_path / "two" / "metrics.jsonl"), read_metrics(one.metrics_path)
    assert [r["iter"] for r in two_metrics] == [r["iter"] for r in one_metrics]
    for a, b in zip(two_metrics, one_metrics, strict=True):
        for key in ("loss", "val_loss", "grad_norm"):
            if key in b:
                assert abs(a[key] - b[key]) <= 1e-5 * abs(b[key]), (key, a, b)
        for key in ("tokens", "trained_tokens"):  # every item exactly once across the two processes
            assert a.get(key) == b.get(key)
    w2 = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    w1 = load_file(str(one.final_dir / "model.safetensors"))
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], atol=1e-5, rtol=1e-4)
    assert sorted(p.name for p in (tmp_path / "two" / "final" / "trainer_state").glob("rng_rank*.pt")) == [
        "rng_rank0.pt",
        "rng_rank1.pt",
    ]


if __name__ == "__main__":
    _train(sys.argv[1], int(sys.argv[2]))
