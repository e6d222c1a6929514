"""HoliTom's own rules on crafted tensors, its options, the tower attention its decoder cuts read, and its outer stage
against the official functions (tests/parity/holitom). Videos of every video family run it in the matrices
(tests/test_video_llava.py, test_video_methods.py, test_llava_onevision.py, test_qwen3_vl_video.py)."""
from pathlib import Path

import pytest
import torch

import visiondrop
from baselines.holitom import (frame_similarity, inner_merge, merge_static, outer_merge, policy,
                               static_windows)
from visiondrop.core import ModelInfo
from visiondrop.engine import Policy, Selection
from visiondrop.families import family_of, info_of
from visiondrop.methods.shared import density_peaks
from visiondrop.harness.video import read_frames
from visiondrop.testing.tiny import load_tiny

OV_7B = ModelInfo(n_visual=6272, n_layers=28, vision_layer=25, cls_kept=False, crops=32, video=True,
                  tower_cls=False)


def test_windows_take_the_static_places_that_save_most():
    """Frames 0-2 repeat 3 of 4 places, frame 3 changes everything, frames 3-4 repeat one place: windows (0, 2) and
    (3, 4) save 3 x 2 + 1 x 1 tokens; a window as good as single frames is not taken (strictly better only)."""
    similarity = torch.tensor([[1.0, 1.0, 1.0, 0.0],
                               [1.0, 1.0, 1.0, 0.0],
                               [0.0, 0.0, 0.0, 0.0],
                               [0.9, 0.0, 0.0, 0.0]])
    assert static_windows(similarity, tau=0.8) == ([(0, 2), (3, 4)], 7)
    assert static_windows(similarity, tau=0.95) == ([(0, 2), (3, 3), (4, 4)], 6)
    assert static_windows(torch.zeros(3, 4), tau=0.8) == ([(0, 0), (1, 1), (2, 2), (3, 3)], 0)
    # at most 2 frames a window: (0, 1) saves 3; (1, 2) would save 3 too, no better than (0, 1) then (2, 2)
    assert static_windows(similarity, tau=0.8, max_window=2) == ([(0, 1), (2, 2), (3, 4)], 4)


def test_frame_similarity_is_the_cosine_of_each_place():
    frames = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[3.0, 0.0], [2.0, 0.0]]])
    torch.testing.assert_close(frame_similarity(frames), torch.tensor([[1.0, 0.0]]))


def test_static_tokens_merge_into_their_centre_with_beta():
    """Two tight groups and one far token: at two clusters the centres are one of each group's densest; each
    centre with members becomes 0.6 x itself + 0.4 x their mean, and the weights give the same tokens."""
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [5.0, 5.0], [5.1, 5.0], [9.0, 0.0]])
    merged, centres, weights = merge_static(x, ratio=2 / 6, beta=0.6, k=2)
    assert centres.tolist() == sorted(centres.tolist()) and len(centres) == 2
    assert centres[0] < 3 <= centres[1] < 5  # one centre per dense group, the far token is a member
    distances = torch.cdist(x, x[centres])
    for c, centre in enumerate(centres.tolist()):
        members = [i for i in range(6) if i not in centres.tolist() and distances[i].argmin() == c]
        torch.testing.assert_close(merged[c], 0.6 * x[centre] + 0.4 * x[members].mean(0))
    torch.testing.assert_close(weights @ x, merged)
    assert merge_static(x, ratio=0.05)[0].shape == (0, 2)  # round(0.3) centres: none


def test_dpc_knn_centres_are_the_density_peaks():
    x = torch.tensor([[0.0], [0.1], [0.2], [10.0], [10.1], [10.2]])
    dist, score = density_peaks(x, k=3)
    assert score.topk(2).indices.sort().values.tolist() == [1, 4]  # each group's middle: densest, far from denser
    assert dist.shape == (6, 6)
    # members only: the same scores as the members alone, the others -inf
    member = torch.tensor([True, True, True, False, True, False])
    _, masked = density_peaks(torch.cat([x, x + 5]).view(2, 6, 1), k=3, member=member.expand(2, 6))
    _, alone = density_peaks(x[member], k=3)
    torch.testing.assert_close(masked[0, member], alone)
    assert masked[:, ~member].eq(float("-inf")).all()


