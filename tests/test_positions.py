"""Positional-bias maps: the bias statistic by hand, the families' patch cells, the plugin's per-sample collection
and the position_bias experiment end to end on the demo setup."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
from lmms_eval.api.instance import Instance
from transformers import AutoConfig

from visiondrop.families import family_for
from visiondrop.harness.bias_report import bias_table, collect, plot_bias_maps
from visiondrop.harness.lmms_model import PrunedLVLM
from visiondrop.harness.positions import PositionMaps
from visiondrop.harness.store import ResultStore, positions_path
from visiondrop.testing.tiny import demo_image

from test_harness import DEMO_MODEL, ROOT, run_cli
from test_lmms_plugin import DOCS, _requests


class _Model:  # patch_cells of LLaVA-1.5 reads the config only
    config = AutoConfig.from_pretrained(DEMO_MODEL)


def _llava_cells() -> torch.Tensor:
    return family_for(_Model.config).patch_cells(_Model, None)


def _maps(*kept_per_sample: list[int], cells=None) -> PositionMaps:
    cells = _llava_cells() if cells is None else cells
    maps = PositionMaps((1, 24) if cells.shape[0] == 576 else (2, 2))
    for kept in kept_per_sample:
        maps.add_sample(cells, ["layer 2"], [torch.tensor(kept, dtype=torch.long)])
    return maps


def test_llava_cells_are_the_raster_order_of_one_crop():
    cells = _llava_cells()
    assert cells.shape == (576, 3) and cells[0].tolist() == [0, 0, 0] and cells[25].tolist() == [0, 1, 1]
    assert cells[575].tolist() == [0, 23, 23]


def test_bias_equals_a_hand_computation():
    bottom = _maps(list(range(552, 576))).cuts["layer 2"]  # the bottom row: mean row 23, uniform 11.5
    assert bottom.bias == 2.0 and bottom.kept_tokens == 24 and bottom.samples == 1
    assert bottom.frequency[0, 23].tolist() == [1.0] * 24 and bottom.frequency[0, :23].sum() == 0
    assert _maps(list(range(576))).cuts["layer 2"].bias == 1.0  # everything: uniform
    assert _maps(list(range(5, 576, 24))).cuts["layer 2"].bias == 1.0  # one whole column: no vertical bias
    assert _maps(list(range(288))).cuts["layer 2"].bias == pytest.approx(5.5 / 11.5)  # the top half
    # two samples pooled: 24 tokens in row 23 and 48 in rows 0-1: (24*23 + 24*0 + 24*1) / (72 * 11.5)
    pooled = _maps(list(range(552, 576)), list(range(48))).cuts["layer 2"]
    assert pooled.bias == pytest.approx((24 * 23 + 24) / (72 * 11.5))
    assert pooled.frequency[0, 23, 0] == 0.5 and pooled.present.sum() == 2 * 576


def test_bias_counts_only_patches_that_exist():
    # two 2x2 crops; a newline token (no patch) at index 4; crop 1's bottom row cut away (as NeXT's unpadding)
    cells = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1], [-1, -1, -1], [1, 0, 0], [1, 0, 1]])
    kept = _maps([3, 4, 6], cells=cells).cuts["layer 2"]
    # kept patches at rows 1 and 0; the six patches' mean row is 2/6, so uniform expects 2 x 1/3
    assert kept.kept_tokens == 2 and kept.bias == pytest.approx(1 / (2 / 3))
    assert np.isnan(kept.frequency[1, 1]).all() and kept.frequency[0, 1, 1] == 1.0
    with pytest.raises(ValueError, match="the image has 7 visual tokens"):
        _maps([7], cells=cells)


def test_next_cells_follow_the_packed_layout(tiny_next):
    model, processor = tiny_next
    family = family_for(model.config)
    assert family.patch_grid(model.config) == (5, 24)
    for size in [(400, 300), (336, 700)]:  # unpadded grids of 2x2 and 1x2 crops
        batch = processor(text=["<image>\nQ?"], images=[demo_image(0, size)], return_tensors="pt")
        cells = family.patch_cells(model, batch["image_sizes"][0])
        assert len(cells) == int((batch["input_ids"] == model.config.image_token_id).sum())
        patches = cells[cells[:, 0] >= 0]
        assert len({tuple(c) for c in patches.tolist()}) == len(patches)  # each patch once
        assert (cells[:576] == _llava_cells()).all()  # the base crop first, in raster order
        assert (cells[:, 0] < 0).any() and len(patches) < 576 * (1 + cells[:, 0].max())  # newlines; unpadding


def test_plugin_collects_every_sample_and_batches_equal_alone(tmp_path):
    maps = []
    for batch_size in (1, 3):
        lm = PrunedLVLM(pretrained=str(DEMO_MODEL), method="visiondrop", budget=64, batch_size=batch_size)
        lm.task_dict = {"demo": {"test": DOCS}}
        lm.generate_until(_requests("generate_until"))
        lm.loglikelihood(_requests("loglikelihood"))
        maps.append(lm.position_maps.to_dict())
    assert maps[0] == maps[1]
    schedule = lm.handle.policy.describe()
    encoder = lm.position_maps.cuts["encoder"]
    assert list(lm.position_maps.cuts) == ["encoder"] + [f"layer {i}" for i in schedule["layers"]]
    assert encoder.samples == 6  # three docs with an image, twice; the text-only doc adds nothing
    # the dominant tokens but CLS (no patch); merged contextual tokens come from no one place
    assert encoder.kept_tokens == 6 * (schedule["encoder"][0] - 1)


def test_position_bias_experiment_on_the_demo_setup(tmp_path, monkeypatch):
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT / "configs", checkout / "configs")
    monkeypatch.chdir(checkout)
    assert run_cli(monkeypatch, "experiment=position_bias", "model=demo-llava-1.5", "benchmarks=demo", "budget=192",
                   "method=visiondrop,fastv,none", "limit=3", f"model.pretrained={DEMO_MODEL}",
                   "hydra.sweep.dir=sweep") == 0
    records = ResultStore(checkout / "results" / "runs").records()
    assert {r["method"] for r in records} == {"visiondrop", "fastv", "none"}
    for record in records:
        stored = json.loads(positions_path(record["path"]).read_text())
        assert {cut: m["bias"] for cut, m in stored["cuts"].items()} == record["position_bias"]
    entries = collect(records, "demo-llava-1.5", "Demo")
    assert [e[0]["method"] for e in entries] == ["visiondrop", "fastv"]  # the unpruned run keeps no cut
    table = bias_table(entries)
    fastv = table[table.Method == "FastV"].iloc[0]
    assert fastv["cut"] == "layer 1" and fastv["scoring"].startswith("text-guided")
    assert fastv["paper's claim"].startswith("bottom-heavy") and fastv["kept per sample"] == 64
    assert math.isclose(fastv["vertical bias"], next(r for r in records if r["method"] == "fastv")
                        ["position_bias"]["layer 1"])
    assert set(table[table.Method == "VisionDrop"].scoring.str.split(" ").str[0]) == {"visual-only"}
    png = plot_bias_maps(entries, tmp_path / "maps.png", "demo")
    assert png.stat().st_size > 10_000


def test_unreadable_maps_are_named_and_left_out_of_the_report(tmp_path, caplog):
    """A truncated or foreign `.positions.json` beside a record is warned about, naming the file, and its run left
    out (as the store does with unreadable records); the others' maps still make the report."""
    records = []
    for method, text in (("fastv", json.dumps(_maps([575, 574]).to_dict())), ("visiondrop", None), ("dart", "[1, 2]")):
        record = {"model": "m", "benchmark": "B", "method": method, "options": {}, "budget": 64.0,
                  "path": str(tmp_path / f"{method}.json")}
        maps = positions_path(record["path"])
        maps.write_text(text or json.dumps(_maps([0]).to_dict())[:50])  # as a full disk or a killed copy leaves it
        records.append(record)
    with caplog.at_level("WARNING"):
        entries = collect(records, "m", "B")
    assert [record["method"] for record, _ in entries] == ["fastv"]
    assert entries[0][1].cuts["layer 2"].kept_tokens == 2
    for method in ("visiondrop", "dart"):
        assert f"{tmp_path / method}.positions.json: not readable positional-bias maps" in caplog.text


