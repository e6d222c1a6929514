"""VisionDrop's schedule from knobs (first_stage, contextual_fraction, stages): the official numbers by default, the
budget met for every accepted combination (counted with forward pre-hooks), a clear error for the others."""
import pytest

import visiondrop
from helpers import inputs, measure_counts
from visiondrop.families import ModelInfo
from visiondrop.methods.visiondrop import Schedule, Stage, schedule_for_budget
from visiondrop.testing.tiny import build_tiny, load_tiny

LLAVA_15 = ModelInfo(n_visual=576, n_layers=32, vision_layer=22, cls_kept=False)
NEXT = ModelInfo(n_visual=2880, n_layers=32, vision_layer=22, cls_kept=False, crops=5)
DEMO = ModelInfo(n_visual=576, n_layers=4, vision_layer=2, cls_kept=False)


def official(encoder, *stages, layers=(8, 16, 24)) -> Schedule:
    return Schedule(Stage(*encoder), tuple(zip(layers, (Stage(*s) for s in stages))))


# methods.md 1(f): the official 32-token schedule scaled by budget/32; on NeXT per crop, budget/5
OFFICIAL = {192: official((252, 36), (180, 30), (132, 24), (96, 18)),
            128: official((168, 24), (120, 20), (88, 16), (64, 12)),
            64: official((84, 12), (60, 10), (44, 8), (32, 6)),
            32: official((42, 6), (30, 5), (22, 4), (16, 3))}


@pytest.mark.parametrize("budget", [192, 128, 64, 32])
def test_defaults_are_the_official_schedule(budget):
    assert schedule_for_budget(budget, LLAVA_15) == OFFICIAL[budget]
    assert schedule_for_budget(budget * 5, NEXT) == OFFICIAL[budget]  # 960/640/320/160 on NeXT: per crop
    demo = OFFICIAL[budget]
    assert schedule_for_budget(budget, DEMO) == Schedule(demo.encoder, tuple(
        (layer, stage) for layer, (_, stage) in zip((1, 2, 3), demo.cuts)))


def test_explicit_knobs_at_their_defaults_are_the_defaults():
    assert schedule_for_budget(64, LLAVA_15, first_stage=1.5, contextual_fraction=None, stages="both") == OFFICIAL[64]


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory):
    """A decoder whose mapped cuts (2, 3, 4 of 6) make segments of unequal length (2, 1, 1, 2 layers)."""
    return load_tiny(build_tiny("llava", tmp_path_factory.mktemp("six") / "llava", seed=0, text_layers=6))


GRID = [{}, {"first_stage": 1.0}, {"first_stage": 2.0}, {"first_stage": 3.0}, {"first_stage": 3.75},
        {"contextual_fraction": 0.0}, {"contextual_fraction": 0.25}, {"contextual_fraction": 0.5},
        {"first_stage": 2.5, "contextual_fraction": 0.3}, {"stages": "encoder"}, {"stages": "encoder",
        "contextual_fraction": 0.0}, {"stages": "decoder"}, {"stages": "decoder", "contextual_fraction": 0.2}]


@pytest.mark.parametrize("knobs", GRID, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "defaults")
@pytest.mark.parametrize("budget", [64, 100, 150])
def test_measured_mean_is_the_budget(tiny, knobs, budget):
    model, processor = tiny
    counts, handle = measure_counts(model, inputs(processor, ["What is in the image?"]), "visiondrop", budget,
                                    **knobs)
    assert abs(sum(counts) / len(counts) - budget) <= 1, counts
    schedule = handle.policy.schedule
    if knobs.get("stages") == "encoder":
        assert schedule.cuts == () and set(counts) == {schedule.encoder.total}
    elif knobs.get("stages") == "decoder":
        assert schedule.encoder is None and counts[:2] == [576, 576] and handle.policy.cut_layers == (2, 8, 16)
    else:
        assert counts[0] == schedule.encoder.total == pytest.approx(knobs.get("first_stage", 1.5) * budget, abs=1)
        assert handle.policy.cut_layers == (8, 16, 24)
    if knobs.get("contextual_fraction") is not None:  # the share of merged tokens in every stage
        stages = [schedule.encoder] * (schedule.encoder is not None) + [s for _, s in schedule.cuts]
        assert all(abs(s.contextual - knobs["contextual_fraction"] * s.total) <= 1 for s in stages)


@pytest.mark.parametrize("knobs", [{}, {"first_stage": 2.5}, {"first_stage": 1.0, "contextual_fraction": 0.5},
                                   {"stages": "decoder"}])
@pytest.mark.parametrize("budget", [150, 220])
def test_measured_mean_is_the_budget_on_unequal_segments(six_layers, knobs, budget):
    model, processor = six_layers
    counts, _ = measure_counts(model, inputs(processor, ["What is in the image?"]), "visiondrop", budget, **knobs)
    assert abs(sum(counts) / len(counts) - budget) <= 1, counts


def test_first_stage_follows_the_paper_rule_and_bends_the_later_stages():
    stages = lambda s: [s.encoder.total] + [st.total for _, st in s.cuts]  # noqa: E731
    assert stages(schedule_for_budget(64, LLAVA_15)) == [96, 70, 52, 38]  # 1.5x, then the official shape
    assert stages(schedule_for_budget(64, LLAVA_15, first_stage=3)) == [192, 28, 21, 15]  # shrunk by one factor
    assert stages(schedule_for_budget(64, LLAVA_15, first_stage=1)) == [64, 64, 64, 64]  # flattened: no reduction
    assert stages(schedule_for_budget(64, LLAVA_15, stages="encoder")) == [64]


@pytest.mark.parametrize("knobs,message", [
    ({"first_stage": 4}, r"first_stage must be at least 1 .* and below 4 \(the 8 decoder layers before the first cut"),
    ({"first_stage": 0.5}, r"first_stage must be at least 1"),
    ({"first_stage": 3.5, "budget": 180}, r"cannot reach budget 180 .*first_stage=3.5: budgets between 1 and 164"),
    ({"stages": "decoder", "budget": 30}, r"stages='decoder'.* before the first cut \(layer 2\), so budgets above 36"),
    ({"stages": "encoder", "first_stage": 2}, r"stages='encoder' makes no decoder cut"),
    ({"stages": "decoder", "first_stage": 2}, r"stages='decoder' keeps all the visual tokens .* first_stage does not"),
    ({"stages": "pyramid"}, r"stages must be one of \('both', 'encoder', 'decoder'\)"),
    ({"contextual_fraction": 1.0}, r"contextual_fraction .* in \[0, 1\)"),
])
def test_unreachable_combinations_name_the_reachable_range(knobs, message):
    budget = knobs.pop("budget", 64)
    with pytest.raises(ValueError, match=message):
        schedule_for_budget(budget, LLAVA_15, **knobs)


def test_explicit_schedule_still_works_and_excludes_the_knobs(tiny):
    model, _ = tiny
    spec = {"encoder": [84, 12], "layers": [8, 16, 24], "decoder": [[60, 10], [44, 8], [32, 6]]}
    with visiondrop.apply(model, "visiondrop", schedule=spec) as handle:
        assert handle.policy.schedule == OFFICIAL[64]
    with pytest.raises(ValueError, match="explicit schedule= fixes every count"):
        visiondrop.apply(model, "visiondrop", schedule=spec, stages="encoder")
