import json
import math
import shutil
import types

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from PIL import Image

import hf_moe_cl.hub as hub
from hf_moe_cl import MoELoraConfig
from hf_moe_cl.classifier import TaskAgnosticClassifier
from hf_moe_cl.ddas import SELECTOR_CONFIG, SELECTOR_WEIGHTS, DistributionSelector, clip_image_features
from hf_moe_cl.trainer import ContinualTrainer, ContinualTrainingArguments

from conftest import colour_task, tiny_clip, tiny_clip_processor, write_tiny_tokenizer


def cluster(centre, n, seed, spread=0.3):
    generator = torch.Generator().manual_seed(seed)
    return torch.tensor(centre, dtype=torch.float32) + spread * torch.randn(n, len(centre), generator=generator)


CENTRES = {"reference": [0.0] * 8, "a": [4.0] + [0.0] * 7, "b": [0.0, -4.0] + [0.0] * 6}


@pytest.fixture
def fitted_selector():
    selector = DistributionSelector(feature_dim=8, num_tasks=2, hidden_dim=6)
    selector.fit_reference(cluster(CENTRES["reference"], 1000, 0, spread=2.0), steps=400, lr=1e-2)
    selector.fit_task(0, cluster(CENTRES["a"], 1000, 1), steps=400, lr=1e-2)
    selector.fit_task(1, cluster(CENTRES["b"], 1000, 2), steps=400, lr=1e-2)
    return selector


def test_selector_routes_each_image_of_a_mixed_batch(fitted_selector):
    batch = torch.cat([cluster(CENTRES["a"], 50, 10), cluster(CENTRES["b"], 50, 11),
                       cluster([0.0] * 7 + [30.0], 50, 12)])
    chosen = fitted_selector.select(batch)
    assert (chosen[:50] == 0).float().mean() >= 0.85  # thresholds keep ~95 % of in-task images
    assert (chosen[50:100] == 1).float().mean() >= 0.85
    assert (chosen[100:] == -1).float().mean() >= 0.9  # far from every task: zero-shot
    errors = fitted_selector.reconstruction_errors(batch)
    assert errors.shape == (150, 3) and torch.isfinite(errors).all()


def test_fitting_is_reproducible():
    def fit():
        selector = DistributionSelector(feature_dim=8, num_tasks=1, hidden_dim=6)
        selector.fit_reference(cluster(CENTRES["reference"], 200, 0, spread=2.0), steps=50, lr=1e-2)
        selector.fit_task(0, cluster(CENTRES["a"], 200, 1), steps=50, lr=1e-2)
        return selector.state_dict()

    first, second = fit(), fit()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_untrained_tasks_are_never_chosen_and_fixed_thresholds_apply():
    selector = DistributionSelector(feature_dim=8, num_tasks=3, hidden_dim=6)
    selector.fit_reference(cluster(CENTRES["reference"], 200, 0, spread=2.0), steps=200, lr=1e-2)
    selector.fit_task(0, cluster(CENTRES["a"], 200, 1), steps=200, lr=1e-2, threshold=0.0)
    assert selector.thresholds[0] == 0.0 and math.isinf(selector.thresholds[2])
    assert (selector.select(cluster(CENTRES["a"], 20, 3)) == -1).all()  # threshold 0: nothing fits
    with pytest.raises(ValueError, match="out of range"):
        selector.fit_task(3, cluster(CENTRES["a"], 10, 1))
    with pytest.raises(ValueError, match="reference autoencoder first"):
        DistributionSelector(8, 1).fit_task(0, cluster(CENTRES["a"], 10, 1))
    with pytest.raises(ValueError, match="zero images"):
        selector.fit_task(1, torch.zeros(0, 8), threshold=1.0)


def noise_images(n, seed):
    rng = np.random.default_rng(seed)
    return Dataset.from_dict({"image": [Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8))
                                        for _ in range(n)]})


@pytest.fixture(scope="module")
def module_processor(tmp_path_factory):
    return tiny_clip_processor(write_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="module")
def ddas_run(tmp_path_factory, module_processor):
    """One DDAS-enabled continual run shared by the tests below (they only read it or save copies)."""
    tmp_path = tmp_path_factory.mktemp("ddas")
    clip_processor = module_processor
    tasks = [colour_task("first", n_train=40, n_eval=12, seed=0),
             colour_task("second", n_train=40, n_eval=12, seed=1, offset=3)]
    model = get_peft_model(tiny_clip(), MoELoraConfig(num_tasks=2, num_experts=4, r=4))
    args = ContinualTrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=3, warmup_steps=1, learning_rate=5e-3, use_cpu=True,
        per_device_train_batch_size=8, per_device_eval_batch_size=32, report_to="none", disable_tqdm=True,
        logging_strategy="no", ddas=True, ddas_task_steps=300, ddas_reference_steps=300, ddas_learning_rate=1e-2,
        ddas_hidden_dim=16, ddas_quantile=1.0, task_agnostic_eval=True,
    )
    trainer = ContinualTrainer(model=model, args=args, processing_class=clip_processor,
                               ddas_reference=noise_images(60, 0))
    result = trainer.train_tasks(tasks)
    return model, tasks, result, tmp_path