def test_outer_stage_by_hand():
    """Two identical frames but one place: a window (0, 1) with 3 static places and one dynamic place per frame. At
    retain ratio 0.5 the windows save 3 of 8 tokens, so r' = 0.8: round(3 x 0.8) = 2 static tokens and ceil(1 x 0.8)
    dynamic token a frame, [static, frame 0, frame 1], each weight row making its token."""
    still = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    frames = torch.stack([still, still.clone()])
    frames[1, 3] = torch.tensor([0.0, 1.0, 1.0])
    attention = torch.rand(2, 4)
    tokens, slots, weights, windows = outer_merge(frames, attention, ratio=0.5, tau=0.8, k=2)
    assert windows == [(0, 1)]
    assert tokens.shape[0] == 4 and slots[2:].tolist() == [3, 7]  # 2 static, then each frame's dynamic place
    torch.testing.assert_close(tokens[2:], frames[:, 3])
    torch.testing.assert_close(weights @ frames.flatten(0, 1), tokens)
    assert set(slots[:2].tolist()) < {0, 1, 2}  # a static token stands for its centre in the first frame


def test_dynamic_tokens_are_each_frame_top_by_tower_attention_in_place_order():
    frames = torch.randn(3, 5, 4)  # nothing static: three windows of one frame
    attention = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.0], [0.5, 0.4, 0.3, 0.2, 0.1], [0.0, 0.0, 0.0, 0.1, 0.2]])
    tokens, slots, _, windows = outer_merge(frames, attention, ratio=0.4, tau=2.0)
    assert windows == [(0, 0), (1, 1), (2, 2)]
    assert slots.tolist() == [1, 3, 5, 6, 13, 14]  # ceil(5 x 0.4) = 2 a frame, ascending within it
    torch.testing.assert_close(tokens, frames.flatten(0, 1)[slots])


def test_inner_merge_averages_members_into_the_most_similar_kept_token_one_after_the_other():
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.8, 0.3], [0.1, 0.9]])
    scores = torch.tensor([0.5, 0.4, 0.1, 0.0, 0.2])
    keep, states = inner_merge(hidden, scores, ratio=0.6)  # round(5 x 0.4) = 2 kept: tokens 0 and 1
    assert keep.tolist() == [0, 1]
    torch.testing.assert_close(states[0], ((hidden[0] + hidden[2]) / 2 + hidden[3]) / 2)  # 2, then 3
    torch.testing.assert_close(states[1], (hidden[1] + hidden[4]) / 2)
    keep, states = inner_merge(hidden, scores, ratio=0.0)
    assert keep.tolist() == [0, 1, 2, 3, 4] and torch.equal(states, hidden)


def test_outer_stage_equals_the_official_functions():
    """baselines.holitom's outer stage gives the official `select_static_windows` / `get_static_dynamic_features` /
    `holitom` windows and tokens (their tie-breaking noise zeroed; tests/parity/holitom)."""
    cases = torch.load(Path(__file__).parent / "parity" / "holitom" / "fixture.pt")["cases"]
    assert len(cases) == 8
    for case in cases:
        tokens, _, weights, windows = outer_merge(case["features"], case["attention"], case["retain_ratio"],
                                                  case["tau"])
        assert windows == [tuple(w) for w in case["windows"]]
        assert tokens.shape == case["merged"].shape
        torch.testing.assert_close(tokens, case["merged"], atol=1e-6, rtol=0)
        torch.testing.assert_close(weights @ case["features"].flatten(0, 1), tokens, atol=1e-5, rtol=0)


def test_inner_merge_equals_the_official_forward():
    """baselines.holitom's inner merge, on what the official `Qwen2Model_holitom.forward` had at its layer 18 (the
    hidden states and layer-17 attention of a small random decoder, tests/parity/holitom/make_inner_fixture.py),
    gives bit for bit the hidden states and positions that entered layer 18 there; the text rows are untouched.
    The official layer 17 ran without a causal mask (its probabilities above the diagonal are not 0): the bug the
    module docstring states and does not reproduce."""
    cases = torch.load(Path(__file__).parent / "parity" / "holitom" / "inner_fixture.pt")["cases"]
    assert len(cases) == 4
    for case in cases:
        start, visual, positions = case["start"], case["visual"], case["positions"]
        assert torch.triu(case["attention"][0], 1).max() > 0
        scores = case["attention"].mean(0)[-1, start:start + visual]  # the last prompt token, mean over heads
        keep, states = inner_merge(case["before"][start:start + visual], scores, ratio=0.5)
        is_visual = (positions >= start) & (positions < start + visual)
        assert torch.equal(positions[is_visual] - start, keep)
        assert torch.equal(case["after"][is_visual], states)
        assert torch.equal(case["after"][~is_visual], case["before"][positions[~is_visual]])


