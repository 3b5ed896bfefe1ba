"""A ConDU save read by `ConDU.from_pretrained` and at resume by `ConDU.load`: every field of condu_config.json and of
its tensor files is checked, a bad one is refused naming the file, and nothing is loaded; the rank given in code gets
the same check."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save, save_file

from hf_moe_cl.continual.methods import ConDU, ConDUArguments

from conftest import flip_lowest_bits, rerecord, tiny_clip


@pytest.fixture(scope="module")
def condu_save(tmp_path_factory):
    """A LoRA ConDU save of two tasks (rank 2) on `tiny_clip()`, made without training."""
    method = ConDU(tiny_clip(), ConDUArguments(), rank=2)
    method.store = method._new_store(0)
    generator = torch.Generator().manual_seed(0)
    for t, names in enumerate([["red", "green", "blue"], ["cat", "dog"]]):
        delta = {n: torch.randn(s, generator=generator) * 0.01 for n, s in method.store.shapes.items()}
        means = {kind: torch.nn.functional.normalize(torch.randn(len(names), 16, generator=generator), dim=-1)
                 for kind in ("image_mean", "text_mean")}
        method.store.add_task(delta, means, {"name": f"t{t}", "classnames": names, "templates": ["a photo of {}."]})
    folder = tmp_path_factory.mktemp("condu") / "save"
    method.save(folder)
    return folder


TRIGGERS = "condu_triggers.safetensors"


def edit_config(edit, rerecord=True):
    """An edit of condu_config.json; with `rerecord`, its record of the tasks is rewritten as a save does (the edit
    then meets the checks of values, not the integrity check)."""
    def damage(folder):
        from hf_moe_cl.files import json_sha256

        path = folder / "condu_config.json"
        header = json.loads(path.read_text())
        edit(header)
        if rerecord:
            header["tasks_sha256"] = json_sha256(header["tasks"])
        path.write_text(json.dumps(header))
    return damage


def edit_adapter_config(edit):
    """An edit of the peft LoRA config beside the triggers (no hash covers it: PeftModel.from_pretrained reads it)."""
    def damage(folder):
        path = folder / "adapter_config.json"
        config = json.loads(path.read_text())
        edit(config)
        path.write_text(json.dumps(config))
    return damage


def edit_tensors(file, edit):
    def damage(folder):
        tensors = load_file(str(folder / file))
        edit(tensors)
        save_file(tensors, str(folder / file))
        rerecord(folder, "condu_config.json")  # recorded as a save would: the values checks meet it
    return damage


def first_mask(tensors):
    return next(key for key in tensors if key.startswith("mask.0."))


def without_text_means(folder):
    edit_config(lambda h: h["tasks"][0].update(prototypes=["image_mean"]))(folder)
    edit_tensors(TRIGGERS, lambda t: t.pop("prototype.0.text_mean"))(folder)


def _other_unified(folder):
    """The unified adapter weights of `folder` with one value changed, as another save's file."""
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    next(iter(tensors.values())).add_(1.0)
    return save(tensors)


CONFIG = "condu_config.json is damaged or was edited: "


