"""MoE-Adapters' options around each task (`MoEAdaptersArguments`), and the one rule of which of them the others
leave idle (`idle_options`): code and the command line refuse an idle option by it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ...options import check_flags, check_option, moved_options
from ...tuners.moe_lora.experts import COVERAGE

ADAPTER_SETTINGS = ("it is a setting of the adapter: MoELoraConfig({name}=...) (MoEAdapters.from_base takes a "
                    "MoELoraConfig among its options; a model given to MoEAdapters keeps its own)")
FREEZE_OPTIONS = ("freeze_experts_per_task", "freeze_policy", "freeze_coverage", "freeze_images")


def spelled_in_code(name: str, value: Any = None) -> str:
    """An option as code gives it: `name`, or `name=value`."""
    return name if value is None else f"{name}={value!r}"


def idle_options(options, spell: Callable[..., str] = spelled_in_code) -> dict[str, str]:
    """The options of `options` (MoE-Adapters' options, or any object with their names) that its other options leave
    without effect -> why; `spell(name, value=None)` writes the option that makes them idle (the command line:
    `--name value`)."""
    idle = {}
    if options.shared_router:
        idle.update(dict.fromkeys(FREEZE_OPTIONS, f"{spell('shared_router', True)} freezes no expert (one router "
                                                  "learns every task)"))
    else:
        coverage = options.freeze_policy == "coverage"
        idle.update(dict.fromkeys(("freeze_experts_per_task",) if coverage else ("freeze_coverage", "freeze_images"),
                                  f"an option of the other {spell('freeze_policy')} than {options.freeze_policy}"))
    if not options.routing_report:
        idle["routing_report_images"] = f"{spell('routing_report', False)} writes no routing report"
    return idle


@moved_options(**{name: ADAPTER_SETTINGS.format(name=name) for name in (
    "num_experts", "top_k", "noisy_gating", "noisy_gating_eval", "expert_growth_threshold")})
@dataclass
class MoEAdaptersArguments:
    """MoE-Adapters' options around each task; the adapter's own settings are its `MoELoraConfig`'s."""

    freeze_experts_per_task: Optional[int] = field(default=None, metadata={
        "help": "Activate-freeze: experts frozen per layer after each task (default top_k; 0 disables)."})
    freeze_policy: str = field(default="top_k", metadata={
        "help": "Activate-freeze rule: 'top_k' (the paper: the k experts selected most in training) or 'coverage' "
                "(the experts that carry the task's evaluation-time routing of its training images and prompts, up to "
                "`freeze_coverage` of it; 1.0 makes the task's predictions on them final)."})
    freeze_coverage: float = field(default=1.0, metadata={
        "help": "freeze_policy='coverage': share of the task's selections to freeze."})
    freeze_images: Optional[int] = field(default=None, metadata={
        "help": "freeze_policy='coverage': training images whose routing is covered (None: all of them)."})
    routing_report: bool = field(default=True, metadata={
        "help": "After each task, measure for every learned task the share of its evaluation-time expert selections "
                "that fall on experts it did not freeze (diagnostics['routing_report'])."})
    routing_report_images: int = field(default=256, metadata={
        "help": "Training images per learned task used by the routing report."})
    merge_experts_every: int = field(default=0, metadata={
        "help": "Expert merging every N steps of a task (Park, 2024: 100); 0 disables."})
    shared_router: bool = field(default=False, metadata={
        "help": "Route every task through router 0 and never freeze (the paper's class-incremental setup)."})
    relearn_tasks: bool = field(default=False, metadata={
        "help": "Continuing a trained model: a task named like one it learned gets a new router of its own (the "
                "learned one stays frozen); by default such a task is refused."})
    # False for the command line's parse (`experiments.experiment.CommandLineMoEAdaptersArguments`): it refuses the
    # idle options it was given itself (at their defaults too), by the same `idle_options`, with the others it ignores
    refuses_idle_options = True

    def __post_init__(self):
        check_option("freeze_experts_per_task", self.freeze_experts_per_task, int, low=0, optional=True)
        check_option("freeze_policy", self.freeze_policy, str, choices=("top_k", "coverage"))
        check_option("freeze_coverage", self.freeze_coverage, float, **COVERAGE)
        check_option("freeze_images", self.freeze_images, int, low=1, optional=True)
        check_option("routing_report_images", self.routing_report_images, int, low=1)
        check_option("merge_experts_every", self.merge_experts_every, int, low=0)
        check_flags(self, ["routing_report", "shared_router", "relearn_tasks"])
        if self.refuses_idle_options:
            self._check_idle_options()

    def _check_idle_options(self) -> None:
        """Refuse an idle option (`idle_options`) given a value that asks for something (not its default): it would be
        ignored."""
        unasked = {f.name: [f.default] for f in dataclasses.fields(self)}  # values that ask for nothing
        if self.shared_router:  # 0 (no freezing) asks what shared_router does; the class-incremental recipe gives both
            unasked["freeze_experts_per_task"].append(0)
        given = {name: why for name, why in idle_options(self).items() if getattr(self, name) not in unasked[name]}
        if given:
            them = "it" if len(given) == 1 else "them"
            raise ValueError("MoEAdaptersArguments: " + "; ".join(
                f"{name}={getattr(self, name)!r} has no effect: {why}" for name, why in given.items())
                + f". Leave {them} at the default, or change the option that makes {them} idle; nothing is ignored "
                "silently.")