def test_video_llava_cells_of_an_image_and_of_a_video(tiny_video):
    """An image's 256 tokens (CLS dropped) are one 16x16 grid; a video's 8 x 257 are 8 frames, CLS first in each."""
    model, processor = tiny_video
    family = family_for(model.config)
    assert family.patch_grid(model.config) == (8, 16)
    image = family.patch_cells(model, None, "image")
    prompt = processor(text=["USER: <image>\nQ? ASSISTANT:"], images=[demo_image(0, (224, 224))], return_tensors="pt")
    assert len(image) == int((prompt["input_ids"] == model.config.image_token_id).sum()) == 256
    assert image[0].tolist() == [0, 0, 0] and image[17].tolist() == [0, 1, 1] and image[255].tolist() == [0, 15, 15]
    video = family.patch_cells(model, None, "video")
    assert len(video) == model.config.video_seq_length == 2056
    assert video[0].tolist() == video[257].tolist() == video[7 * 257].tolist() == [-1, -1, -1]  # each frame's CLS
    assert video[1].tolist() == [0, 0, 0] and video[257 + 18].tolist() == [1, 1, 1]
    assert video[2055].tolist() == [7, 15, 15] and (video[:, 0] >= 0).sum() == 8 * 256


def test_one_run_maps_one_modality():
    maps = _maps([0, 1])
    with pytest.raises(ValueError, match="maps of images cannot take a video"):
        maps.add_sample(_llava_cells(), ["layer 2"], [torch.tensor([2])], "video")


