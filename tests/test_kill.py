"""A run killed with SIGKILL (during training, while a checkpoint folder is written, while a task's matrix row is
written) and then resumed gives the matrices and weights of an uninterrupted run, and never damages an earlier
checkpoint."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

WORKER = os.path.join(os.path.dirname(__file__), "continual_worker.py")


def work(out, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, WORKER, str(out), *extra], capture_output=True, text=True, env=env,
                          timeout=600)


def contents(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = work(out)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((out / "summary.json").read_text()), load_file(out / "weights.safetensors")


@pytest.mark.parametrize("kill", ["train:1:3", "save:1", "progress:1"])
def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted, kill):
    killed = work(tmp_path, "--kill", kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    run = tmp_path / "run"
    first = contents(run / "task-00-first")
    second = run / "task-01-second"
    assert not (run / "task-02-third").exists()
    if kill == "progress:1":  # killed while writing the row into a complete checkpoint
        assert json.loads((second / "continual_progress.json").read_text())["evaluated"] is False
    else:
        assert not second.exists()
    if kill == "save:1":  # killed with the filled checkpoint folder still under its temporary name
        assert [p.name for p in run.iterdir() if p.name.startswith(".task-01-second.tmp-")]
    resumed = work(tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert contents(run / "task-00-first") == first  # the earlier checkpoint was never touched
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no leftovers of the killed write
    summary, weights = json.loads((tmp_path / "summary.json").read_text()), load_file(tmp_path / "weights.safetensors")
    expected_summary, expected_weights = uninterrupted
    # what the evaluation encoded is a cost of the processes that ran, not a result: a resumed run encodes again
    # what the killed process had kept in memory
    for run_summary in (summary, expected_summary):
        run_summary["diagnostics"].pop("image_encodings", None)
    assert summary == expected_summary
    assert weights.keys() == expected_weights.keys()
    for key in weights:
        assert torch.equal(weights[key], expected_weights[key]), key
