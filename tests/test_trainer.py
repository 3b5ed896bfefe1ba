import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import TrainerCallback

from hf_moe_cl.continual import ContinualTask, ContinualTrainer
from hf_moe_cl.continual.methods import ExpertMergingCallback, MoEAdapters, MoEAdaptersArguments

from conftest import StopAtTask, colour_task, continual_args, moe_model, run, tiny_clip, trainer_for, tree_bytes


def make_args(tmp_path, **overrides):
    return continual_args(tmp_path, **{"max_steps": 6, "per_device_eval_batch_size": 16, **overrides})


def two_tasks():
    return [colour_task("first", seed=0), colour_task("second", seed=1, offset=3, mode="L")]


def test_moe_sequence_freezes_routes_and_saves_each_task(tmp_path, clip_processor):
    tasks = two_tasks()
    model = moe_model()
    trainer = ContinualTrainer(model=model, args=make_args(tmp_path, weight_decay=0.1), processing_class=clip_processor)
    zero_shot_second = trainer.evaluate_task(tasks[1])
    result = trainer.train_tasks(tasks)

    assert result.task_names == ["first", "second"]
    assert len(result.accuracy_matrix) == 2 and all(len(row) == 2 for row in result.accuracy_matrix)
    assert result.accuracy_matrix[0][1] == zero_shot_second  # unseen task through the untouched CLIP
    assert set(result.metrics) == {"transfer", "average", "last"}
    frozen = model.base_model.frozen_experts()
    assert {t for layer in frozen.values() for t in layer.values()} == {0, 1}
    assert model.base_model.frozen_routers() == [0, 1]

    first = tmp_path / "task-00-first"
    progress = json.loads((first / "continual_progress.json").read_text())
    assert progress["finished_task"] == 0 and len(progress["matrices"]["oracle"]) == 1
    after_first = load_file(first / "adapter_model.safetensors")
    final = model.state_dict()
    checked = 0
    for layer, experts in frozen.items():
        for expert, task in experts.items():
            if task != 0:
                continue
            for tensor in ("moe_lora_A", "moe_lora_B", "moe_lora_bias_A", "moe_lora_bias_B"):
                saved = after_first[f"base_model.model.{layer}.{tensor}"][expert]
                assert torch.equal(final[f"base_model.model.{layer}.{tensor}.default"][expert], saved)
                checked += 1
    assert checked > 0




def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path, clip_processor):
    tasks = two_tasks()
    straight_model = moe_model()
    straight = ContinualTrainer(model=straight_model, args=make_args(tmp_path / "a"), processing_class=clip_processor)
    expected = straight.train_tasks(tasks)

    interrupted = ContinualTrainer(model=moe_model(), args=make_args(tmp_path / "b"), processing_class=clip_processor)
    interrupted.add_callback(StopAtTask(interrupted, "second"))
    with pytest.raises(KeyboardInterrupt):
        interrupted.train_tasks(tasks)
    assert not (tmp_path / "b" / "task-01-second").exists()

    resumed_model = moe_model()
    resumed = ContinualTrainer(model=resumed_model, args=make_args(tmp_path / "b"), processing_class=clip_processor)
    result = resumed.train_tasks(tasks, resume=True)
    assert result.accuracy_matrix == expected.accuracy_matrix
    a, b = straight_model.state_dict(), resumed_model.state_dict()
    for key in a:
        if ".moe_lora_" in key:
            assert torch.equal(a[key], b[key]), key
    assert resumed_model.base_model.frozen_experts() == straight_model.base_model.frozen_experts()


def test_resume_refuses_another_task_sequence(tmp_path, clip_processor):
    tasks = two_tasks()
    args = make_args(tmp_path, max_steps=1)
    ContinualTrainer(model=moe_model(), args=args, processing_class=clip_processor).train_tasks(tasks[:1])
    with pytest.raises(ValueError, match="Cannot resume"):
        ContinualTrainer(model=moe_model(), args=args, processing_class=clip_processor).train_tasks(
            [tasks[0], colour_task("third")], resume=True
        )


