"""Every ```python block of README.md and docs/ runs, so the docs cannot rot.

A document's blocks run as written, in order, in one namespace, in a fresh folder; what differs is only the machine:
offline, the Hub ids they load point to the shared assets' proxy CLIP (or to the folder an earlier block published
to), `../shared/assets` to the assets folder, and step counts shrink (CPU time). The tasks are the ones each block
names. Uploads go to a fake Hub that writes into the folder.
"""

import os
import re
import shutil
import sys
import types
from pathlib import Path

import pytest

from hf_moe_cl.assets import assets_dir

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text())


def offline(code: str, hub: Path) -> str:
    """The block as it runs here: local models and data, small step counts."""
    assets = assets_dir()
    code = code.replace('"openai/clip-vit-base-patch16"', repr(str(assets / "proxy-clip")))
    code = code.replace('"../shared/assets', f'"{assets}')
    hub_folder = lambda match: repr(str(hub / match.group(1)))  # noqa: E731
    code = "\n".join(line if "push_to_hub(" in line else re.sub(r'"(user/[\w-]+)"', hub_folder, line)
                     for line in code.split("\n"))  # pushes keep the repo id: the fake Hub uploads to hub/<repo id>
    return re.sub(r"max_steps=\d+", "max_steps=2", code)


class FakeHub:
    """`huggingface_hub.HfApi` for `hf_moe_cl.publishing`: an upload copies the folder to `hub/<repo_id>`."""

    def __init__(self, root: Path):
        self.root = root

    def __call__(self, token=None):
        return self

    def create_repo(self, repo_id, **kwargs):
        return types.SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, folder_path, repo_id, commit_message=None, **kwargs):
        target = self.root / repo_id
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(folder_path, target)
        return f"https://huggingface.co/{repo_id}/commit/0"


@pytest.mark.parametrize("path", [p for p in DOCUMENTS if blocks(p)], ids=lambda p: p.name)
def test_code_blocks_run(path, tmp_path, monkeypatch):
    import hf_moe_cl.publishing

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hf_moe_cl.publishing, "HfApi", FakeHub(tmp_path / "hub"))
    namespace: dict = {"__name__": f"docs_{path.stem}"}
    for number, code in enumerate(blocks(path), 1):
        try:
            exec(compile(offline(code, tmp_path / "hub"), f"{path.name} block {number}", "exec"), namespace)
        except Exception as error:  # name the block, then fail with the original traceback
            raise AssertionError(f"{path.relative_to(REPO)}, python block {number} failed: {error!r}") from error


def test_documents_name_no_missing_modules():
    """Module paths the docs name (`hf_moe_cl.x.y`) exist."""
    import importlib

    names = {m for path in DOCUMENTS for m in re.findall(r"`(hf_moe_cl(?:\.\w+)+)", path.read_text())}
    missing = []
    for name in sorted(names):
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            try:
                for attribute in parts[cut:]:
                    obj = getattr(obj, attribute)
            except AttributeError:
                missing.append(name)
            break
        else:
            missing.append(name)
    assert not missing, missing
    assert os.path.isdir(REPO / "docs")


def test_print_recipe_output_in_the_docs_is_what_the_command_prints(capsys, monkeypatch):
    """docs/gpu.md shows `--print_recipe`'s output for mtil-order-1 (one process): it is today's output, key for key."""
    import importlib.util
    import json

    shown = re.search(r"python examples/mtil.py --preset mtil-order-1 --print_recipe\n```\n\n```json\n(.*?)```",
                      (REPO / "docs" / "gpu.md").read_text(), re.S)
    assert shown, "docs/gpu.md no longer shows the `--print_recipe` command followed by its JSON output"
    spec = importlib.util.spec_from_file_location("mtil_example", REPO / "examples" / "mtil.py")
    mtil = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mtil)  # dataclasses look their module up
    spec.loader.exec_module(mtil)
    monkeypatch.chdir(REPO)
    from transformers.utils import logging as transformers_logging

    level = transformers_logging.get_verbosity()  # `disable_tqdm` follows it; a fresh process has the default
    transformers_logging.set_verbosity_warning()
    try:
        mtil.main(["--preset", "mtil-order-1", "--print_recipe"])
    finally:
        transformers_logging.set_verbosity(level)
    printed = capsys.readouterr().out
    assert list(json.loads(shown.group(1)).items()) == list(json.loads(printed).items())


def test_commands_in_the_docs_use_options_their_scripts_have():
    """The ```bash blocks are not run (they train for hours), but every `--option` they pass to a script of this
    repository is one that script's `--help` lists."""
    import subprocess

    calls: dict[str, set[str]] = {}
    for path in DOCUMENTS:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                call = re.search(r"\b((?:examples|benchmarks|tests)/\w+\.py)\b(.*)", line.split("#")[0])
                if call:
                    calls.setdefault(call.group(1), set()).update(re.findall(r"(?<![\w-])(--\w+)", call.group(2)))
    assert {"examples/mtil.py", "benchmarks/mini_mtil.py"} <= set(calls)
    unknown = []
    for script, options in sorted(calls.items()):
        help_flag = "--help_all" if script == "examples/mtil.py" else "--help"
        shown = subprocess.run([sys.executable, script, help_flag], cwd=REPO, capture_output=True, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        assert shown.returncode == 0, shown.stderr[-2000:]
        listed = set(re.findall(r"(?<![\w-])(--\w+)", shown.stdout))
        unknown += [f"{script} {option}" for option in sorted(options - listed)]
    assert not unknown, f"the docs pass options these scripts do not have: {unknown}"