def test_options_and_schedule():
    ov = policy(OV_7B, retain_ratio=0.1, tau=0.65)
    assert ov.cut_layers == (0, 18) and ov.retain_ratio == 0.1  # the official HOLITOM_k on OneVision-7B's 28 layers
    assert policy(OV_7B, retain_ratio=0.1, inner=False).cut_layers == (0,)
    solved = policy(OV_7B, budget=0.1 * 6272)  # mean over the layers: 18 layers at r, 10 at r / 2
    assert solved.retain_ratio == pytest.approx(0.1 * 28 / 23)
    assert solved.describe()["equivalent_tokens"] == 627
    with pytest.raises(ValueError, match="one of them"):
        policy(OV_7B, budget=600, retain_ratio=0.1)
    with pytest.raises(ValueError, match="retain_ratio"):
        policy(OV_7B, retain_ratio=1.5)
    with pytest.raises(ValueError, match="smallest reachable budget is 1"):
        policy(OV_7B, budget=0.5)


@pytest.fixture(scope="module")
def video_llava(tiny_video_dir):
    return load_tiny(tiny_video_dir, dtype=torch.float64)


class TowerProbe(Policy):
    """Reads the tower attention at a cut before layer 0 and keeps every token."""

    name, tower_attention, cut_layers = "probe", True, (0,)

    def select_decoder(self, cut):
        self.seen = cut.tower_attention
        return Selection(torch.arange(cut.n_visual).expand(len(cut.samples), -1))


def probed_tower_attention(model, inputs: dict) -> torch.Tensor:
    """The tower attention [samples, visual tokens] a decoder cut before layer 0 sees in one forward."""
    from visiondrop.engine.patch import Pruner

    probe = TowerProbe()
    pruner = Pruner(model, probe)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        pruner.remove()
    return probe.seen


def eager_attention(tower, layer: int, pixels: torch.Tensor) -> torch.Tensor:
    """A CLIP-style tower's eager attention probabilities at `layer` [N, H, T, T] (that layer's alone: every layer's,
    as `output_attentions` gives them, would take a gigabyte on 4 OneVision frames)."""
    from visiondrop.families.llava import tower_layers

    probabilities = []
    attention = tower_layers(tower)[layer].self_attn
    hook = attention.register_forward_hook(lambda module, args, out: probabilities.append(out[1]))
    own, tower.config._attn_implementation = tower.config._attn_implementation, "eager"
    try:
        with torch.no_grad():
            tower(pixels)
    finally:
        tower.config._attn_implementation = own
        hook.remove()
    return probabilities[0]


def test_decoder_cuts_see_the_attention_each_token_received_in_the_tower(video_llava, demo_videos):
    """Video-LLaVA: the feature layer's attention (eager probabilities, mean over heads then queries) of every frame's
    257 tokens, CLS included, frame after frame."""
    model, processor = video_llava
    clip = read_frames(demo_videos[0])
    inputs = dict(processor(text=["USER: <video>\nWhat happens? ASSISTANT:"], videos=[clip], return_tensors="pt"))
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(torch.float64)
    probabilities = eager_attention(model.model.video_tower, info_of(model).vision_layer,
                                    inputs["pixel_values_videos"].flatten(0, 1))
    torch.testing.assert_close(probed_tower_attention(model, inputs)[0], probabilities.mean(1).mean(1).flatten())


def test_the_official_non_causal_scoring_layer_is_an_option(video_llava, demo_videos):
    """causal_scoring_layer=False runs layer 17 (of 28; Video-LLaVA's 32 layers: the layer before the inner cut)
    over the whole prompt, as the official SDPA run: the logits change, a batch of one still runs."""
    model, processor = video_llava
    inputs = dict(processor(text=["USER: <video>\nWhat happens? ASSISTANT:"], videos=[read_frames(demo_videos[0])],
                            return_tensors="pt"))
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(torch.float64)
    logits = {}
    for causal in (True, False):
        with visiondrop.apply(model, "holitom", ratio=0.25, causal_scoring_layer=causal) as handle, torch.no_grad():
            logits[causal] = model(**inputs).logits
        layer = handle.policy.inner_layer
        assert handle.policy.describe()["bidirectional_layers"] == ([] if causal else [layer - 1])
    assert not torch.allclose(logits[True], logits[False])


