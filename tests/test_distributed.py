"""Training under torchrun: two CPU processes (gloo), each with half of every global batch (in two micro-batches,
GRAD_ACCUM 2), hold identical weights and compute what one process computes with the whole global batch in one
piece, also across a stop and a resume; with importance-sampled timesteps, whose proposal learns from the losses of
the whole global batch."""
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
TINY = ["--num_images", "48", "--img_size", "16", "--width", "8", "--sample_steps", "2", "--ema_start", "2",
        "--amp", "False", "--timesteps", "importance", "--device", "cpu"]
# ddpm_conditional.train, as `python ddpm_conditional.py` runs it, and then each process saves the weights it holds.
WORKER = f"""
import os, sys
sys.path.insert(0, {str(REPO)!r})
import torch, ddpm_conditional, options
config = options.parse_config(vars(ddpm_conditional), sys.argv[1:])
model, ema_model = ddpm_conditional.train(config)
torch.save({{"model": model.state_dict(), "ema_model": ema_model.state_dict()}},
           f"weights_rank{{os.environ.get('RANK', 0)}}.pt")
"""


def run(cwd, *args, processes=1):
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = [sys.executable, *(launcher if processes > 1 else []), "worker.py", *TINY, *args]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def weights(cwd, rank=0):
    return torch.load(Path(cwd) / f"weights_rank{rank}.pt", weights_only=True)


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    for cwd in single, double:
        cwd.mkdir()
        (cwd / "worker.py").write_text(WORKER)
    run(single, "--batch_size", "16", "--epochs", "2")  # 3 steps of 16 images per epoch
    accumulate = ["--batch_size", "4", "--grad_accum", "2"]  # 2 processes x 2 micro-batches x 4 images per step
    run(double, *accumulate, "--epochs", "1", processes=2)  # stopped after epoch 1
    out = run(double, *accumulate, "--epochs", "2", processes=2)  # ... and resumed under torchrun
    assert out.count("resuming") == 1 and out.count("done:") == 1  # only rank 0 speaks

    rank0, rank1, reference = weights(double, 0), weights(double, 1), weights(single)
    for part in ("model", "ema_model"):
        assert all(torch.equal(rank0[part][k], rank1[part][k]) for k in rank0[part]), f"ranks differ: {part}"
        ddp, one = (torch.cat([w.flatten() for w in state[part].values()]) for state in (rank0, reference))
        # Only rounding differs: AdamW's first steps turn a rounding-sized gradient into a lr-sized step for a few
        # weights, so compare the whole model (dropping other labels alone makes it differ by 2-4%)
        assert (ddp - one).norm() < 1e-4 * one.norm(), part
    state, single_state = (torch.load(cwd / "models" / "DDPM_conditional" / "train_state.pt", weights_only=True)
                           for cwd in (double, single))
    assert state["config"]["world_size"] == 2 and state["step"] == 6
    # the loss logged at every step (the mean over both processes) is the one-process loss of the same global batch
    torch.testing.assert_close(state["losses"], single_state["losses"], rtol=1e-5, atol=0)
    # and the timesteps' proposal learnt every loss of the global batch: 6 steps of 16, as one process does
    (square, count), (single_square, single_count) = (s["importance"].values() for s in (state, single_state))
    assert count.sum() == 6 * 16 and torch.equal(count, single_count)
    torch.testing.assert_close(square, single_square, rtol=1e-5, atol=0)
