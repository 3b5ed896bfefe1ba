"""What a run leaves in its output folder: the final method folder at the root, all_results.json, task folders
without peft's README template; and the task-agnostic pipeline on a ConDU save."""

import json

import pytest
import torch
from transformers import CLIPModel, pipeline

from hf_moe_cl import TaskAgnosticClassifier
from hf_moe_cl.experiments.experiment import MethodArguments, run_method
from hf_moe_cl.condu import CONFIG_FILE
from hf_moe_cl.continual import ContinualTrainer
from hf_moe_cl.continual.methods import ConDU, ConDUArguments
from hf_moe_cl.continual.result import ContinualResult

from conftest import colour_task, continual_args, noise_images, tiny_clip, trainer_for, tree_bytes


def two_tasks():
    return [colour_task("first", seed=0), colour_task("second", seed=1, offset=3)]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, module_processor):
    """A tiny CLIP and its processor saved together, so that a save names a base model that loads."""
    folder = tmp_path_factory.mktemp("base")
    tiny_clip().save_pretrained(folder)
    module_processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def condu_output(tmp_path_factory, base_dir, module_processor):
    output = tmp_path_factory.mktemp("condu") / "run"
    method = ConDU(CLIPModel.from_pretrained(base_dir), ConDUArguments(condu_top_k=1), rank=4)
    trainer = ContinualTrainer(method=method, args=continual_args(output, max_steps=3, learning_rate=1e-2),
                               processing_class=module_processor)
    result = trainer.train_tasks(two_tasks())
    trainer.save_model()
    trainer.save_metrics("all", result.all_results(), combined=False)
    return output, method, result


def test_the_final_condu_save_sits_at_the_root_with_all_results(condu_output):
    output, method, result = condu_output
    root = {p.name for p in output.iterdir()}
    assert {CONFIG_FILE, "adapter_config.json", "adapter_model.safetensors", "all_results.json"} <= root
    assert not [name for name in root if name.startswith(".")]  # no staging folder left
    for name in (CONFIG_FILE, "adapter_model.safetensors"):  # the same save as the last task's folder
        assert (output / name).read_bytes() == (output / "task-01-second" / name).read_bytes()
    loaded = ConDU.from_pretrained(output)
    assert [loaded.learned_tasks()[t]["name"] for t in range(2)] == ["first", "second"]
    saved = json.loads((output / "all_results.json").read_text())
    assert saved == json.loads(json.dumps(result.all_results()))
    assert sorted(result.matrices) == ["oracle", "per_image"]  # ConDU votes per image: no protocol matrix
    assert saved["headline_matrix"] == "oracle" and saved["per_image_last"] == pytest.approx(
        sum(result.matrices["per_image"][-1]) / 2)
    assert set(saved) == {"headline_matrix"} | {f"{kind}_{metric}" for kind in ("per_image", "oracle")
                                                for metric in ("transfer", "average", "last", "bwt")}
    # ConDU's peft LoRA config writes no peft template; save_model writes the run's card at the root only
    assert [str(p.relative_to(output)) for p in output.rglob("README.md")] == ["README.md"]
    card = (output / "README.md").read_text()
    assert "Provide a quick summary" not in card and "0. **first** (3 classes)" in card and "## Results" in card


def test_all_results_say_which_matrix_and_skip_what_cannot_be_computed():
    result = ContinualResult(["a", "b"], {"oracle": [[60.0, None], [40.0, 70.0]]})
    assert result.all_results() == {"headline_matrix": "oracle", "oracle_last": 55.0, "oracle_bwt": -20.0}


def test_save_metrics_merges_into_all_results(condu_output, module_processor):
    output, method, _ = condu_output
    trainer = ContinualTrainer(method=method, args=continual_args(output), processing_class=module_processor)
    before = json.loads((output / "all_results.json").read_text())
    trainer.save_metrics("extra", {"seconds": 1.5})
    assert json.loads((output / "extra_results.json").read_text()) == {"seconds": 1.5}
    assert json.loads((output / "all_results.json").read_text()) == {**before, "seconds": 1.5}
    (output / "extra_results.json").unlink()
    (output / "all_results.json").write_text(json.dumps(before))