def test_beam_search_finds_each_copy_tower_rows(video_llava, demo_videos):
    """generate() encodes the videos once and copies their stacked features per beam: each copy's tower rows are found
    again (`Pruner._own_tower_rows`), so two beams on a batch of two videos give each video's alone."""
    from helpers import beams_equal_alone

    model, processor = video_llava
    questions = ["What happens?", "Does the red shape move? Answer briefly."]
    clips = [read_frames(path) for path in demo_videos[:2]]

    def encode(qs, videos):
        processor.tokenizer.padding_side = "left"
        inputs = dict(processor(text=[f"USER: <video>\n{q} ASSISTANT:" for q in qs], videos=videos, padding=True,
                                return_tensors="pt"))
        inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(torch.float64)
        return inputs

    with visiondrop.apply(model, "holitom", ratio=0.25):
        beams_equal_alone(model, encode(questions, clips), [encode([q], [c]) for q, c in zip(questions, clips)], 3)


def test_images_are_refused(video_llava):
    model, processor = video_llava
    from visiondrop.testing.tiny import demo_image

    inputs = dict(processor(text=["USER: <image>\nWhat is it? ASSISTANT:"], images=[demo_image(0, (224, 224))],
                            return_tensors="pt"))
    with visiondrop.apply(model, "holitom", ratio=0.25), torch.no_grad(), pytest.raises(ValueError, match="videos"):
        model(**inputs)


#: the families whose videos HoliTom runs on, each with its tower's module
TOWERS = {"video_llava": "video_tower", "llava_onevision": "vision_tower", "qwen2_5_vl": "visual", "qwen3_vl": "visual"}


def one_video(model_type: str, model, processor, path) -> dict:
    """A one-video prompt in the family's own format (Qwen2.5-VL's patches by hand: its video processor needs
    torchvision), in the model's dtype."""
    from visiondrop.harness.prompting import build_prompt

    if model_type == "qwen2_5_vl":
        from test_video_methods import encode

        inputs = encode(processor, ["What happens?"], [(4, 8, 8)], [0])
    else:
        prompt = build_prompt(processor, "What happens?", True, family_of(model).conv_template, "video")
        inputs = dict(processor(text=[prompt], videos=[read_frames(path, 4)], return_tensors="pt"))
    return {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in inputs.items()}


@pytest.mark.parametrize("model_type", TOWERS)
def test_the_tower_runs_once_a_forward(tiny_of, demo_videos, model_type):
    """The tower's attention is read in the host's own encoding (`Family.tower_attention`): the tower runs once a
    forward (counted with a forward hook), and once in a generation (the video encoded before the first step)."""
    model, processor = tiny_of(model_type)
    inputs = one_video(model_type, model, processor, demo_videos[0])
    n_visual = int(family_of(model).image_token_mask(model, inputs["input_ids"], None).sum())
    runs = []
    hook = getattr(model.model, TOWERS[model_type]).register_forward_hook(lambda *_: runs.append(1))
    try:
        with visiondrop.apply(model, "holitom", ratio=0.25) as handle, torch.no_grad():
            model(**inputs)
            assert len(runs) == 1
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
    finally:
        hook.remove()
    assert len(runs) == 2
    assert handle.trace.tokens_per_layer[0][0] < n_visual  # the outer stage ranked the frames' tokens by the rows


def test_onevision_tower_attention_is_the_official_pooled_mean(tiny_of, demo_videos):
    """LLaVA-OneVision: each frame's attention received at SigLIP's last layer, mean over heads and queries, pooled
    2x2 as HoliTom's official code reads it (eager `attentions[-1]`; checked on the first and last of 4 frames), and
    0 at the trailing newline."""
    model, processor = tiny_of("llava_onevision")
    inputs = one_video("llava_onevision", model, processor, demo_videos[0])
    seen = probed_tower_attention(model, inputs)[0]
    probabilities = eager_attention(model.model.vision_tower, info_of(model).vision_layer,
                                    inputs["pixel_values_videos"][0, [0, -1]])
    pooled = model.model.apply_pooling(probabilities.mean(1).mean(1).unsqueeze(-1))[..., 0]  # [2, 196]
    torch.testing.assert_close(seen[:-1].view(4, 196)[[0, -1]], pooled, rtol=1e-5, atol=1e-9)
    assert seen[-1] == 0
