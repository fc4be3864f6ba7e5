"""Training under torchrun: two CPU processes (gloo), each with half of every global batch (in two micro-batches,
GRAD_ACCUM 2), hold identical weights and compute what one process computes with the whole global batch in one
piece, also across a stop and a resume; with importance-sampled timesteps, whose proposal learns from the losses of
the whole global batch."""
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from conftest import PATIENCE

REPO = Path(__file__).resolve().parent.parent
TINY = ["--num_images", "48", "--img_size", "16", "--width", "8", "--sample_steps", "2", "--ema_start", "2",
        "--amp", "False", "--timesteps", "importance", "--device", "cpu"]
# ddpm_conditional.train, as `python ddpm_conditional.py` runs it, and then each process saves the weights it holds.
WORKER = f"""
import os, sys
sys.path.insert(0, {str(REPO)!r})
import torch, ddpm_conditional, options
if os.environ.get("OWN_FOLDERS"):  # each process in a folder of its own, as on machines without a shared filesystem
    os.makedirs(f"rank{{os.environ['RANK']}}", exist_ok=True)
    os.chdir(f"rank{{os.environ['RANK']}}")
config = options.parse_config(vars(ddpm_conditional), sys.argv[1:])
model, ema_model = ddpm_conditional.train(config)
torch.save({{"model": model.state_dict(), "ema_model": ema_model.state_dict()}},
           f"weights_rank{{os.environ.get('RANK', 0)}}.pt")
"""


def run(cwd, *args, processes=1, torchrun=None, script="worker.py", env=()):
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    torchrun = processes > 1 if torchrun is None else torchrun
    command = [sys.executable, *(launcher if torchrun else []), script, *TINY, *args]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=PATIENCE,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **dict(env)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def weights(cwd, rank=0):
    return torch.load(Path(cwd) / f"weights_rank{rank}.pt", weights_only=True)


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    """... and each process in a folder of its own, as on machines without a shared filesystem: only rank 0 writes,
    and on resume rank 0's train_state.pt reaches every process, so all resume at the same step."""
    single, double = tmp_path / "single", tmp_path / "double"
    for cwd in single, double:
        cwd.mkdir()
        (cwd / "worker.py").write_text(WORKER)
    run(single, "--batch_size", "16", "--epochs", "2")  # 3 steps of 16 images per epoch
    accumulate = ["--batch_size", "4", "--grad_accum", "2"]  # 2 processes x 2 micro-batches x 4 images per step
    own = {"OWN_FOLDERS": "1"}
    run(double, *accumulate, "--epochs", "1", processes=2, env=own)  # stopped after epoch 1
    assert not (double / "rank1" / "models").exists()  # only rank 0 writes
    out = run(double, *accumulate, "--epochs", "2", processes=2, env=own)  # ... and resumed under torchrun
    assert out.count("resuming") == 1 and out.count("done:") == 1  # only rank 0 speaks
    assert "resuming models/DDPM_conditional at epoch 2, step 3" in out

    rank0, rank1, reference = weights(double / "rank0", 0), weights(double / "rank1", 1), weights(single)
    for part in ("model", "ema_model"):
        assert all(torch.equal(rank0[part][k], rank1[part][k]) for k in rank0[part]), f"ranks differ: {part}"
        ddp, one = (torch.cat([w.flatten() for w in state[part].values()]) for state in (rank0, reference))
        # Only rounding differs: AdamW's first steps turn a rounding-sized gradient into a lr-sized step for a few
        # weights, so compare the whole model (dropping other labels alone makes it differ by 2-4%)
        assert (ddp - one).norm() < 1e-4 * one.norm(), part
    state, single_state = (torch.load(cwd / "models" / "DDPM_conditional" / "train_state.pt", weights_only=True)
                           for cwd in (double / "rank0", single))
    assert state["config"]["world_size"] == 2 and state["step"] == 6
    # the loss logged at every step (the mean over both processes) is the one-process loss of the same global batch
    torch.testing.assert_close(state["losses"], single_state["losses"], rtol=1e-5, atol=0)
    # and the timesteps' proposal learnt every loss of the global batch: 6 steps of 16, as one process does
    (square, count), (single_square, single_count) = (s["importance"].values() for s in (state, single_state))
    assert count.sum() == 6 * 16 and torch.equal(count, single_count)
    torch.testing.assert_close(square, single_square, rtol=1e-5, atol=0)


def test_torchrun_with_one_process_still_joins_a_process_group(tmp_path):
    """`torchrun --nproc_per_node=1` (the one-GPU check) runs DDP in a process group (gloo here, NCCL on a GPU)."""
    (tmp_path / "worker.py").write_text(WORKER)
    out = run(tmp_path, "--batch_size", "16", "--epochs", "1", processes=1, torchrun=True)
    assert "torchrun: 1 processes (gloo), global batch 16" in out


