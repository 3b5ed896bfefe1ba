"""Two gloo processes on CPU must freeze the same experts and reach the weights of one process with the same
global batch: expert-selection counts are all-reduced before freezing and merging."""

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")


def run(command, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    run([sys.executable, WORKER, str(single), "8"], cwd=tmp_path)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER,
         str(double), "8"], cwd=tmp_path)
    one = json.loads((single / "summary.json").read_text())
    two = json.loads((double / "summary.json").read_text())
    assert one["world"] == 1 and two["world"] == 2
    assert two["frozen"] == one["frozen"]
    assert two["counts"] == one["counts"]
    a, b = load_file(single / "weights.safetensors"), load_file(double / "weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key
