"""Publishing without the Hub: `HfApi` is replaced by a fake that copies the uploaded folder."""

import dataclasses
import importlib.metadata
import json
import re
import shutil
import types

import pytest
from huggingface_hub import ModelCard

import hf_moe_cl
import hf_moe_cl.publishing as publishing
from hf_moe_cl.continual import card as run_card
from hf_moe_cl.experiments.metrics import mtil_metrics
from hf_moe_cl.continual.methods import method_for_model
from hf_moe_cl.continual.result import ContinualResult

from conftest import continual_args, tiny_clip
from test_pipeline import proxy_adapter  # noqa: F401  (a fixture: an adapter on the assets' proxy CLIP)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No Hub lookups (the base model's card): the tests run offline, a lookup would wait for its timeouts."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


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


def test_push_uploads_adapter_selector_and_a_card_with_the_results(ddas_run, fake_hub, tmp_path):
    model, _, result, _ = ddas_run
    calls, landed = fake_hub
    args = continual_args(tmp_path, learning_rate=0.0125, seed=41)
    url = publishing.push_to_hub(model, "me/continual-clip", result, private=True, token="secret", training_args=args,
                                 dataset_ids={"first": "me/first-colours"})
    assert url == "https://huggingface.co/me/continual-clip/commit/1"
    assert calls[:2] == [("init", "secret"), ("create_repo", "me/continual-clip", True, True)]
    assert sorted(p.name for p in landed.iterdir()) == ["README.md", "adapter_config.json",
                                                        "adapter_model.safetensors"]
    assert json.loads((landed / "adapter_config.json").read_text())["selector"] is not None

    card = ModelCard.load(landed / "README.md")
    assert card.data.library_name == "peft" and card.data.pipeline_tag is None  # no path that ignores the adapter
    assert {"hf-moe-cl", "continual-learning", "moe-adapters", "task-agnostic"} <= set(card.data.tags)
    assert card.data.base_model is None  # the tiny test CLIP has no Hub id
    assert card.data.license == "unknown" and card.data.datasets == ["me/first-colours"]
    assert "0. **first** [`me/first-colours`](https://huggingface.co/datasets/me/first-colours) (3 classes): red, " \
           "green, blue" in card.text
    assert "1. **second** (3 classes): yellow, cyan, magenta" in card.text
    assert "TaskAgnosticClassifier.from_pretrained('me/continual-clip')" in card.text and "REPO_ID" not in card.text
    # model-index: per matrix, the accuracy after the last task of each task (its Hub id, else its name)
    found = {(r.metric_config, r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert found == {(kind, dataset, "accuracy"): pytest.approx(matrix[-1][j], abs=0.005)
                     for kind, matrix in result.matrices.items()
                     for j, dataset in enumerate(["me/first-colours", "second"])}
    assert {r.metric_name for r in card.data.eval_results} >= {
        "Accuracy after the last task (protocol matrix: task-agnostic, one route per test batch)"}
    assert "| protocol: task-agnostic, one route per test batch |" in card.text
    assert "The headline is the protocol matrix, task-agnostic, one route per test batch." in card.text
    headline = mtil_metrics(result.matrices["protocol"])
    assert (f"Headline, from the `protocol` matrix (task-agnostic, one route per test batch): Transfer "
            f"{headline['transfer']:.1f}, Average {headline['average']:.1f}, Last {headline['last']:.1f}.") in card.text
    assert "| learning_rate | 0.0125 |" in card.text and "| seed | 41 |" in card.text
    assert "| lr_scheduler_type | cosine |" in card.text and "| num_processes | 1 |" in card.text
    assert "| ddas |" not in card.text  # a bare model: the options of the run that trained it are unknown
    options = run_card.training_hyperparameters(method_for_model(model))
    moe = model.base_model
    assert options["method"] == "moe-adapters" and options["ddas"] is False
    # the model's own adapter settings, not MoEAdaptersArguments' defaults
    assert (options["num_experts"], options["top_k"]) == (moe.moe_config.num_experts, moe.moe_config.top_k) == (4, 2)
    assert f"- peft {importlib.metadata.version('peft')}" in card.text and f"- hf-moe-cl {hf_moe_cl.__version__}" \
        in card.text
    for key in ("yu2024boosting", "park2024learning", "gao2025enhanced", "zheng2023preventing"):
        assert f"@{'inproceedings' if key in ('yu2024boosting', 'zheng2023preventing') else 'article'}{{{key}," \
            in card.text


def test_push_works_with_hfapi_replaced_by_a_bare_mock(ddas_run):
    """A `unittest.mock` HfApi answers create_repo with a mock, not a repo id: the asked id is kept (the mock was
    taken for the Hub's answer and refused as a repo id)."""
    from unittest import mock

    model, tasks, result, _ = ddas_run
    with mock.patch.object(publishing, "HfApi") as api:
        publishing.push_to_hub(model, "user/continual-clip", result, tasks=tasks)
    upload = api.return_value.upload_folder.call_args.kwargs
    assert upload["repo_id"] == "user/continual-clip"
    api.return_value.create_repo.assert_called_once_with("user/continual-clip", private=False, exist_ok=True)


def test_the_license_is_the_base_models_when_its_card_names_one(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# a CLIP\n")
    assert run_card.base_license(str(tmp_path)) == "mit"
    method = method_for_model(tiny_clip())
    assert publishing.model_card(method, "me/x", base_model=str(tmp_path)).data.license == "mit"
    assert run_card.base_license(str(tmp_path / "missing")) is None


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
    assert "CLIPModel.from_pretrained('me/finetuned')" in card.text
    assert [(r.dataset_type, r.metric_value) for r in card.data.eval_results] == [("a", 40.0), ("b", 70.0)]
    assert "| oracle: task-aware (true task ids) | 10.0 | 45.0 | 55.0 | -20.0 |" in card.text
    assert "0. **a**" in card.text  # no class names recorded: the task names from the result
    local = publishing.model_card(method, "me/finetuned", result, base_model=str(tmp_path))
    assert local.data.base_model is None and str(tmp_path) in local.text  # a local path is no Hub id


def run_card_usage(card: ModelCard, repo_id: str, folder, image_path) -> list:
    """Execute the card's usage code with the repo id replaced by a local folder; returns its `predictions`."""
    code = card.text.split("```python\n", 1)[1].split("```", 1)[0]
    assert repr(repo_id) in code and '"photo.jpg"' in code
    namespace = {}
    exec(code.replace(repr(repo_id), repr(str(folder))).replace('"photo.jpg"', repr(str(image_path))), namespace)
    return namespace["predictions"]


def test_the_cards_usage_code_runs_against_the_published_folder(proxy_adapter, tmp_path):
    from hf_moe_cl import TaskAgnosticClassifier
    from hf_moe_cl.inference import load_adapter_model

    folder, images = proxy_adapter
    published = tmp_path / "published"
    publishing.push_to_hub(load_adapter_model(str(folder)), "me/clip-cifar10", dry_run_dir=published)
    card = ModelCard.load(published / "README.md")
    images[0].save(tmp_path / "photo.jpg")
    predictions = run_card_usage(card, "me/clip-cifar10", published, tmp_path / "photo.jpg")
    from PIL import Image

    expected = TaskAgnosticClassifier.from_pretrained(str(folder))([Image.open(tmp_path / "photo.jpg")],
                                                                   candidate_labels=["cat", "dog"])
    assert predictions == expected and predictions[0]["task"] in ("cifar10", None)


def test_the_peft_usage_code_of_a_task_aware_card_loads_the_published_adapter(tmp_path, clip_inputs):
    import torch

    from conftest import moe_model

    model = moe_model(init_weights=False).eval()
    tiny_clip().save_pretrained(tmp_path / "base")  # the same seeded weights as the adapter's base
    publishing.push_to_hub(model, "me/moe-clip", dry_run_dir=tmp_path / "out")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    code = card.text.split("```python\n", 1)[1].split("```", 1)[0]
    assert "'me/moe-clip'" in code and "model.set_task(0)" in code
    namespace = {}
    exec(code.replace("'me/moe-clip'", repr(str(tmp_path / "out"))).replace("<base CLIP>",
                                                                            repr(str(tmp_path / "base"))), namespace)
    model.set_task(0)
    with torch.no_grad():
        assert torch.equal(namespace["model"].eval()(**clip_inputs).logits_per_image,
                           model(**clip_inputs).logits_per_image)


INJECTION = '")\nimport os; os.system("echo PWNED")  #'


@pytest.mark.parametrize("option, value, message", [
    ("private", "false", "`private` must be a boolean"), ("token", 123, "token must be a Hugging Face token"),
    ("commit_message", None, "`commit_message` must be"),
])
def test_upload_options_of_another_type_are_refused_in_a_dry_run_too(option, value, message, tmp_path):
    """A dry run rehearses the upload: the string "false" would have made the repo private."""
    with pytest.raises(ValueError, match=message):
        publishing.push_to_hub(method_for_model(tiny_clip()), "me/x", dry_run_dir=tmp_path / "dry", **{option: value})
    assert not (tmp_path / "dry").exists()


@pytest.mark.parametrize("repo_id", ["a/b/c", "me/tâche", INJECTION])
def test_a_repo_id_the_hub_refuses_is_refused_in_a_dry_run_too(repo_id, tmp_path):
    method = method_for_model(tiny_clip())
    with pytest.raises(ValueError, match="(?s)is not a Hub repo id .*give 'name' or 'namespace/name'"):
        publishing.push_to_hub(method, repo_id, dry_run_dir=tmp_path / "dry")
    with pytest.raises(ValueError, match="(?s)The dataset id of .a. .* is not a Hub repo id"):
        publishing.push_to_hub(method, "me/x", dataset_ids={"a": repo_id}, dry_run_dir=tmp_path / "dry")
    assert not (tmp_path / "dry").exists()


def test_names_stay_text_in_the_card_and_code_takes_them_as_literals(tmp_path):
    import ast

    from hf_moe_cl.continual import ContinualTask

    names = ["a\n## heading", "b|c", "**bold**"]
    tasks = [ContinualTask(name=name, train_dataset=None, eval_dataset=None, classnames=["x|y", "z\n# h"],
                           templates=["{}"]) for name in names]
    result = ContinualResult(names, {"oracle": [[60.0, 10.0, 5.0], [40.0, 70.0, 5.0], [30.0, 50.0, 80.0]]})
    method = method_for_model(tiny_clip())
    card = publishing.model_card(method, "me/x.y", result, tasks=tasks)
    lines = card.text.splitlines()
    assert not [line for line in lines if line.startswith("## heading") or line.startswith("# h")]
    assert [line for line in lines if line[:3] in ("0. ", "1. ", "2. ")] == [
        r"0. **a \#\# heading** (2 classes): x\|y, z \# h", r"1. **b\|c** (2 classes): x\|y, z \# h",
        r"2. **\*\*bold\*\*** (2 classes): x\|y, z \# h"]
    tables = "\n".join(line if line.startswith("|") else "" for line in lines).split("\n\n")
    cells = [{len(re.findall(r"(?<!\\)\|", row)) for row in table.strip().splitlines()} for table in tables]
    assert [len(counts) for counts in cells if counts] == [1, 1, 1]  # results, drop per task, hyperparameters
    code = card.text.split("```python\n", 1)[1].split("```", 1)[0]
    loads = [node for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Call) and node.args]
    assert [node.args[0].value for node in loads if isinstance(node.args[0], ast.Constant)] == ["me/x.y"]


def test_the_cards_model_index_reads_back_with_huggingface_hub_tools(tmp_path):
    from huggingface_hub.repocard import metadata_load
    from huggingface_hub.repocard_data import model_index_to_eval_results

    result = ContinualResult(["a", "b"], {"oracle": [[60.0, 10.0], [40.0, 70.0]], "protocol": [[50.0, 5.0],
                                                                                                 [30.0, 65.0]]})
    publishing.push_to_hub(method_for_model(tiny_clip()), "me/x", result, dataset_ids={"a": "me/a"},
                           dry_run_dir=tmp_path / "out")
    name, results = model_index_to_eval_results(metadata_load(tmp_path / "out" / "README.md")["model-index"])
    assert name == "x" and sorted((r.metric_config, r.dataset_type, r.metric_value) for r in results) == [
        ("oracle", "b", 70.0), ("oracle", "me/a", 40.0), ("protocol", "b", 65.0), ("protocol", "me/a", 30.0)]
    assert len(ModelCard.load(tmp_path / "out" / "README.md").data.eval_results) == 4


def test_a_card_without_known_options_has_no_empty_hyperparameter_table():
    from conftest import moe_model

    card = publishing.model_card(moe_model(), "me/x")  # a bare model, no training arguments
    assert "## Training hyperparameters" not in card.text and "| hyperparameter | value |" not in card.text


def test_a_card_of_another_runs_tasks_is_refused(ddas_run, tmp_path):
    """`result`, `tasks` and `dataset_ids` must be this model's tasks: the card would describe another run."""
    from hf_moe_cl.continual.result import ContinualResult

    model, tasks, result, _ = ddas_run
    other = ContinualResult(task_names=["a", "b"], matrices={"oracle": [[50.0, 10.0], [40.0, 60.0]]})
    renamed = [dataclasses.replace(task, name=f"x{i}") for i, task in enumerate(tasks)]
    for kwargs, argument, names in ((dict(result=other), "result", "'a', 'b'"),
                                    (dict(result=result, tasks=renamed), "tasks", "'x0', 'x1'"),
                                    (dict(result=result, dataset_ids={"nosuch": "me/data"}), "dataset_ids",
                                     "'nosuch'")):
        dry = tmp_path / argument
        with pytest.raises(ValueError, match=rf"`{argument}` names task\(s\) \[{names}\] that are not this model's "
                                             r"\(it learned \['first', 'second'\]\)"):
            publishing.push_to_hub(model, "me/run", dry_run_dir=dry, **kwargs)
        assert not dry.exists()
    publishing.push_to_hub(model, "me/run", result, tasks=tasks, dataset_ids={"first": "me/data"},
                           dry_run_dir=tmp_path / "ok")
    # the model's own tasks, in another order, a first part of them, or with other classes: still another run
    recoloured = [tasks[0], dataclasses.replace(tasks[1], classnames=list(reversed(tasks[1].classnames)))]
    for i, wrong in enumerate((tasks[::-1], tasks[:1], recoloured)):
        with pytest.raises(ValueError, match=r"`tasks` \[.*\] are not the last task\(s\) this model learned, in "
                                             r"order and with their class names"):
            publishing.push_to_hub(model, "me/run", result, tasks=wrong, dry_run_dir=tmp_path / f"wrong{i}")
    publishing.push_to_hub(model, "me/run", tasks=tasks[1:], dry_run_dir=tmp_path / "last")  # a continued run's


def test_the_card_gives_each_metric_its_evaluated_cells_allow_as_all_results_does(ddas_run, tmp_path):
    """Upper cells not evaluated: no Transfer or Average, but Last, in the card as in all_results.json."""
    from hf_moe_cl.continual.card import model_card
    from hf_moe_cl.continual.result import ContinualResult

    model, tasks, _, _ = ddas_run
    result = ContinualResult(["first", "second"], {"protocol": [[81.0, None], [70.0, 90.0]]})
    assert result.all_results() == {"headline_matrix": "protocol", "protocol_last": 80.0, "protocol_bwt": -11.0}
    card = str(model_card(model, local_dir=tmp_path, result=result, tasks=tasks))
    assert "Headline, from the `protocol` matrix" in card and "Last 80.0." in card
    assert "| - | - | 80.0 | -11.0 |" in card
