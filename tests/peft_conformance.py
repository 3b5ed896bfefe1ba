#!/usr/bin/env python
"""peft's conformance suite for a peft method, run against MoE-LoRA: `tests/test_custom_models.py` of huggingface/peft.

    python tests/peft_conformance.py --peft_repo PATH_TO_A_GIT_CLONE_OF_PEFT [--revision v0.21.2] [-k EXPR] [-- PYTEST_ARGS]

The three files of peft's test suite it needs (`test_custom_models.py`, `testing_common.py`, `testing_utils.py`) are
read from the clone at `--revision` (default: the tag of the installed peft) into a temporary package, MoE-LoRA's
cases are added to their `TEST_CASES` table as peft's own methods are, and pytest runs every test of the
`TestPeftCustomModel` class on those cases. Tests that merge adapter weights into the base model are expected to
fail (MoE-LoRA routes each sample to its own experts and refuses merging by design); every other test must pass.
Exit status 0 when that holds. Nothing of peft's test suite is kept in this repository.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

PEFT_FILES = ("test_custom_models.py", "testing_common.py", "testing_utils.py")

# MoE-LoRA on the Linear layers of peft's test MLP (lin0: 10 -> 20, lin1: 20 -> 2), one task router so that the
# adapter is routed without a task id, as any peft adapter is.
MOE_LORA_CASES = '''
    ("Vanilla MLP 1 MoE-LoRA", "MLP", MoELoraConfig, {"target_modules": ["lin0"], "num_experts": 4, "top_k": 2, "r": 2}),
    ("Vanilla MLP 2 MoE-LoRA", "MLP", MoELoraConfig, {"target_modules": ["lin0", "lin1"], "num_experts": 3, "top_k": 2,
                                                      "r": 2, "expert_dropout": 0.0}),
    ("Vanilla MLP 3 MoE-LoRA", "MLP", MoELoraConfig, {"target_modules": "lin1", "num_experts": 2, "top_k": 2, "r": 4,
                                                      "expert_activation": None, "expert_bias": False}),
    ("Vanilla MLP 4 MoE-LoRA", "MLP", MoELoraConfig, {"target_modules": ["lin0"], "num_experts": 4, "top_k": 2, "r": 2,
                                                      "modules_to_save": ["lin1"]}),
'''

# A test that fails because MoE-LoRA refuses to merge (and only such a test) counts as an expected failure.
CONFTEST = '''
import pytest

REFUSAL = {refusal!r}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is not None and REFUSAL in str(call.excinfo.value):
        report.outcome = "skipped"
        report.wasxfail = "MoE-LoRA refuses merging by design (per-sample expert routing)"
'''
MERGE_REFUSAL = "cannot be merged into the base weights"

# testing_common imports diffusers for its Stable Diffusion tests, which this class does not run.
DIFFUSERS_STUB = "class StableDiffusionPipeline:\n    pass\n"


def read_from_git(repo: Path, revision: str, name: str) -> str:
    result = subprocess.run(["git", "-C", str(repo), "show", f"{revision}:tests/{name}"], capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise SystemExit(f"Cannot read tests/{name} at {revision!r} from {repo}: {result.stderr.strip()}. Pass a "
                         "clone of https://github.com/huggingface/peft with --peft_repo and a revision it has "
                         "(`git -C PATH tag`) with --revision.")
    return result.stdout


def add_cases(source: str) -> str:
    anchor = "\nTEST_CASES = [\n"
    if source.count(anchor) != 1:
        raise SystemExit("peft's test_custom_models.py has no single `TEST_CASES = [` table; this runner needs an "
                         "update for that peft revision.")
    header = "import hf_moe_cl  # registers MoE-LoRA with peft\nfrom hf_moe_cl import MoELoraConfig\n\n"
    return header + source.replace(anchor, anchor + MOE_LORA_CASES, 1)


def main(argv: list[str] | None = None) -> int:
    import peft

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peft_repo", required=True, type=Path, help="A git clone of huggingface/peft.")
    parser.add_argument("--revision", default=f"v{peft.__version__}",
                        help="Tag or commit to read the tests from (default: the installed peft's tag).")
    parser.add_argument("-k", dest="select", help="Also select tests by this pytest -k expression, e.g. save.")
    parser.add_argument("pytest_args", nargs="*", help="More pytest arguments (after --), e.g. -x.")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        package = Path(folder) / "peft_conformance"
        (package / "stubs" / "diffusers").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "stubs" / "diffusers" / "__init__.py").write_text(DIFFUSERS_STUB)
        for name in PEFT_FILES:
            text = read_from_git(args.peft_repo, args.revision, name)
            (package / name).write_text(add_cases(text) if name == "test_custom_models.py" else text)
        (package / "conftest.py").write_text(CONFTEST.format(refusal=MERGE_REFUSAL))
        stubs = [] if _has_module("diffusers") else [str(package / "stubs")]
        env_path = ":".join(stubs + [str(Path(__file__).resolve().parents[1] / "src"), *sys.path[1:]])
        command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEX",
                   "--rootdir", folder, "-o", "addopts=", "-W", "ignore",
                   f"{package / 'test_custom_models.py'}::TestPeftCustomModel", "-k", "MoE-LoRA" + (f" and ({args.select})" if args.select else ""),
                   *args.pytest_args]
        print(f"peft {peft.__version__}; tests of {args.peft_repo} at {args.revision}", flush=True)
        return subprocess.run(command, cwd=folder, env={**_environment(), "PYTHONPATH": env_path}).returncode


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _environment() -> dict:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1"}


if __name__ == "__main__":
    sys.exit(main())
