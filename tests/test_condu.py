import json
import logging
import math

import pytest
import torch
from peft import PeftModel, get_peft_model

from hf_moe_cl import MoELoraConfig, TaskAgnosticClassifier
from hf_moe_cl.classification import image_embeddings
from hf_moe_cl.condu import (
    CONFIG_FILE,
    TRIGGERS_FILE,
    DeltaStore,
    applied_delta,
    decouple,
    load_folder,
    model_fingerprint,
    pack_mask,
    save_folder,
    unify,
    unpack_mask,
)
from hf_moe_cl.condu.lora import trained_factors, weight_delta
from hf_moe_cl.continual import ContinualTrainer
from hf_moe_cl.continual.methods import ConDU, ConDUArguments, DDASArguments, MoEAdapters

from conftest import colour_task, continual_args, noise_images, rerecord, tiny_clip
from test_trainer import StopAtTask


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


# Two tasks, two tensors. Element means of "a": 1.5, -0.5, 0 (a tie), 0.25; of "b": 0 (a tie), 2.
HAND = [{"a": t(1.0, -2.0, 3.0, 0.0), "b": t(1.0, 0.0)}, {"a": t(2.0, 1.0, -3.0, 0.5), "b": t(-1.0, 4.0)}]


def test_official_rule_elects_the_sign_of_the_mean_ties_negative_and_rescales_by_tensor_means():
    unified, masks, rescalers = unify(HAND, "official")
    assert torch.equal(unified["a"], t(2.0, -2.0, -3.0, 0.5)) and torch.equal(unified["b"], t(-1.0, 4.0))
    assert [m["a"].tolist() for m in masks] == [[True, True, False, False], [True, False, True, True]]
    assert [m["b"].tolist() for m in masks] == [[False, False], [True, True]]
    # task 0: (mean|a0| + mean|b0|) / (mean|U_a M| + mean|U_b M|) = (1.5 + 0.5) / (1.0 + 0)
    # task 1: (1.625 + 2.5) / (1.375 + 2.5)
    assert rescalers == pytest.approx([2.0, 4.125 / 3.875])
    assert torch.allclose(decouple(unified, masks[0], rescalers[0])["a"], t(4.0, -4.0, 0.0, 0.0))


def test_paper_rule_elects_the_sign_of_the_sum_and_rescales_by_element_sums():
    unified, masks, rescalers = unify(HAND, "paper")
    assert torch.equal(unified["a"], t(2.0, -2.0, 0.0, 0.5)) and torch.equal(unified["b"], t(0.0, 4.0))
    assert [m["a"].tolist() for m in masks] == [[True, True, False, False], [True, False, False, True]]
    assert [m["b"].tolist() for m in masks] == [[False, False], [False, True]]
    assert rescalers == pytest.approx([7.0 / 4.0, 11.5 / 6.5])
    with pytest.raises(ValueError, match="Unknown ConDU unify rule 'mean'"):
        unify(HAND, "mean")


@pytest.mark.parametrize("rule", ["official", "paper"])
def test_sessions_follow_the_decouple_unify_recurrence(rule):
    deltas = HAND + [{"a": t(-0.5, -1.0, -4.0, 1.0), "b": t(0.5, -2.0)}]
    store = DeltaStore(rule)
    for delta in deltas:
        store.add_task(delta)
    u2, m2, r2 = unify(deltas[:2], rule)
    u3, m3, r3 = unify([decouple(u2, m2[i], r2[i]) for i in range(2)] + [deltas[2]], rule)
    assert all(torch.equal(store.unified[n], u3[n]) for n in u3) and store.rescalers == pytest.approx(r3)
    for task in range(3):
        assert torch.allclose(store.task_delta(task)["a"], decouple(u3, m3[task], r3[task])["a"])


@pytest.mark.parametrize("rule", ["official", "paper"])
def test_rebuilt_delta_equals_the_original_where_masks_never_change(rule):
    deltas = [{"a": t(1.0, 2.0), "b": t(-1.0, 0.5)}, {"a": t(2.0, 4.0), "b": t(-2.0, 1.0)},
              {"a": t(0.5, 1.0), "b": t(-0.5, 0.25)}]
    origin = {"a": t(0.3, -0.7), "b": t(0.1, 0.2)}
    store = DeltaStore(rule, origin=origin)
    for delta in deltas:
        store.add_task(delta)
    assert torch.allclose(store.unified_tensors["a"], origin["a"] + t(2.0, 4.0))  # the unified model's tensors
    for task, delta in enumerate(deltas):
        assert all(torch.allclose(store.task_delta(task)[n], delta[n]) for n in delta), task