def test_expert_merging_callback_merges_during_training(tmp_path, clip_processor):
    method = MoEAdapters(moe_model(num_experts=5), MoEAdaptersArguments(merge_experts_every=2))
    trainer = ContinualTrainer(method=method, args=make_args(tmp_path), processing_class=clip_processor)
    trainer.train_tasks(two_tasks()[:1])
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, ExpertMergingCallback))
    assert callback.merges == 3


@pytest.mark.parametrize("method", ["lora", "full"])
def test_baselines_run_in_the_same_harness(tmp_path, clip_processor, method):
    model = tiny_clip()
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = ContinualTrainer(model=model, args=make_args(tmp_path), processing_class=clip_processor)
    result = trainer.train_tasks(two_tasks())
    assert len(result.accuracy_matrix) == 2
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert (tmp_path / "task-01-second").is_dir()


def test_new_tasks_get_routers_automatically(tmp_path, clip_processor):
    model = moe_model(num_tasks=1)
    ContinualTrainer(model=model, args=make_args(tmp_path, max_steps=1), processing_class=clip_processor).train_tasks(
        two_tasks()
    )
    assert model.base_model.num_tasks == 2


def test_bad_tasks_fail_before_any_training(tmp_path, clip_processor):
    broken = colour_task("broken")
    broken.classnames = broken.classnames[:2]  # labels go up to 2
    model = moe_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = ContinualTrainer(model=model, args=make_args(tmp_path), processing_class=clip_processor)
    with pytest.raises(ValueError, match="labels range from 0 to 2 but there are 2 class names"):
        trainer.train_tasks([colour_task("fine"), broken])
    assert not any(tmp_path.glob("task-*"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="CLIPProcessor"):
        ContinualTrainer(model=model, args=make_args(tmp_path))
    with pytest.raises(ValueError, match="unique"):
        trainer.train_tasks([colour_task("same"), colour_task("same")])


def test_shared_router_mode_is_the_class_incremental_setting(tmp_path, clip_processor):
    model = moe_model(num_tasks=1)
    method = MoEAdapters(model, MoEAdaptersArguments(shared_router=True))
    args = make_args(tmp_path, evaluate_all_tasks=False)
    result = ContinualTrainer(method=method, args=args, processing_class=clip_processor).train_tasks(two_tasks())
    assert model.base_model.num_tasks == 1
    assert all(not experts for experts in model.base_model.frozen_experts().values())
    assert result.accuracy_matrix[0][1] is None and result.accuracy_matrix[1][0] is None
    counts = model.base_model.selection_counts()["vision_model.encoder.layers.0"]
    assert counts[0].sum() == 2 * 6 * 8 * 2  # two tasks x 6 steps x batch 8 x top-2, all through router 0


def test_continuing_a_saved_model_adds_routers_and_keeps_learned_tasks_bit_identical(tmp_path, clip_processor,
                                                                                      clip_inputs):
    from peft import PeftModel

    model = moe_model()
    ContinualTrainer(model=model, args=make_args(tmp_path / "a"), processing_class=clip_processor).train_tasks(
        two_tasks())
    model.save_pretrained(tmp_path / "published")
    loaded = PeftModel.from_pretrained(tiny_clip(), tmp_path / "published", is_trainable=True)

    def outputs(peft_model):
        peft_model.eval()
        with torch.no_grad():
            return {t: peft_model(**clip_inputs, task_ids=torch.full((4,), t)).logits_per_image for t in (0, 1)}

    before = outputs(loaded)
    third = colour_task("third", seed=2, offset=1)
    trainer = ContinualTrainer(model=loaded, args=make_args(tmp_path / "b"), processing_class=clip_processor)
    result = trainer.train_tasks([third])
    moe = loaded.base_model
    assert len(result.accuracy_matrix) == 1 and moe.num_tasks == 3
    assert trainer.method.task_seed(5, 0) == 5 + 2  # the third task's seed, as in one run of the three
    trainer.save_model(str(tmp_path / "republished"))  # the card describes the model, not only the last run
    card = (tmp_path / "republished" / "README.md").read_text()
    assert "trained on 3 tasks" in card and all(f"**{name}**" in card for name in ("first", "second", "third"))
    assert [info["name"] for info in moe.task_info] == ["first", "second", "third"]
    assert moe.frozen_routers() == [0, 1, 2]
    after = outputs(loaded)
    assert all(torch.equal(before[t], after[t]) for t in (0, 1))  # learned tasks untouched
    with pytest.raises(ValueError, match=r"already learned \['first'\] \(routers \[0\]"):
        ContinualTrainer(model=loaded, args=make_args(tmp_path / "c"),
                         processing_class=clip_processor).train_tasks([colour_task("first")])
    method = MoEAdapters(loaded, MoEAdaptersArguments(relearn_tasks=True))
    ContinualTrainer(method=method, args=make_args(tmp_path / "d"), processing_class=clip_processor).train_tasks(
        [colour_task("first")])
    assert [info["name"] for info in moe.task_info] == ["first", "second", "third", "first"]
    assert all(torch.equal(before[t], outputs(loaded)[t]) for t in (0, 1))


def test_an_adapter_loaded_for_inference_is_refused_before_it_is_changed(tmp_path, clip_processor):
    from peft import PeftModel

    moe_model().save_pretrained(tmp_path / "published")
    loaded = PeftModel.from_pretrained(tiny_clip(), tmp_path / "published")  # is_trainable=False, peft's default
    with pytest.raises(ValueError, match=r"loaded for inference .* PeftModel.from_pretrained\(base, path, "
                                         r"is_trainable=True\) to teach it more tasks"):
        ContinualTrainer(model=loaded, args=make_args(tmp_path / "more"),
                         processing_class=clip_processor).train_tasks([colour_task("third")])
    assert loaded.base_model.num_tasks == 2 and not list((tmp_path / "more").glob("task-*"))


def test_train_and_evaluate_outside_a_task_sequence_point_to_train_tasks(tmp_path, clip_processor):
    trainer = ContinualTrainer(model=moe_model(), args=make_args(tmp_path), processing_class=clip_processor)
    with pytest.raises(ValueError, match=r"call trainer.train_tasks\(\[ContinualTask"):
        trainer.train()
    with pytest.raises(ValueError, match="measures the task being trained inside train_tasks"):
        trainer.evaluate()


def test_evaluate_task_refuses_a_bad_task_or_route_before_any_image_is_encoded(tmp_path, clip_processor):
    from datasets import Dataset

    trainer = ContinualTrainer(model=moe_model(), args=make_args(tmp_path), processing_class=clip_processor)
    split = colour_task("a").eval_dataset
    cases = [
        (split.select([]), -1, "has an empty eval dataset"),
        (Dataset.from_dict({"image": split["image"][:2], "label": [7, -1]}), -1, "eval labels range from -1 to 7"),
        (split.remove_columns("label"), -1, r"lacks column\(s\) \['label'\]"),
        (split, -2, "`route` must be an integer, -1 .* got -2"),
        (split, 1.9, "`route` must be an integer, -1 .* got 1.9"),
        (split, True, "`route` must be an integer, -1 .* got True"),
    ]
    for dataset, route, message in cases:
        with pytest.raises(ValueError, match=message):
            trainer.evaluate_task(ContinualTask("t", None, dataset, ["red", "green", "blue"]), route)
    assert trainer.engine.encodings == {"untouched": 0, "routed": 0}
    task = ContinualTask("t", None, split, ["red", "green", "blue"])
    assert trainer.evaluate_task(task, torch.tensor(1)) == trainer.evaluate_task(task, 1)  # an integer of any type
    assert trainer.engine.encodings["routed"] == 2 * 12


class EvaluateOtherSplit(TrainerCallback):
    def __init__(self, trainer, dataset):
        self.trainer, self.dataset, self.errors = trainer, dataset, []

    def on_step_end(self, args, state, control, **kwargs):
        try:
            self.trainer.evaluate(eval_dataset=self.dataset)
        except ValueError as error:
            self.errors.append(str(error))


def test_evaluate_with_another_split_checks_it_as_a_task_split(tmp_path, clip_processor):
    from datasets import Dataset

    trainer = ContinualTrainer(model=moe_model(), args=make_args(tmp_path, max_steps=1),
                               processing_class=clip_processor)
    split = colour_task("first").eval_dataset
    callback = EvaluateOtherSplit(trainer, Dataset.from_dict({"image": split["image"][:2], "label": [0, 3]}))
    trainer.add_callback(callback)
    trainer.train_tasks([colour_task("first")])
    assert len(callback.errors) == 1
    assert "eval labels range from 0 to 3 but there are 3 class names" in callback.errors[0]


def test_a_split_whose_images_this_trainer_checked_is_not_decoded_again_for_a_check(tmp_path, clip_processor,
                                                                                    monkeypatch):
    import numpy as np
    from PIL import Image

    from hf_moe_cl.continual import preprocessing, tasks as tasks_module

    decodes = {"check": 0, "read": 0}  # images decoded by check_image_column, and read to be evaluated

    def spy(kind, decode):
        def counted(image):
            decodes[kind] += 1
            return decode(image)
        return counted

    monkeypatch.setattr(tasks_module, "to_rgb", spy("check", tasks_module.to_rgb))
    monkeypatch.setattr(preprocessing, "to_rgb", spy("read", preprocessing.to_rgb))
    first, second = two_tasks()
    trainer = ContinualTrainer(model=moe_model(), args=make_args(tmp_path, max_steps=2),
                               processing_class=clip_processor)
    callback = EvaluateOtherSplit(trainer, colour_task("other", seed=2).eval_dataset)  # evaluate() at both steps
    trainer.add_callback(callback)
    trainer.train_tasks([first])
    assert not callback.errors and decodes["check"] == 24 + 12 + 12  # first's splits, the other split once
    decodes.update(check=0, read=0)
    trainer.evaluate_task(first, 0), trainer.evaluate_task(first, -1)  # an accuracy matrix by hand after the run
    assert decodes == {"check": 0, "read": 0}  # checked by train_tasks, read from the evaluation cache
    trainer.evaluate_task(second), trainer.evaluate_task(second, 0)
    assert decodes == {"check": 12, "read": 12}  # each test image checked once and read once, over both calls
    # a changed split is another fingerprint: checked again, its damaged image named
    nan = Image.fromarray(np.full((8, 8), np.nan, dtype=np.float32), mode="F")
    damaged = second.eval_dataset.map(lambda row, i: {"image": nan if i == 3 else row["image"]}, with_indices=True)
    with pytest.raises(ValueError, match=r"eval split: 1 image\(s\) cannot be decoded, the first at index 3"):
        trainer.evaluate_task(ContinualTask("second", None, damaged, second.classnames, second.templates))
    assert decodes["check"] == 12 + 12


class EvaluateDuringTask(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.seen, self.logged_steps, self.logged_keys = trainer, [], [], set()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            self.seen.append((self.trainer.current_task.name, self.trainer.evaluate()["eval_accuracy"]))

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logged_steps.append(state.global_step)
        self.logged_keys |= set(logs or {})


def test_evaluate_inside_a_task_measures_that_task_and_steps_keep_increasing(tmp_path, clip_processor, caplog):
    caplog.set_level("INFO", logger="hf_moe_cl")
    trainer = ContinualTrainer(model=moe_model(), args=make_args(tmp_path, logging_strategy="steps", logging_steps=2),
                               processing_class=clip_processor)
    callback = EvaluateDuringTask(trainer)
    trainer.add_callback(callback)
    trainer.train_tasks(two_tasks())
    assert [name for name, _ in callback.seen] == ["first", "second"]
    assert all(0.0 <= accuracy <= 100.0 for _, accuracy in callback.seen)
    steps = callback.logged_steps  # what trackers see: one axis over both tasks of 6 steps
    assert steps == sorted(steps) and steps[0] == 2 and max(steps) == 12 and 8 in steps
    # every accuracy logged names its matrix
    assert {"oracle_accuracy/first", "oracle_accuracy/second"} <= callback.logged_keys
    assert not any(key.startswith("accuracy/") for key in callback.logged_keys)
    rows = [record.getMessage() for record in caplog.records if " matrix, " in record.getMessage()]
    assert len(rows) == 2 and all("oracle matrix, task-aware (true task ids): first " in row for row in rows)


class CaptureTaskOutputs(TrainerCallback):
    """After the first task: its training images' embeddings and its prompts' embeddings through its router."""

    def __init__(self, trainer, task):
        self.trainer, self.task, self.captured = trainer, task, None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer.current_task.name != self.task.name and self.captured is None:
            self.captured = task_outputs(self.trainer.method, self.task, self.trainer.processing_class)


def task_outputs(method, task, processor):
    from hf_moe_cl.classification import image_embeddings, text_embeddings

    pixels = processor.image_processor(images=[image.convert("RGB") for image in task.train_dataset["image"]],
                                       return_tensors="pt")["pixel_values"]
    method.model.eval()
    with method.acting_as(0):
        return (image_embeddings(method.model, pixels),
                text_embeddings(method.model, processor.tokenizer, task.classnames, task.templates, "cpu"))


@pytest.mark.parametrize("policy", ["coverage", "top_k"])
def test_full_coverage_freezing_makes_a_learned_tasks_predictions_final(tmp_path, clip_processor, policy):
    tasks = [colour_task("first", seed=0), colour_task("second", seed=1, offset=2),
             colour_task("third", seed=2, offset=4)]
    method = MoEAdapters(moe_model(num_tasks=3, num_experts=6),
                         MoEAdaptersArguments(freeze_policy=policy, routing_report_images=24))
    trainer = ContinualTrainer(method=method, args=make_args(tmp_path, learning_rate=2e-2, train_augmentation="none"),
                               processing_class=clip_processor)
    capture = CaptureTaskOutputs(trainer, tasks[0])
    trainer.add_callback(capture)
    result = trainer.train_tasks(tasks)
    images, texts = task_outputs(method, tasks[0], clip_processor)
    report = result.diagnostics["routing_report"]
    assert len(report) == 3 and list(report[-1]) == ["first", "second", "third"]
    first_after_all = report[-1]["first"]
    trainable = result.diagnostics["trainable_experts"]
    assert len(trainable) == 3 and set(trainable[-1]) == {"vision", "text"}
    assert all(0.0 <= share <= 1.0 for stage in trainable for share in stage.values())
    assert all(after[t] <= before[t] for before, after in zip(trainable, trainable[1:]) for t in after)
    if policy == "top_k":  # 6 experts per layer, the first task freezes its 2 most selected in each
        assert trainable[0] == pytest.approx({"vision": 4 / 6, "text": 4 / 6})
    if policy == "coverage":
        assert torch.equal(images, capture.captured[0]) and torch.equal(texts, capture.captured[1])
        assert first_after_all["vision"]["trainable"] == 0.0 and first_after_all["text"]["trainable"] == 0.0
    else:  # the paper's rule leaves some of the task's evaluation-time experts trainable, and later tasks move them
        assert first_after_all["vision"]["trainable"] + first_after_all["text"]["trainable"] > 0.0
        assert not (torch.equal(images, capture.captured[0]) and torch.equal(texts, capture.captured[1]))


CONTINUE_IN_A_FRESH_PROCESS = """
import json, sys, tempfile
from pathlib import Path
import torch
sys.path.insert(0, {tests!r})
import hf_moe_cl
from peft import PeftModel
from conftest import colour_task, tiny_clip, tiny_clip_processor, write_tiny_tokenizer
from hf_moe_cl import ContinualTrainer, ContinualTrainingArguments
from hf_moe_cl.publishing import push_to_hub
processor = tiny_clip_processor(write_tiny_tokenizer(Path(tempfile.mkdtemp())))
model = PeftModel.from_pretrained(tiny_clip(), {published!r}, is_trainable=True)
args = ContinualTrainingArguments(output_dir={out!r}, max_steps=4, warmup_steps=1, learning_rate=5e-3, use_cpu=True,
                                  per_device_train_batch_size=8, report_to="none", disable_tqdm=True,
                                  logging_strategy="no", seed=3)
trainer = ContinualTrainer(model=model, args=args, processing_class=processor)
result = trainer.train_tasks([colour_task("third", seed=2, offset=1)])
inputs = torch.load({inputs!r})
model.eval()
with torch.no_grad():
    outputs = {{t: model(**inputs, task_ids=torch.full((4,), t)).logits_per_image.tolist() for t in (0, 1)}}
push_to_hub(trainer.method, "someone/moe-clip", result, dry_run_dir={card!r})
print(json.dumps(outputs))
"""


def test_a_published_model_learns_one_more_task_in_a_fresh_process(tmp_path, clip_processor, clip_inputs):
    """Train two tasks, save, reload in a new process, add a third: the first two answer exactly as before and the
    new model card lists the three tasks."""
    import subprocess
    import sys

    model = moe_model()
    ContinualTrainer(model=model, args=make_args(tmp_path / "run"), processing_class=clip_processor).train_tasks(
        two_tasks())
    model.save_pretrained(tmp_path / "published")
    model.eval()
    with torch.no_grad():
        before = {t: model(**clip_inputs, task_ids=torch.full((4,), t)).logits_per_image for t in (0, 1)}
    torch.save(clip_inputs, tmp_path / "inputs.pt")
    script = CONTINUE_IN_A_FRESH_PROCESS.format(
        tests=str(Path(__file__).parent), published=str(tmp_path / "published"), out=str(tmp_path / "more"),
        inputs=str(tmp_path / "inputs.pt"), card=str(tmp_path / "card"))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    after = json.loads(run.stdout.strip().splitlines()[-1])
    for t in (0, 1):
        assert torch.equal(torch.tensor(after[str(t)]), before[t]), t
    card = (tmp_path / "card" / "README.md").read_text()
    assert all(name in card for name in ("first", "second", "third"))
    saved = json.loads((tmp_path / "card" / "adapter_config.json").read_text())
    assert [info["name"] for info in saved["task_info"]] == ["first", "second", "third"]


def test_save_model_and_save_pretrained_write_the_cards_of_the_trained_run(tmp_path, clip_processor, monkeypatch):
    """`save_model` after `train_tasks`: the full card (tasks, results with a model-index, base model,
    hyperparameters, versions, loading code for the folder); the adapter's `save_pretrained`: its tasks and base."""
    import importlib.metadata

    import huggingface_hub.constants
    from huggingface_hub import ModelCard

    from hf_moe_cl.experiments.metrics import mtil_metrics

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no lookup of the base model's card
    model = moe_model()
    model.base_model.model.name_or_path = "openai/clip-vit-base-patch16"  # the card names a Hub base model
    trainer = ContinualTrainer(model=model, args=make_args(tmp_path / "run", learning_rate=0.0125),
                               processing_class=clip_processor)
    result = trainer.train_tasks(two_tasks())
    trainer.save_model()
    card = ModelCard.load(tmp_path / "run" / "README.md")
    assert "0. **first** (3 classes): red, green, blue" in card.text and "1. **second** (3 classes)" in card.text
    found = {(r.metric_config, r.dataset_name): r.metric_value for r in card.data.eval_results}
    assert found == {("oracle", name): round(value, 2) for name, value in zip(("first", "second"),
                                                                            result.matrices["oracle"][-1])}
    headline = mtil_metrics(result.matrices["oracle"])
    assert f"Last {headline['last']:.1f}." in card.text and "| oracle: task-aware (true task ids) |" in card.text
    assert card.data.base_model == "openai/clip-vit-base-patch16" and "| learning_rate | 0.0125 |" in card.text
    assert f"- peft {importlib.metadata.version('peft')}" in card.text and "<base CLIP>" not in card.text
    assert f"PeftModel.from_pretrained(CLIPModel.from_pretrained('openai/clip-vit-base-patch16'), " \
           f"{str(tmp_path / 'run')!r})" in card.text
    model.save_pretrained(tmp_path / "adapter")
    adapter_card = (tmp_path / "adapter" / "README.md").read_text()
    assert "0. **first** (3 classes): red, green, blue" in adapter_card and "Base model: openai/clip-vit-base-patch16" \
        in adapter_card


# ----- refused before any training -----------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda task: [], lambda task: (), lambda task: None, lambda task: "first", lambda task: task,
    lambda task: ["first"], lambda task: [task.train_dataset], lambda task: (t for t in [task]),
], ids=["empty list", "empty tuple", "None", "a string", "one task", "a name", "a dataset", "a generator"])
def test_train_tasks_refuses_anything_but_a_non_empty_list_of_tasks(tmp_path, module_processor, make):
    folder = tmp_path / "run"
    trainer = trainer_for(folder, module_processor)
    with pytest.raises(ValueError, match=r"(?s)^train_tasks needs a non-empty list of ContinualTask \(one per task, in "
                                         r"training order\), got .*\.$"):
        trainer.train_tasks(make(colour_task("first", n_train=16, n_eval=6)))
    assert tree_bytes(folder) == {}  # no lock, no checkpoint


