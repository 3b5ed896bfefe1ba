"""ConDU (Gao et al.) as a continual method: every task is a fine-tune of the pretrained CLIP whose delta is unified
with the earlier ones. With a task id, that task's delta is rebuilt from the unified delta and its triggers;
without one, the pretrained model and the tasks voted for by class prototypes predict together.

Defaults follow the official code (zhangzicong518/ConDU); docs/condu.md gives the source of each.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from transformers import CLIPModel

from ...classification import ZERO_SHOT, ImageRoutes, image_embeddings, text_embeddings
from ...condu import (CONFIG_FILE, PROTOTYPE_KINDS, UNIFY_RULES, Delta, DeltaStore, applied_delta, load_folder,
                      model_fingerprint, prototype_vectors, read_header, resolve_folder, save_folder, vote)
from ...condu.lora import (draw_factors, factor_shapes, lora_config, lora_layers, lora_model, lora_scaling,
                           trained_factors, weight_delta)
from ...files import FIX, read_json_file
from ...options import check_option, short_repr
from ...tuners.moe_lora.base_weights import base_weights_record, check_base, record_problem
from .base import ContinualMethod
from .registry import register_method

logger = logging.getLogger("hf_moe_cl")

_CHOICES = {"condu_fine_tune": ("lora", "full"), "condu_rescaler": UNIFY_RULES, "condu_prototypes": PROTOTYPE_KINDS,
            "condu_fusion": ("logits", "probabilities"), "condu_weighting": ("uniform", "similarity"),
            "condu_unseen_tasks": ("vote", "pretrained"), "condu_prototype_images": ("augmented", "plain"),
            "condu_first_cell": ("task", "pretrained"), "condu_few_shot_augment": ("once", "every_step")}
# Options that shape the stored deltas: a save is loaded only with the same values.
_TRAINING_OPTIONS = ("condu_fine_tune", "condu_rescaler")
_LORA_OPTIONS = ("condu_lora_targets", "condu_lora_init_std", "rank")
# The keys of a save's peft LoRA config that change the model `PeftModel.from_pretrained` builds from it.
SHAPING_LORA_KEYS = ("peft_type", "r", "lora_alpha", "use_rslora", "target_modules", "lora_dropout", "bias",
                     "use_dora", "fan_in_fan_out", "layers_to_transform", "layers_pattern", "modules_to_save",
                     "rank_pattern", "alpha_pattern")


@dataclass
class ConDUArguments:
    condu_fine_tune: str = field(
        default="lora", metadata={"help": "ConDU: per-task 'lora' (MTIL_LoRA.sh) or 'full' fine-tuning of every "
                                  "parameter but logit_scale (MTIL_FT.sh)."})
    condu_lora_targets: str = field(
        default="fc1,fc2", metadata={"help": "ConDU: LoRA layers, both towers (official: the MLP's c_fc, c_proj)."})
    condu_lora_init_std: float = field(
        default=0.01, metadata={"help": "ConDU: std of the normal draw of both LoRA factors (official 0.01)."})
    condu_rescaler: str = field(
        default="official", metadata={"help": "ConDU unify rule: 'official' (sign of the mean, ties negative; "
                                      "rescalers from per-tensor means) or 'paper' (sign of the sum; element sums)."})
    condu_prototypes: str = field(default="fused", metadata={"help": "ConDU voting prototypes: 'fused' image + text "
                                                                     "means (official) or 'image' means only."})
    condu_top_k: int = field(default=4, metadata={"help": "ConDU: tasks voted for per image (official logits_num 4)."})
    condu_fusion: str = field(default="logits", metadata={"help": "ConDU: fuse the voted models' 'logits' (official) "
                                                                  "or softmax 'probabilities'."})
    condu_weighting: str = field(default="uniform", metadata={
        "help": "ConDU: 'uniform' average with the pretrained model (official) or 'similarity'-weighted task models."})
    condu_unseen_tasks: str = field(default="vote", metadata={
        "help": "ConDU task-aware matrix, tasks not learned yet: 'vote' (official evaluation) or 'pretrained' model."})
    condu_prototype_images: str = field(
        default="augmented", metadata={"help": "ConDU prototypes: the whole training set through the training "
                                       "augmentation, also in few-shot (official: few_shot_finetune.py lines 181-197) "
                                       "or 'plain' (the task's training images, evaluation transform)."})
    condu_first_cell: str = field(default="task", metadata={
        "help": "ConDU task-aware matrix, cell (0, 0): the first task's 'task' model, or the 'pretrained' model as the "
                "official evaluation (evaluation.py lines 101 and 128 load task models only from session 1)."})
    condu_few_shot_augment: str = field(
        default="once", metadata={"help": "ConDU few-shot tasks: each training image augmented 'once', then fixed "
                                  "(official: few_shot_finetune.py lines 39-58), or anew at 'every_step'."})

    def __post_init__(self):
        for name, allowed in _CHOICES.items():
            check_option(name, getattr(self, name), str, choices=allowed)
        check_option("condu_top_k", self.condu_top_k, int, low=1)
        # above 1, the factors' product (std^2 per weight) is noise larger than CLIP's weights, and float32 overflows
        check_option("condu_lora_init_std", self.condu_lora_init_std, float, low=0.0, high=1.0, low_open=True)
        check_option("condu_lora_targets", self.condu_lora_targets, str)
        if self.condu_fine_tune == "lora" and not self.lora_target_list:
            raise ValueError("condu_lora_targets names no layer; give e.g. 'fc1,fc2'.")

    @property
    def lora_target_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.condu_lora_targets.split(",") if t.strip())


@register_method
class ConDU(ContinualMethod):
    """`model` stays the pretrained CLIP; a task's model is it plus the task's rebuilt delta, added and removed
    exactly around each use (`applied_delta`). `store` holds the unified delta and the triggers."""

    name = "condu"
    arguments_class = ConDUArguments
    selects_routes = True
    untouched_is_fixed = True

    def __init__(self, model, arguments: Optional[ConDUArguments] = None, rank: int = 64):
        check_option("rank", rank, int, low=1)
        super().__init__(model.eval(), arguments)
        self.rank = rank
        self.store = DeltaStore(self.arguments.condu_rescaler)
        self._training: Optional[torch.nn.Module] = None
        self._fixed: Optional[list[dict]] = None  # a few-shot task's training examples, augmented once
        self._deltas: dict[int, Delta] = {}
        self._vote_capped_logged = False  # condu_top_k above the tasks learned: said once

    @property
    def recipe(self) -> str:
        return f"condu-{self.arguments.condu_fine_tune}"

    @property
    def lora(self) -> bool:
        return self.arguments.condu_fine_tune == "lora"

    @classmethod
    def from_base(cls, base, options=(), num_tasks=1, rank=64, reference_images=None):
        return cls(copy.deepcopy(base), cls.pick(options, ConDUArguments), rank=rank)

    @classmethod
    def from_pretrained(cls, folder_or_repo_id, base_model=None, arguments: Optional[ConDUArguments] = None,
                        subfolder: Optional[str] = None, revision: Optional[str] = None,
                        token: Optional[str] = None, **model_kwargs) -> "ConDU":
        """A saved ConDU (a folder or a Hub repo id) on `base_model`, by default the CLIP its save names; its own
        options unless `arguments` are given (voting options may differ, training ones may not)."""
        folder = resolve_folder(folder_or_repo_id, subfolder, revision, token)
        header = read_header(folder)
        saved, rank = _saved_settings(folder, header)
        if base_model is None:
            name = header.get("base_model_name_or_path")
            if not name:
                raise ValueError(f"The ConDU save in {folder_or_repo_id} names no base model; pass "
                                 "base_model=CLIPModel.from_pretrained(...).")
            base_model = CLIPModel.from_pretrained(name, **model_kwargs)
        method = cls(base_model, saved if arguments is None else arguments, rank=rank)
        method.load(folder)
        return method

    # ----- the task loop -------------------------------------------------------------------------------------------
    def _new_store(self, seed: int) -> DeltaStore:
        """An empty store over the tensors a task changes; with LoRA, measured from the pretrained model's own
        random factors (the official pretrained LoRA model has them too)."""
        rule = self.arguments.condu_rescaler
        if not self.lora:
            return DeltaStore(rule, {n: p.shape for n, p in self.model.named_parameters() if n != "logit_scale"})
        shapes = factor_shapes(self.model, self.arguments.lora_target_list, self.rank)
        return DeltaStore(rule, origin=draw_factors(shapes, self.arguments.condu_lora_init_std, seed))

    def begin_sequence(self, context, tasks) -> None:
        if self.store.num_tasks == 0:  # a store loaded from a save keeps its own origin
            self.store = self._new_store(context.seed)
        learned = [info["name"] for info in self.store.tasks]
        again = [task.name for task in tasks if task.name in learned]
        if again:
            raise ValueError(f"This ConDU already learned {again} (stored tasks {[learned.index(n) for n in again]}): "
                             "a second task of the same name would be voted for as another. Give new tasks new "
                             "names.")
        self.first_route = self.store.num_tasks  # a continued save's tasks keep their routes; new ones follow

    def lora_config(self):
        return lora_config(self.arguments.lora_target_list, self.rank, self._base_name())

    def _base_name(self) -> Optional[str]:
        return getattr(self.model, "name_or_path", None) or None

    def begin_task(self, context, index, task) -> None:
        model = copy.deepcopy(self.model)
        if self.lora:  # every task starts from the same draw, as every official session (one process, seed 42) does
            start = draw_factors(self.store.shapes, self.arguments.condu_lora_init_std, context.seed + 1)
            model = lora_model(model, self.lora_config(), start)
        else:
            for name, param in model.named_parameters():
                param.requires_grad_(name != "logit_scale")
        self._training, self._fixed = model, None
        if task.full_train_dataset is not None and self.arguments.condu_few_shot_augment == "once":
            collate = context.collator(augmented=True)  # the task's seed: every process draws the same crops
            self._fixed = [{"pixel_values": collate([example])["pixel_values"][0], "label": example["label"]}
                           for example in task.train_dataset]

    def training_model(self):
        return self._training

    def training_dataset(self, task):
        return task.train_dataset if self._fixed is None else self._fixed

    def end_task(self, context, index, task) -> None:
        model, self._training, self._fixed = self._training, None, None
        if self.lora:
            tuned, origin = trained_factors(model), self.store.origin
        else:
            tuned, origin = model.state_dict(), self.model.state_dict()
        delta = {n: tuned[n].float().cpu() - origin[n].float().cpu() for n in self.store.shapes}
        info = {"name": task.name, "classnames": list(task.classnames), "templates": list(task.templates)}
        self.store.add_task(delta, self._prototype_means(context, task), info)
        self._deltas = {}

    def _prototype_loader(self, context, task):
        """The prototypes' images: the whole training set through the training augmentation (official), or the task's
        training images as evaluated."""
        if self.arguments.condu_prototype_images == "plain":
            return context.loader(task.train_dataset)
        whole = task.full_train_dataset if task.full_train_dataset is not None else task.train_dataset
        return context.loader(whole, augmented=True)

    @torch.no_grad()
    def _prototype_means(self, context, task) -> dict[str, torch.Tensor]:
        """Per class, the mean unit image feature of the pretrained CLIP over the training images
        (`condu_prototype_images`) and the mean unit text feature over its templates. An evaluation-only task (no
        training split, max_steps=0) has no images: its classes keep their text means, as classes without images do."""
        device = context.device
        loader = self._prototype_loader(context, task) if task.train_dataset is not None else []
        gathered = [context.gather((image_embeddings(self.model, batch["pixel_values"].to(device)),
                                    batch["labels"].to(device)))
                    for batch in context.progress(loader, f"prototypes of {task.name}")]
        text = text_embeddings(self.model, context.tokenizer, task.classnames, task.templates, device,
                               normalise=False)
        features = torch.cat([f for f, _ in gathered]) if gathered else text.new_zeros(0, text.shape[-1])
        labels = torch.cat([lab for _, lab in gathered]) if gathered else torch.zeros(0, dtype=torch.long,
                                                                                       device=device)
        classes = len(task.classnames)
        sums = torch.zeros(classes, features.shape[-1], device=device).index_add(0, labels, features)
        counts = torch.bincount(labels, minlength=classes).clamp(min=1).unsqueeze(-1)
        return {"image_mean": (sums / counts).cpu(), "text_mean": text.cpu()}

    # ----- classification ------------------------------------------------------------------------------------------
    def task_delta(self, task: int) -> Delta:
        """Task `task`'s rebuilt delta, in the store's space (LoRA factors, or weights)."""
        if task not in self._deltas:
            self._deltas[task] = self.store.task_delta(task)
        return self._deltas[task]

    def task_weight_delta(self, task: int) -> Delta:
        """What task `task`'s model adds to the pretrained weights."""
        delta = self.task_delta(task)
        if not self.lora:
            return delta
        return weight_delta({n: self.store.origin[n] + d for n, d in delta.items()}, lora_scaling(self.rank))

    def acting_as(self, route: int):
        return applied_delta(self.model, None if route == ZERO_SHOT else self.task_weight_delta(route))

    def unseen_route(self, index: int) -> Optional[int]:
        return None if self.arguments.condu_unseen_tasks == "vote" else ZERO_SHOT

    def cell_route(self, row: int, column: int) -> Optional[int]:
        if (row, column) == (0, 0) and self.arguments.condu_first_cell == "pretrained":
            return ZERO_SHOT
        return super().cell_route(row, column)

    def vote(self, image_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image, the top-K learned tasks by best prototype similarity and those similarities."""
        prototypes = [prototype_vectors(means, self.arguments.condu_prototypes) for means in self.store.prototypes]
        top_k = self.arguments.condu_top_k
        if 0 < len(prototypes) < top_k and not self._vote_capped_logged:
            self._vote_capped_logged = True
            logger.warning("ConDU votes for all %d task(s) learned so far, not condu_top_k=%d, while fewer are "
                           "learned (logged once).", len(prototypes), top_k)
        return vote(image_features, prototypes, top_k)

    def choose_routes(self, classifier, pixels, untouched=None, unit=None):
        """The pretrained model and the top-K voted task models, their outputs fused (`condu_fusion`) with equal
        weights 1/(K+1) (official) or, with `condu_weighting="similarity"`, the task models sharing K/(K+1) by the
        softmax of their similarities; voting with the pretrained embeddings `untouched` when given."""
        if unit is not None:
            raise NotImplementedError("ConDU votes per image; it has no per-batch decision.")
        pretrained = image_embeddings(self.model, pixels) if untouched is None else untouched
        similarity, voted = self.vote(pretrained)
        k = voted.shape[1]
        if self.arguments.condu_weighting == "uniform":
            task_weights = torch.full_like(similarity, 1.0 / (k + 1))
        else:
            task_weights = torch.softmax(similarity, dim=-1) * k / (k + 1)
        ids = torch.cat([torch.full_like(voted[:, :1], ZERO_SHOT), voted], dim=1)
        weights = torch.cat([torch.full_like(similarity[:, :1], 1.0 / (k + 1)), task_weights], dim=1)
        return ImageRoutes(ids, weights, fusion=self.arguments.condu_fusion, selected=voted[:, 0]), pretrained

    def learned_tasks(self) -> dict[int, dict]:
        return {task: dict(info) for task, info in enumerate(self.store.tasks)}

    def diagnostics(self) -> dict:
        sizes = self.store.storage_bytes()
        if self.lora:  # against merging each task's LoRA into its own full weight delta
            weights = sum(self.model.get_submodule(layer).weight.numel() for layer in lora_layers(self.store.shapes))
            sizes["one_weight_delta_per_task"] = 4 * weights * self.store.num_tasks
        return {"condu": {"rescalers": list(self.store.rescalers), "storage_bytes": sizes}}

    # ----- checkpoints ---------------------------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """The complete publishable folder: the unified model (a peft LoRA adapter, or the unified weight delta)
        and the task triggers (see `hf_moe_cl.condu.checkpoint`)."""
        header = {"options": dataclasses.asdict(self.arguments), "rank": self.rank,
                  "base_model_name_or_path": self._base_name(), "base_weights": base_weights_record(self.model)}
        save_folder(folder, self.store, model_fingerprint(self.model), header,
                    self.lora_config() if self.lora else None)

    def load(self, folder: Path) -> None:
        """A save of this base model, made with the same training options (another model's save, or one trained
        with other options, is a clear error)."""
        store, header = load_folder(folder, model_fingerprint(self.model))
        arguments, rank = _saved_settings(Path(folder), header)
        if header.get("base_weights") is not None:  # saves of <= 0.3 have no record
            check_base(header["base_weights"], self.model, f"the ConDU save in {folder}",
                       "Load it on the base model it was trained from"
                       + (f" ({header['base_model_name_or_path']!r})" if header.get("base_model_name_or_path") else "")
                       + "; to use it on this one on purpose, set `base_weights` to null in its condu_config.json.")
        saved = dict(dataclasses.asdict(arguments), rank=rank)
        ours = dict(dataclasses.asdict(self.arguments), rank=self.rank)
        differ = [k for k in _TRAINING_OPTIONS + (_LORA_OPTIONS if self.lora else ()) if saved[k] != ours[k]]
        if differ:
            raise ValueError(f"The ConDU save in {folder} was trained with "
                             + ", ".join(f"{k}={saved[k]!r}" for k in differ) + "; this ConDU has "
                             + ", ".join(f"{k}={ours[k]!r}" for k in differ) + ". Use the same options.")
        if self.arguments.condu_prototypes == "fused":
            textless = [t for t, means in enumerate(store.prototypes) if "text_mean" not in means]
            if textless:
                raise ValueError(f"The ConDU save in {folder} holds no text prototypes (text_mean) for task(s) "
                                 f"{textless}, which condu_prototypes='fused' votes with; use "
                                 "condu_prototypes='image'.")
        if self.lora:
            self._check_adapter_config(Path(folder))
            expected = factor_shapes(self.model, self.arguments.lora_target_list, self.rank)
            if dict(store.shapes) != expected:
                raise ValueError(f"The LoRA factors in {folder} do not fit this model's "
                                 f"{self.arguments.condu_lora_targets} layers; load the save on the base model it was "
                                 "trained from.")
        self.store = store
        self._deltas = {}

    def _check_adapter_config(self, folder: Path) -> None:
        """The save's adapter_config.json describes the LoRA its factors were trained with (the one `lora_config`
        gives), so `PeftModel.from_pretrained` on the folder builds the model this loader does."""
        path = folder / "adapter_config.json"
        saved = read_json_file(path) if path.is_file() else None
        expected = self.lora_config().to_dict()

        def plain(value):
            value = getattr(value, "value", value)  # peft_type: an enum in the config, a string in the file
            return sorted(value) if isinstance(value, (list, set, tuple)) else value

        if not isinstance(saved, dict):
            raise ValueError(f"{path} is missing or not a JSON object: the ConDU save is incomplete. {FIX}")
        differ = [key for key in SHAPING_LORA_KEYS if key in saved and plain(saved[key]) != plain(expected.get(key))]
        if differ:
            given = ", ".join(f"{key}={plain(saved[key])!r}" for key in differ)
            trained = ", ".join(f"{key}={plain(expected.get(key))!r}" for key in differ)
            raise ValueError(f"{path} gives {given}, not the LoRA the save's factors were trained with ({trained}): "
                             f"PeftModel.from_pretrained on the folder would build another model. {FIX}")


def _saved_settings(folder: Path, header: dict) -> tuple[ConDUArguments, int]:
    """The options and LoRA rank a save was trained with, checked as the same values given in code are; a refusal
    names the file."""
    path = folder / CONFIG_FILE
    fields = {f.name for f in dataclasses.fields(ConDUArguments)}
    options, base = header.get("options"), header.get("base_model_name_or_path")
    if isinstance(options, dict) and set(options) - fields:
        raise ValueError(f"{path} has options this version does not know ({sorted(set(options) - fields)}); it was "
                         "written by a newer hf-moe-cl: upgrade it.")
    try:
        missing = [key for key in ("options", "rank") if key not in header]
        if missing:
            raise ValueError(f"it lacks {missing}")
        if not isinstance(options, dict):
            raise ValueError(f"`options` must be an object, got {short_repr(options)}")
        if fields - set(options):
            raise ValueError(f"`options` lacks {sorted(fields - set(options))}")
        if base is not None and not isinstance(base, str):
            raise ValueError(f"base_model_name_or_path is {short_repr(base)}, not a model name or folder")
        if header.get("base_weights") is not None and record_problem(header["base_weights"]):
            raise ValueError(f"`base_weights` {record_problem(header['base_weights'])}")
        check_option("rank", header["rank"], int, low=1)
        arguments = ConDUArguments(**options)
        if (arguments.condu_fine_tune, arguments.condu_rescaler) != (header["fine_tune"], header["rule"]):
            raise ValueError(f"its options say condu_fine_tune={arguments.condu_fine_tune!r}, condu_rescaler="
                             f"{arguments.condu_rescaler!r} but its tensors were saved with fine_tune="
                             f"{header['fine_tune']!r}, rule={header['rule']!r}")
        return arguments, header["rank"]
    except ValueError as error:
        raise ValueError(f"{path} is damaged or was edited: {str(error).rstrip('.')}. {FIX}") from None