def _hand_cells(index: int, modality: str) -> tuple[int, int, int] | None:
    """Video-LLaVA's layout, by hand: a video's frames of CLS + 16 x 16 patches, an image's 16 x 16 patches."""
    frame, token = divmod(index, 257) if modality == "video" else (0, index + 1)
    return None if token == 0 else (frame, (token - 1) // 16, (token - 1) % 16)


def test_plugin_maps_video_llava_images_and_videos(tiny_video_dir, demo_videos, tmp_path):
    """The maps of a pruned run on an image and on a video equal the trace's kept indices laid out by hand."""
    docs = [{"visual": demo_image(0, (224, 224)), "question": "What is in the image?"},
            {"visual": str(demo_videos[0]), "question": "What happens in the video?"}]
    lm = PrunedLVLM(pretrained=str(tiny_video_dir), method="visiondrop", budget=514)  # 25% of 2,056
    lm.task_dict = {"demo": {"test": docs}}
    entries = []
    for i, modality in enumerate(("image", "video")):
        lm.reset_measurements()
        request = Instance(request_type="generate_until", idx=0, metadata={"task": "demo", "doc_id": i, "repeats": 1},
                           arguments=(docs[i]["question"], {"max_new_tokens": 2}, lambda d: [d["visual"]], i, "demo",
                                      "test"))
        lm.generate_until([request])
        maps, trace = lm.position_maps, lm.handle.trace
        assert maps.modality == modality and list(maps.cuts) == trace.cuts and trace.cuts[0] == "encoder"
        frames = 8 if modality == "video" else 1
        for cut, kept_indices in zip(trace.cuts, trace.kept[0]):
            expected = np.zeros((8, 16, 16), np.int64)
            for index in kept_indices.tolist():
                if (cell := _hand_cells(index, modality)) is not None:
                    expected[cell] += 1
            assert (maps.cuts[cut].kept == expected).all(), (modality, cut)
            assert (maps.cuts[cut].present[:frames] == 1).all() and maps.cuts[cut].present[frames:].sum() == 0
        dominant = lm.handle.policy.describe()["encoder"][0]  # CLS and the dominant patches, per frame
        per_frame = maps.cuts["encoder"].kept.sum((1, 2))
        assert per_frame[:frames].tolist() == [per_frame[0]] * frames and per_frame[frames:].sum() == 0
        if modality == "video":
            assert per_frame[0] == dominant - 1  # the CLS each frame keeps is no patch
        entries.append(({"method": "visiondrop", "options": {}, "budget": 514.0}, PositionMaps.from_dict(
            json.loads(json.dumps(maps.to_dict())))))
        assert entries[-1][1].modality == modality
    png = plot_bias_maps(entries[1:], tmp_path / "video.png", "Video-LLaVA on a video")
    assert png.stat().st_size > 10_000


def test_every_method_states_its_scoring_in_the_one_vocabulary():
    """`Method.scoring` and the FLOPs recipe's rows name rules of `engine.scoring.RULES`; the bias report labels a
    cut by what the method states (DART and DivPrune by what they do, not as a random control)."""
    from visiondrop.engine.scoring import RULES
    from visiondrop.harness.bias_report import claim, scoring
    from visiondrop.methods import METHODS, method

    for name in METHODS:
        stated = method(name).scoring()
        assert set(stated) <= {"encoder", "decoder"} and set(stated.values()) <= set(RULES), (name, stated)
        assert method(name).overhead().rows in {*RULES, None}, name
    assert scoring("dart", {}, "layer 2") == RULES["key_norms"] and claim(RULES["key_norms"]) == "none made"
    assert scoring("divprune", {}, "layer 0") == RULES["diversity"]
    assert scoring("random", {}, "layer 0") == RULES["random"] and claim(RULES["random"]).startswith("no vertical")
    assert scoring("fastv", {"scoring": "visual"}, "layer 2") == RULES["visual"]
    assert scoring("visiondrop", {}, "encoder").startswith("visual-only")
