"""Every deprecated alias of 0.3 (moved modules, moved names, moved options, renamed methods) still works for one
minor version and emits a FutureWarning naming the new place."""

import importlib
import sys

import pytest

from hf_moe_cl.legacy import MOVED_MODULES


@pytest.mark.parametrize("old, new", sorted(MOVED_MODULES.items()))
def test_a_moved_module_imports_under_its_old_name_with_a_future_warning(old, new, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(FutureWarning, match=f"{old} moved to {new}; the old name goes in hf-moe-cl 0.4"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)


@pytest.mark.parametrize("name, new", [("DistributionSelector", "hf_moe_cl.ddas"), ("SelectorConfig", "hf_moe_cl.ddas"),
                                       ("upgrade_adapter_folder", "hf_moe_cl.legacy")])
def test_a_moved_name_is_found_at_its_old_place_with_a_future_warning(name, new):
    import hf_moe_cl.tuners.moe_lora as old

    with pytest.warns(FutureWarning, match=f"hf_moe_cl.tuners.moe_lora.{name} moved to {new}.{name}"):
        assert getattr(old, name) is getattr(importlib.import_module(new), name)


@pytest.mark.parametrize("name", ["training_hyperparameters", "base_license", "library_versions", "CITATIONS"])
def test_the_cards_parts_are_found_in_publishing_with_a_future_warning(name):
    import hf_moe_cl.publishing as old

    with pytest.warns(FutureWarning, match=f"hf_moe_cl.publishing.{name} moved to hf_moe_cl.continual.card.{name}"):
        assert getattr(old, name) is getattr(importlib.import_module("hf_moe_cl.continual.card"), name)


def test_moved_options_and_the_renamed_method_warn():
    from conftest import moe_model

    from hf_moe_cl.continual.methods import DDASArguments, MoEAdapters, MoEAdaptersArguments

    with pytest.warns(FutureWarning, match=r"MoEAdaptersArguments\(num_experts=...\) is deprecated .* 0.4"):
        assert MoEAdaptersArguments(num_experts=4).moved == {"num_experts": 4}
    with pytest.warns(FutureWarning, match=r"DDASArguments\(ddas_hidden_dim=...\) is deprecated .*SelectorConfig"):
        DDASArguments(ddas_hidden_dim=8)
    method = MoEAdapters(moe_model())
    with pytest.warns(FutureWarning, match=r"routed\(\) is now acting_as\(\)"):
        with method.routed(0):
            pass