def test_a_peft_lora_task_folder_has_no_readme_template_with_a_local_path(tmp_path, module_processor):
    run_method(MethodArguments(method="lora"), tiny_clip(), module_processor, two_tasks(),
               continual_args(tmp_path, max_steps=1))
    folder = tmp_path / "task-01-second"
    assert (folder / "adapter_config.json").is_file() and not (folder / "README.md").exists()


def test_pipeline_loads_a_condu_save_folder(condu_output):
    output, method, _ = condu_output
    images = list(colour_task("first", seed=0).eval_dataset["image"][:3]) + list(noise_images(2, 4)["image"])
    expected = TaskAgnosticClassifier.from_pretrained(str(output))(images, candidate_labels=["noise", "static"])
    classify = pipeline("task-agnostic-image-classification", model=str(output))
    assert {p.dtype for p in classify.model.parameters()} == {torch.float32}
    out = classify(images, candidate_labels=["noise", "static"], batch_size=2)
    assert [(o["label"], o["task"]) for o in out] == [(o["label"], o["task"]) for o in expected]
    assert [o["score"] for o in out] == pytest.approx([o["score"] for o in expected], abs=1e-5)
    assert {o["task"] for o in out} >= {"first"}


def test_a_condu_card_names_its_hub_base_and_its_usage_code_runs_against_the_folder(condu_output, tmp_path,
                                                                                    monkeypatch):
    import huggingface_hub.constants
    from huggingface_hub import ModelCard

    from hf_moe_cl import publishing
    from test_publishing import run_card_usage

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    output, method, result = condu_output
    published = tmp_path / "published"
    publishing.push_to_hub(method, "me/condu-colours", result, dry_run_dir=published,
                           dataset_ids={"first": "me/first", "second": "me/second"})
    card = ModelCard.load(published / "README.md")
    assert card.data.library_name == "hf-moe-cl" and card.data.datasets == ["me/first", "me/second"]
    assert "| condu_top_k | 1 |" in card.text and "Headline, from the `oracle` matrix" in card.text
    colour_task("first", seed=0).eval_dataset["image"][0].save(tmp_path / "photo.jpg")
    predictions = run_card_usage(card, "me/condu-colours", published, tmp_path / "photo.jpg")
    expected = TaskAgnosticClassifier.from_pretrained(str(output))(
        [colour_task("first", seed=0).eval_dataset["image"][0]], candidate_labels=["cat", "dog"])
    assert [(p["label"], p["task"]) for p in predictions] == [(p["label"], p["task"]) for p in expected]
    # a Hub base model replaces the local one in the published save
    hub = tmp_path / "hub"
    publishing.push_to_hub(method, "me/condu-colours", result, dry_run_dir=hub,
                           base_model="openai/clip-vit-base-patch16")
    assert json.loads((hub / CONFIG_FILE).read_text())["base_model_name_or_path"] == "openai/clip-vit-base-patch16"
    assert json.loads((published / CONFIG_FILE).read_text())["base_model_name_or_path"] == str(base_dir_of(method))
    with pytest.raises(ValueError, match="Hub id of the base model"):
        publishing.push_to_hub(method, "me/x", result, dry_run_dir=tmp_path / "bad", base_model=str(output))


def base_dir_of(method):
    return method.model.name_or_path


@pytest.mark.parametrize("split", ["../../escaped", "../escaped", "a/b", "an absolute path", "", ".hidden", "..",
                                   "a" * 65, 3, None])
def test_save_metrics_refuses_a_split_that_is_not_a_plain_file_name(tmp_path, module_processor, split):
    split = str(tmp_path / "escaped") if split == "an absolute path" else split
    folder = tmp_path / "a" / "b" / "run"
    trainer = trainer_for(folder, module_processor)
    trainer.save_metrics("all", {"accuracy": 50.0})
    saved = tree_bytes(tmp_path)
    with pytest.raises(ValueError, match=r"save_metrics: the split .* names the file <split>_results.json in "
                                         r"output_dir, so it must be a plain file name"):
        trainer.save_metrics(split, {"accuracy": 1.0})
    assert tree_bytes(tmp_path) == saved