DAMAGES = {
    "no options": (edit_config(lambda h: h.pop("options")), CONFIG + r"it lacks \['options'\]"),
    "no rank": (edit_config(lambda h: h.pop("rank")), CONFIG + r"it lacks \['rank'\]"),
    "rank a string": (edit_config(lambda h: h.update(rank="2")), CONFIG + "`rank` must be an integer >= 1, got '2'"),
    "rank 0": (edit_config(lambda h: h.update(rank=0)), CONFIG + "`rank` must be an integer >= 1, got 0"),
    "options a list": (edit_config(lambda h: h.update(options=[1])),
                       CONFIG + r"`options` must be an object, got \[1\]"),
    "an option missing": (edit_config(lambda h: h["options"].pop("condu_top_k")),
                          CONFIG + r"`options` lacks \['condu_top_k'\]"),
    "an unknown option": (edit_config(lambda h: h["options"].update(condu_extra=1)),
                          r"condu_config.json has options this version does not know \(\['condu_extra'\]\)"),
    "condu_top_k 0": (edit_config(lambda h: h["options"].update(condu_top_k=0)),
                      CONFIG + "`condu_top_k` must be an integer >= 1, got 0"),
    "condu_fusion unknown": (edit_config(lambda h: h["options"].update(condu_fusion="votes")),
                             CONFIG + "`condu_fusion` must be one of"),
    "options of another fine-tuning": (edit_config(lambda h: h["options"].update(condu_fine_tune="full")),
                                       CONFIG + "its options say condu_fine_tune='full', .* fine_tune='lora'"),
    "base model a number": (edit_config(lambda h: h.update(base_model_name_or_path=5)),
                            CONFIG + "base_model_name_or_path is 5, not a model name or folder"),
    "unknown rule": (edit_config(lambda h: h.update(rule="evil")), CONFIG + r"rule is 'evil', not one of"),
    "template without {}": (edit_config(lambda h: h["tasks"][0].update(templates=["photo"])),
                            CONFIG + r"tasks\[0\]: the prompt template 'photo' has no '\{\}'"),
    "template with two {}": (edit_config(lambda h: h["tasks"][0].update(templates=["{} {}"])),
                             CONFIG + r"tasks\[0\]: the prompt template '\{\} \{\}' has 2 fields"),
    "no templates": (edit_config(lambda h: h["tasks"][0].update(templates=[])),
                     CONFIG + r"tasks\[0\]: `templates` must be a non-empty list"),
    "duplicate class names": (edit_config(lambda h: h["tasks"][1].update(classnames=["x", "x"])),
                              CONFIG + r"tasks\[1\] has duplicate class names \['x'\]"),
    "empty class name": (edit_config(lambda h: h["tasks"][1].update(classnames=["cat", " "])),
                         CONFIG + r"tasks\[1\] needs one non-empty class name"),
    "no templates key": (edit_config(lambda h: h["tasks"][0].pop("templates")),
                         CONFIG + r"tasks\[0\] has the keys \['classnames', 'name', 'prototypes', 'rescaler'\]"),
    "empty task name": (edit_config(lambda h: h["tasks"][0].update(name="")),
                        CONFIG + r"tasks\[0\].name must be a non-empty string"),
    "negative rescaler": (edit_config(lambda h: h["tasks"][0].update(rescaler=-5.0)),
                          CONFIG + r"tasks\[0\].rescaler is -5.0"),
    "tasks swapped": (edit_config(lambda h: h.update(tasks=h["tasks"][::-1]), rerecord=False),
                      r"condu_config.json was edited in `tasks`: their class names, templates and rescalers belong to "
                      r"the saved triggers \(tasks_sha256 records them\)"),
    "class names edited": (edit_config(lambda h: h["tasks"][0].update(classnames=["x" + c for c in
                                                                                 h["tasks"][0]["classnames"]]),
                                       rerecord=False), r"condu_config.json was edited in `tasks`"),
    "no prototypes": (edit_config(lambda h: h["tasks"][0].update(prototypes=[])),
                      CONFIG + r"tasks\[0\].prototypes must list 'image_mean'"),
    "unknown prototype": (edit_config(lambda h: h["tasks"][0].update(prototypes=["image_mean", "evil"])),
                          CONFIG + r"tasks\[0\].prototypes must list 'image_mean'"),
    "float mask": (edit_tensors(TRIGGERS, lambda t: t.update({first_mask(t): t[first_mask(t)].float()})),
                   r"holds mask.0.\S+ of dtype torch.float32 in condu_triggers.safetensors; a sign mask is stored as "
                   r"uint8"),
    "int64 mask": (edit_tensors(TRIGGERS, lambda t: t.update({first_mask(t): t[first_mask(t)].long()})),
                   r"holds mask.0.\S+ of dtype torch.int64 in condu_triggers.safetensors"),
    "unlisted trigger": (edit_tensors(TRIGGERS, lambda t: t.update({"mask.0.x": torch.zeros(1)})),
                         r"condu_triggers.safetensors holds tensors \['mask.0.x'\] that condu_config.json does not "
                         r"list"),
    "unlisted unified tensor": (edit_tensors("adapter_model.safetensors", lambda t: t.update(x=torch.zeros(1))),
                                r"adapter_model.safetensors holds tensors \['x'\] that condu_config.json does not "
                                r"list"),
    "short mask": (edit_tensors(TRIGGERS, lambda t: t.update({first_mask(t): t[first_mask(t)][:-1]})),
                   r"has shape \(\d+,\) in condu_triggers.safetensors, condu_config.json says"),
    "flipped bits in the triggers": (lambda f: flip_lowest_bits(f / TRIGGERS),
                                     r"condu_triggers.safetensors is not the file that was saved: its sha256 differs "
                                     r"from the one .*condu_config.json records .*save or download it again"),
    "the unified adapter of another save": (
        lambda f: (f / "adapter_model.safetensors").write_bytes(_other_unified(f)),
        r"adapter_model.safetensors is not the file that was saved: its sha256 differs"),
    "an edited base record": (edit_config(lambda h: h.update(base_weights={"sha256": "0" * 16})),
                              CONFIG + r"`base_weights` must be None or \{'sha256'"),
    "a LoRA scale edited in the peft adapter config": (
        edit_adapter_config(lambda c: c.update(lora_alpha=50)),
        r"adapter_config.json gives lora_alpha=50, not the LoRA the save's factors were trained with \(lora_alpha=1\): "
        r"PeftModel.from_pretrained on the folder would build another model"),
    "other LoRA targets in the peft adapter config": (
        edit_adapter_config(lambda c: c.update(target_modules=["fc1"], r=4)),
        r"adapter_config.json gives r=4, target_modules=\['fc1'\], not the LoRA .* \(r=2, "
        r"target_modules=\['fc1', 'fc2'\]\)"),
    "no peft adapter config": (lambda f: (f / "adapter_config.json").unlink(),
                               r"adapter_config.json is missing or not a JSON object: the ConDU save is incomplete"),
    "no text prototypes for fused voting": (without_text_means, r"holds no text prototypes \(text_mean\) for task\(s\) "
                                                                r"\[0\], which condu_prototypes='fused' votes with"),
}


