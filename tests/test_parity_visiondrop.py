"""VisionDrop against the official implementation, number for number (../shared/reference/parity/visiondrop)."""
import pytest

import visiondrop
from parity import assert_matches_official, load_case, parity_inputs


def official_kept_originals(case: dict) -> list[list[int]]:
    """The original patch indices kept unmerged at every cut of the official run (CLS and merged tokens left out)."""
    enc = case["encoder"]
    cls_and_patches = [i - 1 for i in enc["kept_dominant_indices_sorted"]]  # 577-space -> patch index, CLS -> -1
    kept = [[i for i in cls_and_patches if i >= 0]]
    block = cls_and_patches + [-1] * enc["contextual"]
    for stage in case["llm_stages"]:
        chosen = [block[i] for i in stage["kept_dominant_indices_sorted"]]
        kept.append([i for i in chosen if i >= 0])
        block = chosen + [-1] * stage["contextual"]
    return kept


def test_unpruned_matches_official(parity_model):
    official, logits = load_case("visiondrop", "none")
    with visiondrop.apply(parity_model, "none") as handle:
        assert_matches_official(parity_model, parity_inputs(), official, logits, handle)


@pytest.mark.parametrize("how", ["budget", "schedule"])
def test_visiondrop_32_matches_official(parity_model, how):
    official, logits = load_case("visiondrop", "vd32")
    s = official["settings"]
    options = {"budget": 32} if how == "budget" else {
        "schedule": {"encoder": [s["dominant"], s["contextual"]], "layers": s["layer_list"],
                     "decoder": s["image_token_list"]}}
    with visiondrop.apply(parity_model, "visiondrop", **options) as handle:
        assert_matches_official(parity_model, parity_inputs(), official, logits, handle)
        assert handle.trace.cuts == ["encoder", "layer 8", "layer 16", "layer 24"]
        assert [k.tolist() for k in handle.trace.kept[0]] == official_kept_originals(official)