def test_trainer_fits_ddas_and_fills_the_task_agnostic_matrix(ddas_run):
    model, tasks, result, _ = ddas_run
    selector = model.base_model.selector
    assert selector is not None and selector.trained.tolist() == [True, True, True]
    assert len(result.task_agnostic_matrix) == 2 and all(len(r) == 2 for r in result.task_agnostic_matrix)
    first, second = result.task_selection[-1]
    assert sum(first) == 12 and sum(second) == 12
    assert first[1] >= 10 and second[2] >= 10  # [zero-shot, task 0, task 1]: each task's images to its router
    config = model.base_model.peft_config["default"]
    assert [t["name"] for t in config.task_info] == ["first", "second"]


def test_noise_images_no_task_has_seen_go_to_zero_shot(ddas_run, module_processor):
    clip_processor = module_processor
    model, _, _, _ = ddas_run
    pixels = clip_processor.image_processor(images=list(noise_images(20, 7)["image"]),
                                            return_tensors="pt")["pixel_values"]
    chosen = model.base_model.selector.select(clip_image_features(model, pixels))
    assert (chosen == -1).float().mean() >= 0.8


def test_classifier_routes_a_mixed_batch_and_survives_save_and_load(ddas_run, module_processor):
    clip_processor = module_processor
    model, tasks, _, tmp_path = ddas_run
    images = list(tasks[0].eval_dataset["image"][:4]) + list(tasks[1].eval_dataset["image"][:4]) \
        + list(noise_images(4, 9)["image"])
    classifier = TaskAgnosticClassifier(model, clip_processor)
    out = classifier(images, candidate_labels=["noise", "static"])
    assert [o["task"] for o in out[:4]].count("first") >= 3 and [o["task"] for o in out[4:8]].count("second") >= 3
    assert all(o["label"] in (tasks[0].classnames + tasks[1].classnames + ["noise", "static"]) for o in out)
    if any(o["task"] is None for o in out):
        with pytest.raises(ValueError, match="candidate_labels"):
            classifier(images)

    folder = tmp_path / "published"
    model.save_pretrained(folder)
    assert (folder / SELECTOR_CONFIG).is_file() and (folder / SELECTOR_WEIGHTS).is_file()
    from safetensors.torch import load_file

    assert not any("ddas" in key for key in load_file(folder / "adapter_model.safetensors"))
    loaded = PeftModel.from_pretrained(tiny_clip(), folder).eval()
    assert loaded.base_model.selector is not None
    assert TaskAgnosticClassifier(loaded, clip_processor)(images, candidate_labels=["noise", "static"]) == out


def test_folder_without_selector_loads_for_task_aware_use(tmp_path, clip_inputs):
    model = get_peft_model(tiny_clip(), MoELoraConfig(num_tasks=2, num_experts=4, r=4))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_clip(), tmp_path)
    assert loaded.base_model.selector is None
    with pytest.raises(ValueError, match="DDAS selector"):
        TaskAgnosticClassifier(loaded, None)


def test_truncated_selector_and_task_count_mismatch_are_clear_errors(ddas_run):
    model, _, _, tmp_path = ddas_run
    folder = tmp_path / "bad"
    model.save_pretrained(folder)
    weights = folder / SELECTOR_WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[:-10])
    with pytest.raises(ValueError, match="truncated"):
        PeftModel.from_pretrained(tiny_clip(), folder)
    weights.write_bytes(data)
    config = json.loads((folder / SELECTOR_CONFIG).read_text())
    config["num_tasks"] = 3
    (folder / SELECTOR_CONFIG).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="3 task autoencoders but the adapter has 2 task routers"):
        PeftModel.from_pretrained(tiny_clip(), folder)
    with pytest.raises(ValueError, match="build it with num_tasks=2"):
        model.base_model.attach_selector(DistributionSelector(8, 5))


def test_ddas_without_reference_images_fails_before_training(tmp_path, clip_processor):
    model = get_peft_model(tiny_clip(), MoELoraConfig(num_tasks=1, num_experts=4, r=4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = ContinualTrainingArguments(output_dir=str(tmp_path), max_steps=2, use_cpu=True, report_to="none",
                                      ddas=True)
    with pytest.raises(ValueError, match="ddas_reference"):
        ContinualTrainer(model=model, args=args, processing_class=clip_processor).train_tasks([colour_task("t")])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_push_to_hub_uploads_adapter_selector_and_a_model_card(ddas_run, monkeypatch):
    model, _, result, tmp_path = ddas_run
    uploaded = tmp_path / "uploaded"

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            return types.SimpleNamespace(repo_id=repo_id)

        def upload_folder(self, folder_path, repo_id, commit_message):
            shutil.copytree(folder_path, uploaded)
            return f"https://hub/{repo_id}/commit/1"

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    url = hub.push_to_hub(model, "me/continual-clip", metrics={"transfer": 12.5})
    assert url.endswith("commit/1")
    files = {p.name for p in uploaded.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", SELECTOR_CONFIG, SELECTOR_WEIGHTS,
            "README.md"} <= files
    card = (uploaded / "README.md").read_text()
    assert "**first** (3 classes): red, green, blue" in card and "| transfer | 12.50 |" in card