def test_an_intact_condu_save_loads(condu_save):
    method = ConDU.from_pretrained(condu_save, base_model=tiny_clip())
    assert method.store.num_tasks == 2 and method.rank == 2
    assert method.learned_tasks()[1] == {"name": "t1", "classnames": ["cat", "dog"], "templates": ["a photo of {}."]}
    resumed = ConDU(tiny_clip(), ConDUArguments(), rank=2)
    resumed.load(condu_save)
    assert resumed.store.num_tasks == 2


@pytest.mark.parametrize("case", list(DAMAGES))
def test_every_field_of_a_condu_save_is_checked_and_the_file_named(condu_save, tmp_path, case):
    damage, message = DAMAGES[case]
    folder = tmp_path / "save"
    shutil.copytree(condu_save, folder)
    damage(folder)
    with pytest.raises(ValueError, match=message) as error:
        ConDU.from_pretrained(folder, base_model=tiny_clip())
    assert str(folder) in str(error.value)
    resumed = ConDU(tiny_clip(), ConDUArguments(), rank=2)  # the resume path: ConDU.load
    with pytest.raises(ValueError, match=message):
        resumed.load(folder)
    assert resumed.store.num_tasks == 0 and not resumed.store.shapes  # nothing loaded


def test_a_rank_given_in_code_is_checked_as_a_saved_one():
    for rank in ("2", 0, True, 2.0):
        with pytest.raises(ValueError, match=f"`rank` must be an integer >= 1, got {rank!r}"):
            ConDU(tiny_clip(), ConDUArguments(), rank=rank)


def test_a_condu_save_is_refused_on_other_base_weights(condu_save, caplog):
    with pytest.raises(ValueError, match=r"The ConDU save in .*save was created on other pretrained weights than this "
                                         r"model's .*set `base_weights` to null in its condu_config.json"):
        ConDU.from_pretrained(condu_save, base_model=tiny_clip(seed=1))
    resumed = ConDU(tiny_clip(seed=1), ConDUArguments(), rank=2)
    with pytest.raises(ValueError, match="created on other pretrained weights"):
        resumed.load(condu_save)


def test_a_store_its_loader_would_refuse_is_not_saved(tmp_path):
    from hf_moe_cl.condu import DeltaStore
    from hf_moe_cl.condu.folder import model_fingerprint, save_folder

    store = DeltaStore("official")
    store.add_task({"w": torch.ones(4)})  # no class names, templates or prototypes
    with pytest.raises(ValueError, match=r"Cannot save this ConDU store to .*: tasks\[0\] has the keys \['name', "
                                         r"'prototypes', 'rescaler'\].*so load_folder would refuse the save"):
        save_folder(tmp_path / "save", store, model_fingerprint(tiny_clip()), {})
    assert not (tmp_path / "save").exists()