def test_a_nan_base_weight_is_named_before_training(tmp_path, clip_processor):
    model = moe_model()
    with torch.no_grad():
        model.base_model.model.vision_model.post_layernorm.weight[3] = math.nan
    with pytest.raises(ValueError, match="vision_model.post_layernorm.weight holds NaN or infinite values before any "
                                         "training: the base model .* is damaged"):
        run(tmp_path, clip_processor, model=model)
    assert not any(tmp_path.glob("task-*"))


def test_a_train_template_beyond_a_tasks_templates_is_refused_not_clamped(tmp_path, clip_processor):
    with pytest.raises(ValueError, match=r"train_template=2 but task 'first' has 2 prompt template\(s\)"):
        run(tmp_path, clip_processor, train_template=2)
    assert not any(tmp_path.glob("task-*"))


def test_gradient_accumulation_gives_the_update_and_loss_of_one_batch_of_the_same_size(tmp_path, clip_processor):
    """One SGD step at rate 1 without noise, dropout or augmentation: two accumulated batches of 4 move the weights
    as one batch of 8 and log its loss (the Trainer divided nothing before, so both were doubled)."""
    def one_step(name, **overrides):
        model = moe_model(noisy_gating=False, expert_dropout=0.0)
        start = {k: v.clone() for k, v in model.state_dict().items() if "moe_lora_" in k and v.is_floating_point()}
        args = continual_args(tmp_path / name, max_steps=1, warmup_steps=0, lr_scheduler_type="constant", optim="sgd",
                              learning_rate=1.0, train_augmentation="none", label_smoothing_factor=0.0,
                              logging_strategy="steps", logging_steps=1, **overrides)
        trainer = ContinualTrainer(model=model, args=args, processing_class=clip_processor)
        trainer.train_tasks([colour_task("first", n_train=8, n_eval=6, seed=0)])
        end = model.state_dict()
        update = torch.cat([(end[k] - v).flatten() for k, v in start.items()])
        return update, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    whole, whole_loss = one_step("whole", per_device_train_batch_size=8)
    halves, halves_loss = one_step("halves", per_device_train_batch_size=4, gradient_accumulation_steps=2)
    assert float(whole.norm()) > 0
    assert torch.allclose(halves, whole, atol=1e-6) and halves_loss == pytest.approx(whole_loss, rel=1e-6)