def test_masks_are_bit_packed():
    mask = torch.rand(3, 7, 5, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (3 * 7 * 5 + 7) // 8
    assert torch.equal(unpack_mask(packed, mask.shape), mask)
    store = DeltaStore()
    for seed in range(3):
        store.add_task({"w": torch.randn(64, 32, generator=torch.Generator().manual_seed(seed))})
    sizes = store.storage_bytes()
    assert sizes["masks"] == 3 * 64 * 32 // 8 and sizes["one_delta_per_task"] == 3 * 64 * 32 * 4
    assert sizes["stored"] < sizes["one_delta_per_task"] / 2


def hand_store():
    store = DeltaStore("official", origin={"a": t(0.5, 0.5, 0.5, 0.5), "b": t(1.0, 1.0)})
    for i, delta in enumerate(HAND):
        store.add_task(delta, {"image_mean": torch.eye(2), "text_mean": torch.ones(2, 2)},
                       {"name": f"task{i}", "classnames": ["x", "y"], "templates": ["{}"]})
    return store


def test_trigger_files_round_trip_and_bad_files_fail_clearly(tmp_path):
    store = hand_store()
    save_folder(tmp_path, store, {"model": "a"}, {"options": {}})
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the staging folder is gone
    loaded, header = load_folder(tmp_path, {"model": "a"})
    assert header["tasks"][1]["name"] == "task1" and loaded.tasks == store.tasks
    assert torch.equal(loaded.prototypes[1]["text_mean"], torch.ones(2, 2))
    for task in range(2):
        assert all(torch.equal(loaded.task_delta(task)[n], store.task_delta(task)[n]) for n in store.shapes)
    with pytest.raises(ValueError, match="made for another model"):
        load_folder(tmp_path, {"model": "b"})
    with pytest.raises(ValueError, match="out of range"):
        store.task_delta(2)
    with pytest.raises(ValueError, match="other tensors"):
        store.add_task({"v": t(1.0)})

    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps(dict(config, version=99)))
    with pytest.raises(ValueError, match="not a ConDU save this version reads"):
        load_folder(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(dict(config, shapes=dict(config["shapes"], c=[3]))))
    with pytest.raises(ValueError, match="incomplete: it lacks tensor 'origin.c'"):
        load_folder(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    weights = tmp_path / TRIGGERS_FILE
    weights.write_bytes(weights.read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        load_folder(tmp_path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no ConDU save"):
        load_folder(tmp_path / "nothing")


@pytest.mark.parametrize("targets, unknown", [("fc1,fc_2", "['fc_2']"), ("nosuch", "['nosuch']")])
def test_lora_targets_that_name_no_layer_are_refused(targets, unknown):
    """A misspelt target among good ones left its layers untrained, without a word."""
    with pytest.raises(ValueError, match=rf"No Linear layer of the model is named \{unknown[:-1]}\] "
                                         r"\(condu_lora_targets\)"):
        ConDU(tiny_clip(), ConDUArguments(condu_lora_targets=targets), rank=4)._new_store(0)


def test_unknown_options_are_refused():
    with pytest.raises(ValueError, match="`condu_rescaler` must be one of"):
        ConDUArguments(condu_rescaler="median")
    with pytest.raises(ValueError, match="`condu_fusion` must be one of"):
        ConDUArguments(condu_fusion="votes")
    with pytest.raises(ValueError, match="names no layer"):
        ConDUArguments(condu_lora_targets=" , ")


def make_args(path, **overrides):
    return continual_args(path, **{"max_steps": 3, "learning_rate": 1e-2, "seed": 5, **overrides})


def two_tasks():
    return [colour_task("first", seed=0), colour_task("second", seed=1, offset=3)]


class RecordingConDU(ConDU):
    """Keeps each task's delta as trained, before unification."""

    def end_task(self, trainer, index, task):
        self.direct = getattr(self, "direct", [])
        self.direct.append({n: v - self.store.origin[n] for n, v in trained_factors(self._training).items()})
        super().end_task(trainer, index, task)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from conftest import tiny_clip_processor, write_tiny_tokenizer

    processor = tiny_clip_processor(write_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer")))
    path = tmp_path_factory.mktemp("condu")
    base = tiny_clip()
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    method = RecordingConDU(base, ConDUArguments(condu_top_k=1), rank=4)
    trainer = ContinualTrainer(method=method, args=make_args(path / "run"), processing_class=processor)
    result = trainer.train_tasks(two_tasks())
    return method, result, processor, path, reference


def test_lora_run_fills_the_matrices_and_leaves_the_pretrained_model_untouched(lora_run):
    method, result, _, _, reference = lora_run
    assert all(torch.equal(reference[k], v) for k, v in method.model.state_dict().items())
    assert set(method.store.shapes) == set(method.direct[0]) and len(method.store.shapes) == 16  # fc1, fc2 x 4 x A, B
    assert method.store.shapes["base_model.model.vision_model.encoder.layers.0.mlp.fc1.lora_A.weight"] == (4, 48)
    # the unseen task is voted for, the same evaluation as the task-agnostic matrix's cell
    assert result.accuracy_matrix[0][1] == result.task_agnostic_matrix[0][1]
    histogram = result.diagnostics["route_histogram"]["per_image"][-1]
    assert [sum(counts) for counts in histogram] == [12, 12] and all(c[0] == 0 for c in histogram)
    sizes = result.diagnostics["condu"]["storage_bytes"]
    assert sizes["masks"] == 2 * sum(s.numel() for s in method.store.shapes.values()) // 8


def test_lora_save_is_a_peft_adapter_of_the_unified_model_and_rebuilds_every_task(lora_run, tmp_path):
    method, _, processor, path, _ = lora_run
    folder = path / "run" / "task-01-second"
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    # peft alone loads the unified model: pretrained + LoRA(origin + unified delta)
    unified = PeftModel.from_pretrained(tiny_clip(), folder).eval()
    with applied_delta(method.model, weight_delta(method.store.unified_tensors, 4 ** -0.5)):
        expected = image_embeddings(method.model, pixels)
    assert torch.allclose(image_embeddings(unified, pixels), expected, atol=1e-5)
    # the library's loader rebuilds each task as unify() of the directly computed deltas says
    loaded = ConDU.from_pretrained(folder, base_model=tiny_clip())
    assert loaded.arguments == method.arguments and loaded.learned_tasks()[1]["name"] == "second"
    u, masks, rescalers = unify(method.direct, "official")
    for task in range(2):
        rebuilt = loaded.task_delta(task)
        assert all(torch.equal(rebuilt[n], method.task_delta(task)[n]) for n in rebuilt)
        assert all(torch.allclose(rebuilt[n], decouple(u, masks[task], rescalers[task])[n], atol=1e-6) for n in u)
    # after the first task nothing was unified with it yet: its rebuilt delta is the trained one
    first = ConDU.from_pretrained(path / "run" / "task-00-first", base_model=tiny_clip())
    rebuilt = first.task_delta(0)
    assert all(torch.allclose(rebuilt[n], method.direct[0][n], atol=1e-6) for n in rebuilt)
    # a task's model: the loaded method and the trained one classify alike
    with loaded.acting_as(0):
        mine = image_embeddings(loaded.model, pixels)
    with method.acting_as(0):
        assert torch.equal(mine, image_embeddings(method.model, pixels))


def test_the_pipeline_takes_a_trained_condu_as_its_model(lora_run):
    """`pipeline(..., model=condu)` classifies as `TaskAgnosticClassifier(condu)` (it failed on the method's missing
    `device`); the ConDU's bare CLIP is refused naming the ConDU itself."""
    from transformers import pipeline

    method, _, processor, _, _ = lora_run
    images = list(colour_task("first", seed=0).eval_dataset["image"][:3]) + list(noise_images(2, 1)["image"])
    expected = TaskAgnosticClassifier(method, processor)(images, candidate_labels=["noise"])
    classify = pipeline("task-agnostic-image-classification", model=method, processor=processor)
    out = classify(images, candidate_labels=["noise"], batch_size=2)
    assert [(o["label"], o["task"]) for o in out] == [(o["label"], o["task"]) for o in expected]
    assert [o["score"] for o in out] == pytest.approx([o["score"] for o in expected], abs=1e-6)
    with pytest.raises(ValueError, match=r"a trained ConDU \(the ConDU itself, not its .model\)"):
        pipeline("task-agnostic-image-classification", model=method.model, processor=processor)


def test_the_same_code_classifies_without_task_ids_with_moe_ddas_or_condu(lora_run, tmp_path):
    method, _, processor, path, _ = lora_run
    images = list(colour_task("first", seed=0).eval_dataset["image"][:3])

    def classify(model):  # what a user writes, whatever the method behind `model`
        return TaskAgnosticClassifier(model, processor)(images, candidate_labels=["noise"])

    ddas = DDASArguments(ddas=True, ddas_task_steps=20, ddas_reference_steps=20, ddas_hidden_dim=8)
    moe = MoEAdapters(get_peft_model(tiny_clip(), MoELoraConfig(num_tasks=2, num_experts=2, r=2)), ddas=ddas,
                      ddas_reference=colour_task("reference", seed=9, offset=5).train_dataset)
    ContinualTrainer(method=moe, args=make_args(tmp_path, max_steps=1, task_agnostic_eval=False),
                     processing_class=processor).train_tasks(two_tasks())
    for model in (moe, method):
        out = classify(model)
        assert len(out) == 3 and all(o["label"] in ("red", "green", "blue", "yellow", "cyan", "magenta", "noise")
                                     and o["task"] in ("first", "second", None) for o in out)
    out = classify(method)
    assert all(o["task"] in ("first", "second") and 0.0 <= o["score"] <= 1.0 for o in out)
    assert classify(ConDU.from_pretrained(path / "run" / "task-01-second", base_model=tiny_clip())) == out
    tiny_clip().save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    loaded = TaskAgnosticClassifier.from_pretrained(str(path / "run" / "task-01-second"), str(tmp_path / "base"))
    assert loaded(images, candidate_labels=["noise"]) == out
    with pytest.raises(ValueError, match="another model"):
        ConDU.from_pretrained(path / "run" / "task-01-second", base_model=tiny_clip(vision_width=64))
    with pytest.raises(ValueError, match="names no base model"):
        ConDU.from_pretrained(path / "run" / "task-01-second")


def test_resume_after_a_crash_equals_an_uninterrupted_run(lora_run, tmp_path):
    straight, expected, processor, path, _ = lora_run
    interrupted = ContinualTrainer(method=ConDU(tiny_clip(), ConDUArguments(condu_top_k=1), rank=4),
                                   args=make_args(tmp_path), processing_class=processor)
    interrupted.add_callback(StopAtTask(interrupted, "second"))
    with pytest.raises(KeyboardInterrupt):
        interrupted.train_tasks(two_tasks())
    assert not (tmp_path / "task-01-second").exists()
    with pytest.raises(ValueError, match="trained with condu_rescaler='official'"):
        ConDU(tiny_clip(), ConDUArguments(condu_rescaler="paper"), rank=4).load(tmp_path / "task-00-first")

    method = ConDU(tiny_clip(), ConDUArguments(condu_top_k=1), rank=4)
    result = ContinualTrainer(method=method, args=make_args(tmp_path),
                              processing_class=processor).train_tasks(two_tasks(), resume=True)
    assert result.matrices == expected.matrices
    a, b = straight.store, method.store
    assert a.rescalers == b.rescalers and a.tasks == b.tasks
    for n in a.shapes:
        assert torch.equal(a.unified_tensors[n], b.unified_tensors[n]) and torch.equal(a.origin[n], b.origin[n])
        assert all(torch.equal(x[n], y[n]) for x, y in zip(a.packed_masks, b.packed_masks))
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a.prototypes, b.prototypes) for k in x)
    saved = [load_folder(p / "task-01-second")[0] for p in (path / "run", tmp_path)]
    assert all(torch.equal(saved[0].unified_tensors[n], saved[1].unified_tensors[n]) for n in a.shapes)


def test_a_published_condu_learns_one_more_task_through_its_own_route_and_the_card_lists_every_task(lora_run,
                                                                                                   tmp_path):
    """The new task is stored third and evaluated through route 2, every route is counted (the histograms were
    sized for the new run alone: a crash after training), a name it learned is refused, the card lists all."""
    method, _, processor, path, _ = lora_run
    continued = ConDU.from_pretrained(path / "run" / "task-01-second", base_model=tiny_clip())
    trainer = ContinualTrainer(method=continued, args=make_args(tmp_path / "more", task_agnostic_eval=True),
                               processing_class=processor)
    third = colour_task("third", seed=2, offset=1)
    result = trainer.train_tasks([third])
    assert [info["name"] for info in continued.store.tasks] == ["first", "second", "third"]
    assert continued.cell_route(0, 0) == 2  # the oracle cell of "third" is its own model's, not "first"'s
    assert len(result.diagnostics["route_histogram"]["per_image"][0][0]) == 4  # zero-shot and 3 stored tasks
    assert (result.diagnostics["route_names"], result.diagnostics["task_routes"]) == (["first", "second", "third"], [2])
    trainer.save_model(str(tmp_path / "published"))
    card = (tmp_path / "published" / "README.md").read_text()
    assert "trained on 3 tasks" in card and all(f"**{name}**" in card for name in ("first", "second", "third"))
    again = ContinualTrainer(method=ConDU.from_pretrained(path / "run" / "task-01-second", base_model=tiny_clip()),
                             args=make_args(tmp_path / "again"), processing_class=processor)
    with pytest.raises(ValueError, match=r"This ConDU already learned \['first'\] \(stored tasks \[0\]\)"):
        again.train_tasks([colour_task("first", seed=0)])
    assert not (tmp_path / "again").exists() or not list((tmp_path / "again").glob("task-*"))


def test_save_model_over_a_condu_save_leaves_none_of_its_files(lora_run, ddas_run, module_processor, tmp_path):
    """A MoE-LoRA model saved with `save_model` into a folder holding a ConDU save: the ConDU files it did not
    rewrite are removed (left, condu_config.json made the folder load as ConDU, refused as damaged)."""
    import shutil

    from hf_moe_cl.condu import holds_condu

    folder = tmp_path / "published"
    shutil.copytree(lora_run[3] / "run" / "task-01-second", folder)
    model, tasks, _, _ = ddas_run
    ContinualTrainer(model=model, args=make_args(tmp_path / "moe"), processing_class=module_processor).save_model(
        str(folder))
    assert not holds_condu(folder) and not list(folder.glob("condu_*"))
    assert (folder / "trainer_state.json").is_file()  # files of no save stay
    tiny_clip().save_pretrained(tmp_path / "base")
    module_processor.save_pretrained(tmp_path / "base")
    images = list(tasks[0].eval_dataset["image"][:3]) + list(noise_images(2, 1)["image"])
    expected = TaskAgnosticClassifier(model, module_processor)(images, candidate_labels=["noise"])
    loaded = TaskAgnosticClassifier.from_pretrained(str(folder), str(tmp_path / "base"))
    out = loaded(images, candidate_labels=["noise"])
    assert [(o["label"], o["task"]) for o in out] == [(o["label"], o["task"]) for o in expected]
    assert [o["score"] for o in out] == pytest.approx([o["score"] for o in expected], abs=1e-6)


def test_an_adapter_saved_over_a_condu_save_by_peft_is_named_with_the_stale_files(lora_run, ddas_run, tmp_path):
    """peft's `save_pretrained` (or an upload) over a ConDU save leaves its condu_*.* files: loading names them (it
    said the adapter weights were damaged)."""
    import shutil

    folder = tmp_path / "published"
    shutil.copytree(lora_run[3] / "run" / "task-01-second", folder)
    ddas_run[0].save_pretrained(folder)
    message = (rf"{folder} holds a MOE_LORA adapter saved over a ConDU save: its condu_config.json, "
               r"condu_triggers.safetensors are left from the earlier save. Delete them to load the adapter")
    tiny_clip().save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match=message):
        TaskAgnosticClassifier.from_pretrained(str(folder), str(tmp_path / "base"))
    with pytest.raises(ValueError, match=message):
        ConDU.from_pretrained(folder, base_model=tiny_clip())


def test_full_fine_tuning_trains_all_but_logit_scale_and_saves_the_weight_delta(tmp_path, clip_processor):
    base = tiny_clip()
    method = ConDU(base, ConDUArguments(condu_fine_tune="full", condu_rescaler="paper",
                                        condu_prototypes="image", condu_unseen_tasks="pretrained"))
    trainer = ContinualTrainer(method=method, processing_class=clip_processor,
                               args=make_args(tmp_path, max_steps=1, warmup_steps=0, learning_rate=1e-3,
                                             task_agnostic_eval=False))
    zero_shot_second = trainer.evaluate_task(two_tasks()[1])
    result = trainer.train_tasks(two_tasks())
    assert result.accuracy_matrix[0][1] == zero_shot_second
    assert method.recipe == "condu-full" and "logit_scale" not in method.store.shapes
    assert set(method.store.shapes) == {n for n, _ in base.named_parameters()} - {"logit_scale"}
    assert not method.store.origin and method.store.rule == "paper"
    assert torch.count_nonzero(method.task_delta(1)["vision_model.embeddings.class_embedding"]) > 0
    folder = tmp_path / "task-01-second"
    assert (folder / "condu_delta.safetensors").is_file() and not (folder / "adapter_model.safetensors").exists()
    loaded = ConDU.from_pretrained(folder, base_model=tiny_clip())
    assert all(torch.equal(loaded.task_delta(1)[n], method.task_delta(1)[n]) for n in method.store.shapes)
    assert model_fingerprint(base)["vision_width"] == 48


def test_a_save_loads_from_a_hub_repo_id_with_subfolder_and_revision(lora_run, tmp_path, monkeypatch):
    """Offline, from a Hub cache laid out by hand: what `push_to_hub` uploads is what a repo id loads."""
    import shutil

    import huggingface_hub.constants

    method, _, _, path, _ = lora_run
    repo = tmp_path / "models--someone--condu-clip"
    for commit, task in (("a" * 40, "task-01-second"), ("b" * 40, "task-00-first")):
        shutil.copytree(path / "run" / task, repo / "snapshots" / commit / "v1")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    (repo / "refs" / "v0").write_text("b" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    latest = ConDU.from_pretrained("someone/condu-clip", base_model=tiny_clip(), subfolder="v1", token="unused")
    assert latest.store.num_tasks == 2 and torch.equal(latest.task_delta(1)[next(iter(method.store.shapes))],
                                                        method.task_delta(1)[next(iter(method.store.shapes))])
    assert ConDU.from_pretrained("someone/condu-clip", tiny_clip(), subfolder="v1", revision="v0").store.num_tasks == 1
    with pytest.raises(OSError, match="neither a local folder nor a reachable Hub repo"):
        ConDU.from_pretrained("someone/missing", tiny_clip())


# ----- a damaged save folder of the delta store ----------------------------------------------------------------------
def condu_save(folder):
    from hf_moe_cl.condu.checkpoint import model_fingerprint, save_folder
    from hf_moe_cl.condu.store import DeltaStore

    generator = torch.Generator().manual_seed(0)
    store = DeltaStore("official")
    for t in range(2):
        store.add_task({"w": torch.randn(4, 6, generator=generator)},
                       {"image_mean": torch.randn(3, 16, generator=generator)},
                       {"name": f"task{t}", "classnames": ["a", "b", "c"], "templates": ["{}"]})
    save_folder(folder, store, model_fingerprint(tiny_clip()), {"arguments": {}})
    return folder


def edit_condu_config(folder, edit):
    path = folder / "condu_config.json"
    header = json.loads(path.read_text())
    path.write_text(json.dumps(edit(header)))


def rewrite_triggers(folder, edit):
    from safetensors.torch import load_file, save_file

    path = folder / "condu_triggers.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    rerecord(folder, "condu_config.json")  # recorded as a save would: the values checks meet it


def drop_last_task(header):
    from hf_moe_cl.files import json_sha256

    header["tasks"] = header["tasks"][:1]
    header["tasks_sha256"] = json_sha256(header["tasks"])  # recorded as a save would: the values checks meet it
    return header


@pytest.mark.parametrize("damage, message", [
    (lambda f: edit_condu_config(f, lambda h: [h]), "should hold a JSON object .* not a list"),
    (lambda f: (f / "condu_config.json").write_text('{"format": '), "condu_config.json is not valid JSON"),
    (lambda f: edit_condu_config(f, lambda h: {k: v for k, v in h.items() if k != "tasks"}), r"it lacks \['tasks'\]"),
    (lambda f: edit_condu_config(f, lambda h: {**h, "shapes": {"w": "4x6"}}), "`shapes` must map tensor names"),
    (lambda f: edit_condu_config(f, lambda h: {**h, "fine_tune": "half"}), "fine_tune is 'half'"),
    (lambda f: edit_condu_config(f, lambda h: {**h, "tasks": []}), "`tasks` must be a non-empty list"),
    (lambda f: edit_condu_config(f, lambda h: {**h, "tasks": [{**h["tasks"][0], "rescaler": math.nan},
                                                              h["tasks"][1]]}),
     r"tasks\[0\] must be an object with a finite `rescaler`"),
    (lambda f: edit_condu_config(f, lambda h: {**h, "tasks": [{**h["tasks"][0], "classnames": "abc"},
                                                              h["tasks"][1]]}),
     r"tasks\[0\]: `classnames` must be a list of class names \(one per label\), got str 'abc'"),
    (lambda f: edit_condu_config(f, drop_last_task), r"lists 1 task\(s\) but condu_triggers.safetensors holds "
                                                     r"triggers of tasks \[0, 1\]"),
    (lambda f: rewrite_triggers(f, lambda t: t.update({"prototype.1.image_mean": torch.zeros(3, 8)})),
     r"prototype.1.image_mean has shape \(3, 8\), not \(3, 16\)"),
    (lambda f: rewrite_triggers(f, lambda t: t.update({"prototype.0.image_mean": torch.zeros(2, 16)})),
     r"prototype.0.image_mean has shape \(2, 16\), not \(3, 16\)"),
    (lambda f: rewrite_triggers(f, lambda t: t.update({"prototype.0.image_mean": torch.full((3, 16), math.nan)})),
     "holds prototype.0.image_mean of dtype torch.float32 with non-finite"),
    (lambda f: rewrite_triggers(f, lambda t: t.update({"prototype.0.image_mean": torch.zeros(3, 16,
                                                                                            dtype=torch.int32)})),
     "holds prototype.0.image_mean of dtype torch.int32"),
])
def test_a_damaged_condu_save_is_named(tmp_path, damage, message):
    from hf_moe_cl.condu.checkpoint import load_folder, model_fingerprint

    folder = condu_save(tmp_path / "save")
    store, _ = load_folder(folder, model_fingerprint(tiny_clip()))  # intact: loads
    assert store.num_tasks == 2
    damage(folder)
    with pytest.raises(ValueError, match=message):
        load_folder(folder, model_fingerprint(tiny_clip()))


def test_a_top_k_above_the_tasks_learned_votes_for_all_of_them_and_says_so_once(lora_run, caplog):
    learned = lora_run[0].store  # two tasks
    method = ConDU(tiny_clip(), ConDUArguments(condu_top_k=4), rank=4)
    method.store = learned
    with caplog.at_level(logging.WARNING, logger="hf_moe_cl"):
        for _ in range(3):  # batch after batch
            similarity, voted = method.vote(torch.nn.functional.normalize(torch.randn(5, 16), dim=-1))
            assert voted.shape == similarity.shape == (5, 2)
    said = [r.getMessage() for r in caplog.records if "condu_top_k" in r.getMessage()]
    assert said == ["ConDU votes for all 2 task(s) learned so far, not condu_top_k=4, while fewer are learned "
                    "(logged once)."]


@pytest.mark.parametrize("options, message", [
    ({"base_model": "x"}, r"Unknown keyword argument\(s\) \['base_model'\] for loading a ConDU save; the base CLIP is "
                          r"`base_model_name_or_path`. It takes revision, subfolder, token"),
    ({"is_trainable": True}, r"Unknown keyword argument\(s\) \['is_trainable'\] for loading a ConDU save\. It takes"),
])
def test_a_loader_option_a_condu_save_would_drop_is_refused(lora_run, options, message):
    """TaskAgnosticClassifier.from_pretrained passed a ConDU save only the Hub options: any other was dropped."""
    with pytest.raises(ValueError, match=message):
        TaskAgnosticClassifier.from_pretrained(str(lora_run[3] / "run" / "task-01-second"), **options)
