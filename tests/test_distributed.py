"""Two gloo processes on CPU, launched as docs/trainer.md says, must freeze the same experts and reach the weights and
matrices of one process with the same global batch: expert-selection counts are all-reduced before freezing and
merging. A launch whose processes would not join is refused."""

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

import pytest

from hf_moe_cl.continual import ContinualTrainingArguments

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
TRAINER_DOC = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "trainer.md")


def docs_cpu_launch(processes: int) -> list[str]:
    """docs/trainer.md's CPU launch with `processes` processes, running the worker instead of examples/mtil.py."""
    with open(TRAINER_DOC) as handle:
        line = next(line for line in handle if line.startswith("torchrun "))
    launcher, options = line.split(" examples/mtil.py ")
    assert "--use_cpu true" in options  # what joins CPU processes; the worker sets use_cpu=True
    launcher = launcher.split()
    launcher[launcher.index("--nproc_per_node") + 1] = str(processes)
    return [sys.executable, "-m", "torch.distributed.run", *launcher[1:], WORKER]


def run(command, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    run([sys.executable, WORKER, str(single), "8"], cwd=tmp_path)
    run([*docs_cpu_launch(2), str(double), "8"], cwd=tmp_path)
    one = json.loads((single / "summary.json").read_text())
    two = json.loads((double / "summary.json").read_text())
    assert one["world"] == 1 and two["world"] == 2
    assert two["frozen"] == one["frozen"]
    assert two["counts"] == one["counts"]
    assert two["matrices"].keys() == one["matrices"].keys() and "oracle" in one["matrices"]
    for kind, matrix in one["matrices"].items():  # docs/trainer.md: every cell within 0.5 points
        cells = [(a, b) for row, other in zip(matrix, two["matrices"][kind]) for a, b in zip(row, other)]
        assert all(abs(a - b) <= 0.5 for a, b in cells if a is not None and b is not None), kind
    a, b = load_file(single / "weights.safetensors"), load_file(double / "weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key


def test_ddas_selector_condu_store_evaluation_shards_and_checkpoints_under_two_processes(tmp_path):
    """docs/ddas.md: every process fits the same selector from gathered features; ConDU's prototypes are gathered
    too. 33 training and 13 test images per task (uneven last batches and protocol units): nothing is counted twice,
    both processes hold the same selector and ConDU store, near one process's; only process 0 writes checkpoints."""
    single, double = tmp_path / "single", tmp_path / "double"
    run([sys.executable, WORKER, str(single), "8", "ddas-condu"], cwd=tmp_path)
    run([*docs_cpu_launch(2), str(double), "8", "ddas-condu"], cwd=tmp_path)
    one = json.loads((single / "summary.json").read_text())
    two = json.loads((double / "summary.json").read_text())
    assert one["world"] == 1 and two["world"] == 2
    assert two["files"] == one["files"] and "ddas/task-01-second/adapter_model.safetensors" in one["files"]
    for key in ("histograms", "condu_histograms"):  # every test image routed once, none twice
        assert two[key].keys() == one[key].keys()
        for kind in one[key]:
            assert [[sum(cell) for cell in row] for row in two[key][kind]] == [[13, 13], [13, 13]], (key, kind)
    for key in ("matrices", "condu_matrices"):
        assert two[key].keys() == one[key].keys()
        for kind, matrix in one[key].items():
            cells = [(a, b) for row, other in zip(matrix, two[key][kind]) for a, b in zip(row, other)]
            assert all(abs(a - b) <= 0.5 for a, b in cells), (key, kind)
    a, b, c = (load_file(path) for path in (single / "tensors-0.safetensors", double / "tensors-0.safetensors",
                                            double / "tensors-1.safetensors"))
    assert a.keys() == b.keys() == c.keys() and any(k.startswith("prototypes.") for k in a)
    assert any(".thresholds" in k for k in a)
    for key in a:
        assert torch.equal(b[key], c[key]), key  # both processes: the same selector, prototypes and deltas
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key


def test_torchrun_on_cpu_without_use_cpu_is_refused_with_the_fix(tmp_path):
    """Without a GPU and without use_cpu=True, each process of a 2-process torchrun would train alone."""
    script = tmp_path / "arguments.py"
    script.write_text("from hf_moe_cl.continual import ContinualTrainingArguments\n"
                      f"ContinualTrainingArguments(output_dir={str(tmp_path / 'run')!r}, report_to='none')\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(docs_cpu_launch(2)[:-1] + [str(script)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode != 0
    assert "WORLD_SIZE=2 processes, but this run has 1" in result.stderr and "--use_cpu true" in result.stderr


def test_split_batches_with_an_eval_batch_the_processes_do_not_divide_is_refused_before_training(tmp_path):
    """accelerate refused it only when DDAS, ConDU or the routing report read images, after task 1 had trained."""
    script = tmp_path / "arguments.py"
    script.write_text("from hf_moe_cl.continual import ContinualTrainingArguments\n"
                      f"ContinualTrainingArguments(output_dir={str(tmp_path / 'run')!r}, report_to='none', "
                      "use_cpu=True, per_device_eval_batch_size=3, accelerator_config={'split_batches': True})\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(docs_cpu_launch(2)[:-1] + [str(script)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode != 0
    assert "per_device_eval_batch_size=3 does not divide by 2: give a multiple of 2" in result.stderr


def test_accelerate_cpu_launch_of_several_processes_is_refused(tmp_path, monkeypatch):
    """`accelerate launch --cpu --num_processes 2` starts one process (it sets MASTER_ADDR, not WORLD_SIZE)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    with pytest.raises(ValueError, match="started this one alone.*torchrun with --use_cpu true.*docs/trainer.md"):
        ContinualTrainingArguments(output_dir=str(tmp_path), report_to="none")
