"""Publishing without the Hub: `HfApi` is replaced by a fake that copies the uploaded folder."""

import json
import shutil
import types

import pytest
from huggingface_hub import ModelCard

import hf_moe_cl.publishing as publishing
from hf_moe_cl.experiments.reporting import matrix_summary
from hf_moe_cl.continual.methods import method_for_model
from hf_moe_cl.continual.result import ContinualResult

from conftest import tiny_clip


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """Installs a fake `HfApi`; returns the list of calls it received and the folder uploads land in."""
    calls, landed = [], tmp_path / "on-the-hub"

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls.append(("create_repo", repo_id, private, exist_ok))
            return types.SimpleNamespace(repo_id=repo_id)

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload_folder", repo_id, commit_message))
            shutil.copytree(folder_path, landed)
            return f"https://huggingface.co/{repo_id}/commit/1"

    monkeypatch.setattr(publishing, "HfApi", FakeApi)
    return calls, landed


def expected_eval_results(result):
    expected = {}
    for kind, matrix in result.matrices.items():
        metrics, lost = matrix_summary(result.task_names, matrix)
        expected.update({(kind, name): value for name, value in {**metrics, "bwt": lost["bwt"]}.items()})
    return expected


def test_push_uploads_adapter_selector_and_a_card_with_the_results(ddas_run, fake_hub):
    model, _, result, _ = ddas_run
    calls, landed = fake_hub
    url = publishing.push_to_hub(model, "me/continual-clip", result, private=True, token="secret")
    assert url == "https://huggingface.co/me/continual-clip/commit/1"
    assert calls[:2] == [("init", "secret"), ("create_repo", "me/continual-clip", True, True)]
    assert sorted(p.name for p in landed.iterdir()) == ["README.md", "adapter_config.json",
                                                        "adapter_model.safetensors"]
    assert json.loads((landed / "adapter_config.json").read_text())["selector"] is not None

    card = ModelCard.load(landed / "README.md")
    assert card.data.library_name == "peft" and card.data.pipeline_tag is None  # no path that ignores the adapter
    assert {"hf-moe-cl", "continual-learning", "moe-adapters", "task-agnostic"} <= set(card.data.tags)
    assert card.data.base_model is None  # the tiny test CLIP has no Hub id
    assert "0. **first** (3 classes): red, green, blue" in card.text
    assert "1. **second** (3 classes): yellow, cyan, magenta" in card.text
    assert 'model="me/continual-clip"' in card.text and "REPO_ID" not in card.text
    found = {(r.metric_config, r.metric_type): r.metric_value for r in card.data.eval_results}
    expected = expected_eval_results(result)
    assert set(found) == set(expected) and len(found) == 4 * len(result.matrices) == 12
    assert all(found[key] == pytest.approx(value, abs=0.005) for key, value in expected.items())
    assert {r.metric_name for r in card.data.eval_results} >= {"BWT (protocol)", "Transfer (oracle)"}
    assert "| protocol: task-agnostic, one route per test batch |" in card.text
    assert "the headline is the protocol matrix, task-agnostic, one route per test batch." in card.text


def test_dry_run_writes_exactly_what_would_be_uploaded(ddas_run, fake_hub, tmp_path, monkeypatch):
    model, _, result, _ = ddas_run
    _, landed = fake_hub
    publishing.push_to_hub(model, "me/continual-clip", result)

    class NoHub:
        def __init__(self, *args, **kwargs):
            raise AssertionError("a dry run must not contact the Hub")

    monkeypatch.setattr(publishing, "HfApi", NoHub)
    dry = tmp_path / "dry-run"
    assert publishing.push_to_hub(model, "me/continual-clip", result, dry_run_dir=dry) == str(dry)
    assert sorted(p.name for p in dry.iterdir()) == sorted(p.name for p in landed.iterdir())
    assert all((dry / p.name).read_bytes() == p.read_bytes() for p in landed.iterdir())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left
    with pytest.raises(FileExistsError, match="not an empty folder"):
        publishing.push_to_hub(model, "me/continual-clip", result, dry_run_dir=dry)


@pytest.mark.filterwarnings("ignore:Could not find a config file")
def test_an_explicit_base_model_is_what_the_published_adapter_names(ddas_run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # peft would look the Hub id up while saving
    model, _, result, _ = ddas_run
    recorded = model.peft_config["default"].base_model_name_or_path
    publishing.push_to_hub(model, "me/continual-clip", result, base_model="openai/clip-vit-base-patch16",
                           dry_run_dir=tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "openai/clip-vit-base-patch16"
    assert ModelCard.load(tmp_path / "out" / "README.md").data.base_model == "openai/clip-vit-base-patch16"
    assert model.peft_config["default"].base_model_name_or_path == recorded  # the model itself is unchanged


def test_a_full_fine_tune_is_published_for_transformers_with_its_base_model(tmp_path):
    method = method_for_model(tiny_clip())
    result = ContinualResult(["a", "b"], {"oracle": [[60.0, 10.0], [40.0, 70.0]]})
    folder = publishing.push_to_hub(method, "me/finetuned", result, base_model="openai/clip-vit-base-patch16",
                                    dry_run_dir=tmp_path / "out")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert {"config.json", "model.safetensors", "README.md"} == {p.name for p in (tmp_path / "out").iterdir()}
    assert folder == str(tmp_path / "out")
    assert card.data.library_name == "transformers" and card.data.base_model == "openai/clip-vit-base-patch16"
    assert 'CLIPModel.from_pretrained("me/finetuned")' in card.text
    assert {(r.metric_config, r.metric_type): r.metric_value for r in card.data.eval_results}["oracle", "bwt"] == -20.0
    assert "0. **a**" in card.text  # no class names recorded: the task names from the result
    local = publishing.model_card(method, "me/finetuned", result, base_model=str(tmp_path))
    assert local.data.base_model is None and str(tmp_path) in local.text  # a local path is no Hub id
