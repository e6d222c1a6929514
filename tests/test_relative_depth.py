"""Cut layers given for LLaVA-7B's 32-layer decoder map onto shallower decoders by relative depth, for every method."""
from dataclasses import replace

import pytest

from helpers import inputs, measure_counts
from visiondrop.families import ModelInfo

FOUR = ModelInfo(n_visual=576, n_layers=4, vision_layer=22, cls_kept=False)


def test_mapping_rounds_by_depth_and_keeps_cuts_distinct():
    assert replace(FOUR, n_layers=32).relative_layers([2, 8, 16], "x") == (2, 8, 16)  # identity on 32 layers
    assert replace(FOUR, n_layers=40).relative_layers([2, 8, 16], "x") == (2, 10, 20)
    assert replace(FOUR, n_layers=16).relative_layers([8, 16, 24], "x") == (4, 8, 12)
    assert FOUR.relative_layers([8, 16, 24], "x") == (1, 2, 3)
    assert FOUR.relative_layers([2, 8, 16], "x") == (1, 2, 3)  # 0.25, 1, 2: raised to stay distinct and >= 1
    assert FOUR.relative_layers([2, 6, 15], "x", lowest=0, spare=1) == (0, 1, 2)
    assert FOUR.relative_layers([2], "x") == (1,)
    with pytest.raises(ValueError, match=r"x \[2, 8, 16, 24\] do not fit this 4-layer decoder"):
        FOUR.relative_layers([2, 8, 16, 24], "x")
    with pytest.raises(ValueError, match="x must be one or more increasing layers from 1 to 31"):
        FOUR.relative_layers([8, 8], "x")


@pytest.mark.parametrize("method,budget,options,expected", [
    ("visiondrop", 64, {}, [96, 70, 52, 38]),  # cuts 8/16/24 -> 1/2/3
    ("fastv", 192, {}, [576, 64, 64, 64]),  # k=2 -> 1: (4*192 - 576) / 3
    ("dart", 192, {}, [576, 68, 68, 68]),  # k=2 -> 1: 4 image pivots + 8 x round(60 / 8)
    ("pyramiddrop", None, {"decay": 0.5}, [576, 288, 144, 72]),  # [2, 8, 16] -> [1, 2, 3]
    ("pyramiddrop", None, {"decay": 0.5, "layer_list": [8, 16, 24]}, [576, 288, 144, 72]),
])
def test_measured_counts_follow_the_mapped_layers(tiny_shallow, method, budget, options, expected):
    model, processor = tiny_shallow
    measured, handle = measure_counts(model, inputs(processor, ["What is here?"]), method, budget, **options)
    assert measured == expected
    assert handle.trace.tokens_per_layer == [measured]


def test_sparsevlm_prunes_at_the_output_of_the_mapped_layers(tiny_shallow):
    model, processor = tiny_shallow
    measured, _ = measure_counts(model, inputs(processor, ["What is here?"]), "sparsevlm", keep_lists=[300, 200, 100],
                                 recycle=False)
    assert measured == [576, 300, 200, 100]  # [2, 6, 15] -> [0, 1, 2]: pruned after each
