"""Every list of methods and models derives from its registry: a method and a model family registered at run time,
with no other edit, reach the demo sweep, the FLOPs count, the latency benchmark and the tables."""
from __future__ import annotations

import re

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from transformers import LlavaConfig, LlavaForConditionalGeneration

from visiondrop.core import Checkpoint, ModelInfo
from visiondrop.efficiency.flops import checkpoint_dims, method_flops, schedule
from visiondrop.efficiency.latency import benchmark
from visiondrop.engine import DecoderCut, Policy, Selection
from visiondrop.families import FAMILIES, checkpoints, family_by_type
from visiondrop.families.llava import LLAVA_7B_SHAPE, LLAVA_HF_IDS, Llava
from visiondrop.harness.app import register_resolvers
from visiondrop.harness.store import ResultStore
from visiondrop.harness.tables import build_table, plot_scores
from visiondrop.methods import METHODS, Method, method

from test_harness import ROOT
from test_tables import record


class FirstTokens(Policy):
    """Keeps the first `keep` visual tokens before decoder layer 0: the simplest method there is."""

    name = "first_tokens"
    cut_layers = (0,)

    def __init__(self, info: ModelInfo, keep: int):
        self.info, self.keep = info, keep

    def select_decoder(self, cut: DecoderCut) -> Selection:
        keep = cut.scaled(self.keep, self.info.n_visual)
        return Selection(torch.arange(keep, device=cut.visual.device).expand(len(cut.samples), -1))

    def describe(self) -> dict:
        return {"method": self.name, "keep": self.keep, "equivalent_tokens": self.keep}


METHOD = Method("first_tokens", "First tokens", lambda info, budget: FirstTokens(info, round(budget)),
                smallest_budget=lambda info: 1, scoring=lambda **_: {"decoder": "random"})


class ThrowawayConfig(LlavaConfig):
    model_type = "throwaway_llava"


class ThrowawayModel(LlavaForConditionalGeneration):
    config_class = ThrowawayConfig


class Throwaway(Llava):
    """LLaVA-1.5 under another model type: a family that exists only in this test."""

    model_class = ThrowawayModel
    config_class = ThrowawayConfig
    checkpoints = (Checkpoint("throwaway-7b", "nobody/throwaway-7b", "throwaway_llava", LLAVA_7B_SHAPE, LLAVA_HF_IDS,
                              1e-5, budget=64, paper="Throwaway-7B"),)


THROWAWAY = Throwaway()


@pytest.fixture
def registered(monkeypatch):
    """The method and the family, registered the way a contributor registers them: one line each."""
    monkeypatch.setitem(METHODS, "first_tokens", __name__)
    monkeypatch.setitem(FAMILIES, "throwaway_llava", f"{__name__}:THROWAWAY")
    method.cache_clear()
    yield
    method.cache_clear()


def test_the_demo_sweep_takes_every_registered_method(registered):
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", ["experiment=demo"], return_hydra_config=True)
    assert cfg.hydra.sweeper.params["method.name"].split(",") == [m for m in METHODS if not method(m).video_only]
    assert "first_tokens" in METHODS


def test_flops_count_the_new_method_on_the_new_family(registered):
    assert "throwaway-7b" in checkpoints() and family_by_type("throwaway_llava") is THROWAWAY
    dims = checkpoint_dims("throwaway-7b")
    assert dims.model_type == "throwaway_llava" and dims.n_visual == 576
    assert schedule(dims, "first_tokens", 64).tokens_per_layer == (64,) * 32  # measured on a throwaway proxy
    same_sizes = method_flops("llava-1.5-7b", "first_tokens", 64).total
    assert method_flops("throwaway-7b", "first_tokens", 64).total == same_sizes
    assert same_sizes < method_flops("throwaway-7b", "none").total


def test_latency_measures_the_new_method_on_the_new_family(registered):
    result = benchmark("throwaway-7b", width="tiny", device="cpu", methods=["first_tokens"], batch_sizes=[1],
                       new_tokens=2, warmup=0, repeats=1, out=None)
    rows = {row.method: row for row in result.rows}
    assert set(rows) == {"none", "first_tokens"} and rows["first_tokens"].status == "ok"
    assert rows["first_tokens"].tokens == 64 and rows["none"].tokens == 576
    assert 0 < rows["first_tokens"].tflops < rows["none"].tflops


def test_tables_name_the_new_method_and_model(registered, tmp_path):
    store = ResultStore(tmp_path / "runs")
    for r in (record("none", None, "GQA", 60.0, 576), record("first_tokens", 64.0, "GQA", 40.0, 64)):
        store.write({**r, "model": "throwaway-7b"})
    paper = tmp_path / "paper.csv"
    pd.DataFrame([["Table1_Throwaway-7B", "Throwaway-7B", "First tokens", 64, "GQA", 41.0]],
                 columns=["table", "model", "method", "tokens", "benchmark", "value"]).to_csv(paper, index=False)
    table, _ = build_table(store.frame(), paper, "throwaway-7b")
    assert ("First tokens", 64.0) in table.index
    assert plot_scores(table, tmp_path / "curve.png").stat().st_size > 0


def test_the_readme_is_a_front_page_that_lists_every_method_and_family():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    assert set(re.findall(r"^\| `(\w+)` \|", readme, re.M)) == set(METHODS)
    header = next(line for line in readme.splitlines() if line.startswith("| method |"))
    assert header.count("|") - 3 == len(FAMILIES)  # one column per family
    for link in re.findall(r"`((?:docs/|CONTRIBUTING)[\w/.-]*\.md)`", readme):
        assert (ROOT / link).exists(), link


def test_a_model_has_one_name_in_configs_records_and_checkpoints():
    """`model=<name>` selects the config that files its records under <name>, the name the FLOPs count, the
    latency benchmark and the tables use for a registered checkpoint."""
    import yaml

    names = {}
    for path in sorted((ROOT / "configs" / "model").glob("*.yaml")):
        names[path.stem] = yaml.safe_load(path.read_text())["name"]
    assert all(stem == name for stem, name in names.items()), names
    assert set(checkpoints()) <= set(names)


def test_the_contract_reaches_the_new_method_on_the_new_family(registered, tmp_path):
    """The contract's own properties, on the family's tiny model (built from the registry alone) with the images its
    adapter declares, at both its settings (`Method.examples`): batch == each sample alone, cached decoding ==
    replay."""
    from test_contract import batch_images, test_batch_equals_each_sample_alone_and_cache_equals_replay
    from visiondrop.testing.tiny import build_tiny

    folder = build_tiny("throwaway_llava", tmp_path / "throwaway", seed=0)  # transformers' Auto classes know no
    model = ThrowawayModel.from_pretrained(folder, dtype=torch.float32).eval()  # such type
    processor = THROWAWAY.load_processor(folder)
    processor.tokenizer.padding_side = "left"
    host = (model, processor, batch_images("throwaway_llava"))
    for which in range(len(METHOD.examples)):
        test_batch_equals_each_sample_alone_and_cache_equals_replay(host, "first_tokens", which)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml")))
def test_every_experiment_composes_with_the_configs_it_sweeps(experiment):
    """An experiment names models, benchmarks and method configs by hand in places: each must exist (a renamed
    model config once left `experiment=video_methods` unable to start)."""
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", [f"experiment={experiment}"], return_hydra_config=True)
        params = cfg.hydra.sweeper.params or {}
        for name in str(params.get("method", "")).split(",") if "method" in params else []:
            swept = compose("config", [f"experiment={experiment}", f"method={name}"])
            assert swept.method.name in METHODS, (experiment, name)
    assert cfg.model.pretrained and cfg.benchmarks
