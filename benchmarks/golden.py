#!/usr/bin/env python
"""Golden runs: short real runs of `examples/mtil.py` whose every number is recorded, to prove a refactor changed
nothing (bit for bit) or to name exactly what changed.

    python benchmarks/golden.py record benchmarks/golden.json     # before a change
    python benchmarks/golden.py check benchmarks/golden.json      # after it: exit 1 naming every difference

Each run trains two mini-MTIL tasks for a few steps with a fixed seed on the assets' proxy CLIP. What is recorded:
the three matrices and the route histograms of the last task checkpoint (exact floats), and every tensor of every
safetensors file at the run root (the final adapter, ConDU's save) as a SHA-256 of its bytes with its dtype and
shape. Bit-identity holds on the machine and library versions a record was made with (`environment`); elsewhere
`check --tolerance` compares the matrices within a tolerance and reports tensors only by their sums.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from hf_moe_cl.assets import assets_dir

REPO = Path(__file__).resolve().parents[1]
COMMON = ["--preset", "mini", "--tasks", "cifar10,mnist", "--max_steps", "5", "--warmup_steps", "1", "--seed", "0",
          "--per_device_eval_batch_size", "256", "--disable_tqdm", "true", "--report_to", "none"]
RUNS = {
    # MoE-Adapters with DDAS (the README's main job, shortened): protocol, per_image and oracle matrices
    "moe-adapters-ddas": COMMON + ["--method", "moe-adapters", "--ddas", "true", "--learning_rate", "5e-3",
                                   "--ddas_task_steps", "30", "--ddas_reference_steps", "30"],
    # the official DDAS training loop (few-shot form: reference shots, images augmented once) on CLIP features
    "moe-adapters-ddas-official": COMMON + ["--method", "moe-adapters", "--ddas", "true", "--learning_rate", "5e-3",
                                            "--ddas_training", "official", "--ddas_task_steps", "30",
                                            "--ddas_reference_steps", "30", "--ddas_augment_once", "true",
                                            "--ddas_reference_shots", "5"],
    # the variants that exercise freezing by coverage, a growing bank and expert merging
    "moe-adapters-growth": COMMON + ["--method", "moe-adapters", "--learning_rate", "5e-3", "--num_experts", "4",
                                     "--freeze_policy", "coverage", "--freeze_images", "64",
                                     "--expert_growth_threshold", "0.5", "--merge_experts_every", "2",
                                     "--routing_report_images", "32"],
    "condu": COMMON + ["--method", "condu"],
}


def environment() -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu": _cpu_model(), "threads": torch.get_num_threads()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def tensor_record(tensor: torch.Tensor) -> dict:
    data = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
    return {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape),
            "sha256": hashlib.sha256(data).hexdigest()[:20],
            "sum": float(tensor.double().sum()) if tensor.numel() else 0.0}


def run_record(name: str, argv: list[str], folder: Path) -> dict:
    output = folder / name
    command = [sys.executable, str(REPO / "examples" / "mtil.py"), *argv, "--output_dir", str(output)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{name} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    last = sorted(p for p in output.iterdir() if p.name.startswith("task-"))[-1]
    progress = json.loads((last / "continual_progress.json").read_text())
    tensors = {}
    for path in sorted(output.glob("*.safetensors")):
        for key, value in sorted(load_file(str(path)).items()):
            tensors[f"{path.name}:{key}"] = tensor_record(value)
    assets = str(assets_dir())  # the configs name the base model by path: the same run elsewhere names another
    configs = {path.name: json.loads(path.read_text().replace(assets, "<assets>"))
               for path in sorted(output.glob("*.json")) if path.name != "all_results.json"}
    for config in configs.values():  # peft saves this set in Python's (per-process) set order
        if isinstance(config.get("target_modules"), list):
            config["target_modules"] = sorted(config["target_modules"])
    return {"command": argv, "matrices": progress["matrices"], "route_histogram": progress["route_histogram"],
            "all_results": json.loads((output / "all_results.json").read_text()), "tensors": tensors,
            "configs": configs}


def record_all(names: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        return {"environment": environment(),
                "runs": {name: run_record(name, RUNS[name], Path(folder)) for name in names}}


def _close(a, b, tolerance: float) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, tolerance) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= tolerance
    return a == b


def differences(recorded: dict, current: dict, tolerance: float = 0.0) -> list[str]:
    """What differs between two records of one run (empty: identical, within `tolerance` for matrices when > 0)."""
    found = []
    for key in ("matrices", "route_histogram", "all_results"):
        if not _close(recorded[key], current[key], tolerance):
            found.append(f"{key}: {json.dumps(recorded[key])} -> {json.dumps(current[key])}")
    old, new = recorded["tensors"], current["tensors"]
    for key in sorted(set(old) | set(new)):
        if key not in new or key not in old:
            found.append(f"tensor {key}: {'missing now' if key not in new else 'new'}")
            continue
        fields = ("dtype", "shape", "sha256") if tolerance == 0 else ("dtype", "shape")
        changed = [f for f in fields if old[key][f] != new[key][f]]
        if tolerance and abs(old[key]["sum"] - new[key]["sum"]) > tolerance * max(1.0, abs(old[key]["sum"])):
            changed.append("sum")
        if changed:
            found.append(f"tensor {key}: " + ", ".join(f"{f} {old[key][f]} -> {new[key][f]}" for f in changed))
    found += [f"config {line}" for line in _json_differences(recorded["configs"], current["configs"])]
    return found


def _json_differences(old, new, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for key in sorted(set(old) | set(new), key=str)
                for line in _json_differences(old.get(key), new.get(key), f"{path}.{key}")]
    return [] if old == new else [f"{path}: {json.dumps(old)[:200]} -> {json.dumps(new)[:200]}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("record", "check"))
    parser.add_argument("path", type=Path)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    parser.add_argument("--tolerance", type=float, default=0.0,
                        help="check only: matrices within this, tensors by dtype, shape and relative sum (0: bits)")
    options = parser.parse_args()
    names = options.runs.split(",")
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        parser.error(f"unknown runs {unknown}; known: {', '.join(RUNS)}")
    current = record_all(names)
    if options.action == "record":
        options.path.write_text(json.dumps(current, indent=1) + "\n")
        print(f"recorded {', '.join(names)} in {options.path}")
        return 0
    recorded = json.loads(options.path.read_text())
    same_machine = recorded["environment"] == current["environment"]
    tolerance = options.tolerance
    if not same_machine and tolerance == 0:
        print(f"environment differs ({recorded['environment']} -> {current['environment']}): bit-identity is not "
              "expected; pass --tolerance")
    failed = False
    for name in names:
        found = differences(recorded["runs"][name], current["runs"][name], tolerance)
        print(f"{name}: {'identical' if not found and tolerance == 0 else 'same' if not found else 'DIFFERS'}")
        for line in found:
            print("  " + line[:600])
        failed |= bool(found)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