ORDER = f"""
import os, sys, time
sys.path.insert(0, {str(REPO)!r})
import torch.distributed as dist, utils
dist.init_process_group("gloo")
me = f"{{dist.get_rank()}}/{{os.environ['LOCAL_RANK']}}"  # rank / local rank
with utils.local_rank_zero_first():
    with open("order.txt", "a") as f:
        f.write(f"{{me}} in\\n")
    time.sleep(0.5)
    with open("order.txt", "a") as f:
        f.write(f"{{me}} out\\n")
dist.destroy_process_group()
"""


def test_the_first_process_reads_the_data_first(tmp_path):
    """Under torchrun the first process of a machine prepares the data (a download) while the others wait (the
    resume across folders of their own: the test above)."""
    (tmp_path / "order.py").write_text(ORDER)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "order.py"], cwd=tmp_path, check=True, capture_output=True, timeout=PATIENCE)
    assert (tmp_path / "order.txt").read_text().split("\n") == ["0/0 in", "0/0 out", "1/1 in", "1/1 out", ""]


ACCUMULATE = f"""
import argparse, sys
sys.path.insert(0, {str(REPO)!r})
import torch, torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel
from ddpm import Diffusion
from ddpm_conditional import train_step
from modules import EMA, UNet_conditional
dist.init_process_group("gloo")
rank = dist.get_rank()
for grad_accum in (1, 4):
    torch.manual_seed(0)
    model = UNet_conditional(3, 3, num_classes=2, width=8, attention=(8,))
    ema_model = UNet_conditional(3, 3, num_classes=2, width=8, attention=(8,))
    ddp = DistributedDataParallel(model)
    all_reduces = []
    ddp.register_comm_hook(None, lambda state, bucket: all_reduces.append(1) or allreduce_hook(state, bucket))
    images = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(rank))
    c = argparse.Namespace(flip=True, cfg_drop=0.1, grad_accum=grad_accum, ema_start=10)
    train_step(ddp, ema_model, EMA(0.99), torch.optim.SGD(model.parameters(), lr=0.1), Diffusion(img_size=8,
               device="cpu"), images, torch.tensor([0, 1] * 4), torch.Generator().manual_seed(1), c, rank=rank,
               world_size=2)
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    everyone = [torch.empty_like(weights) for _ in range(2)]
    dist.all_gather(everyone, weights)
    assert torch.equal(everyone[0], everyone[1]), "the ranks' weights differ"
    print(f"grad_accum {{grad_accum}}: {{len(all_reduces)}} all-reduces")
    del ddp  # (a DDP model left alive when the process group goes can abort the process at exit)
dist.barrier()
dist.destroy_process_group()
"""


def test_micro_batches_all_reduce_their_gradients_once(tmp_path):
    """GRAD_ACCUM micro-batches under DistributedDataParallel: the gradients are all-reduced once, after the last
    micro-batch (the others add up locally), as many all-reduces as one batch in one piece, and the ranks still hold
    the same weights."""
    (tmp_path / "accumulate.py").write_text(ACCUMULATE)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "accumulate.py"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=PATIENCE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    counts = {}  # grad_accum: each rank's count of all-reduces (one a gradient bucket)
    for grad_accum, count in re.findall(r"grad_accum (\d): (\d+) all-reduces", result.stdout):
        counts.setdefault(int(grad_accum), []).append(int(count))
    assert len(counts[1]) == 2 and counts[1][0] > 0 and counts[4] == counts[1]


def test_on_two_machines_one_process_downloads_while_the_others_wait(tmp_path):
    """Two machines of two processes (two torchrun launchers here, sharing this folder as machines may share a
    filesystem): rank 0 prepares the data alone; then the first process of the other machine (which finds the
    files, or fetches its own where nothing is shared), then the rest."""
    import socket
    (tmp_path / "order.py").write_text(ORDER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
                "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "order", "order.py"]
    machines = [subprocess.Popen(launcher, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(2)]
    for machine in machines:
        assert machine.wait(timeout=PATIENCE) == 0, machine.stderr.read()[-3000:]
    lines = (tmp_path / "order.txt").read_text().split()
    events = [(line.split("/"), what) for line, what in zip(lines[::2], lines[1::2])]
    assert events[:2] == [(["0", "0"], "in"), (["0", "0"], "out")]  # rank 0 alone
    assert events[2][1] == "in" and events[2][0][1] == "0" and events[3] == (events[2][0], "out")  # the other first
    assert sorted(local for (rank, local), what in events[4:]) == ["1"] * 4  # then the others, each in and out
