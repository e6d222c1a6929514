"""FastVID (baselines/fastvid.py): its steps on crafted tensors, its options, and equality with the official code
(tests/parity/fastvid). Batches of videos of different lengths, cache == replay, positions kept and the counts are in
tests/test_video_methods.py (Qwen2.5-VL) and tests/test_video_llava.py (every video method); images are refused in
tests/test_contract.py."""
import math
from pathlib import Path

import pytest
import torch

from baselines.fastvid import NEAREST, anchor_counts, dynamic_segments, load_siglip_head, merge_into, \
    per_frame_counts, policy, prune_video, prune_video_qwen, qwen_counts
from visiondrop.core import ModelInfo
from visiondrop.methods import Unreachable
from visiondrop.methods.shared import density_peaks

DTYPE = torch.float64


def test_dynamic_segments_cut_at_the_least_similar_frames_and_below_tau():
    """Frames 0-1 alike, 2 apart, 3-5 alike: with c = 2 the one least similar pair cuts, tau cuts the others."""
    a, b, c = torch.eye(3, dtype=DTYPE)
    frames = torch.stack([a, a, b, 0.95 * c + 0.05 * b, c, c])
    assert dynamic_segments(frames, segments=1, tau=0.9) == [2, 1, 3]  # cosines below 0.9: after frames 1 and 2
    assert dynamic_segments(frames, segments=3, tau=0.0) == [2, 1, 3]  # the two smallest cosines (0 and 0.05)
    assert dynamic_segments(frames, segments=2, tau=-1.0) == [2, 4]  # the one smallest (ties: the first)
    assert dynamic_segments(frames, segments=20, tau=-1.0) == [1] * 6  # more cuts than gaps: every gap


def test_budget_split_and_anchor_frames():
    """R = int(N r): 19 of 196 at 0.1 = 12 salient + 7 context; anchors on every p-th frame from a segment's end."""
    assert per_frame_counts(196, 0.1, 0.4) == (12, 7)
    assert per_frame_counts(257, 0.25, 0.4) == (39, 25)
    # L = 1: all C on it; L = 5, p = 4: 2 anchor frames (j = 0, 4) of 35 // 2; L = 2: the last frame, 14
    assert anchor_counts([1, 5, 2], 7, 4) == [7, 17, 0, 0, 0, 17, 0, 14]
    assert anchor_counts([3], 7, 1) == [7, 7, 7]  # p = 1: every frame its own C (the single-frame rule)


def test_density_score_by_hand():
    """Three tokens on a line at 0, 1 and 3 (D = 1): rho = exp(-mean squared distance to all three), delta the
    distance to the nearest denser token, the largest distance (3) for the densest."""
    _, scores = density_peaks(torch.tensor([[0.0], [1.0], [3.0]], dtype=DTYPE), NEAREST)
    expected = [math.exp(-10 / 3) * 1, math.exp(-5 / 3) * 3, math.exp(-13 / 3) * 2]
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float32))


def test_merge_into_anchors_by_hand():
    """Tokens join the most cosine-similar anchor; anchor <- w anchor + (1 - w) mean(members), w = max(1/(n+1), beta)."""
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=DTYPE)
    pool = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], dtype=DTYPE)
    merged, (own, shares) = merge_into(anchors, pool, beta=0.6)
    torch.testing.assert_close(merged, torch.tensor([[0.98, 0.02], [0.0, 1.0]], dtype=DTYPE))
    merged, (own, shares) = merge_into(anchors, pool, beta=0.0)
    torch.testing.assert_close(merged, torch.tensor([[1 / 3 + 2 / 3 * 0.95, 2 / 3 * 0.05], [0.0, 1.0]], dtype=DTYPE))
    torch.testing.assert_close(own[:, 0], torch.tensor([1 / 3, 1 / 2], dtype=DTYPE))
    torch.testing.assert_close(own * anchors + shares @ pool, merged)


def test_prune_video_keeps_salient_tokens_and_states_its_merge():
    """Two unlike frames of 10 tokens at retention 0.5 (5 = 3 salient + 2 context each): the top-3 attention tokens
    of each frame stay as they are, 2 anchors a frame absorb the rest; the weights rebuild every kept token."""
    generator = torch.Generator().manual_seed(0)
    video = torch.randn(2, 10, 6, generator=generator, dtype=DTYPE)
    attention = torch.zeros(2, 10, dtype=DTYPE)
    attention[0, [1, 4, 7]] = 1
    attention[1, [0, 2, 9]] = 1
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=DTYPE)  # orthogonal frames: two segments
    keep, tokens, weights = prune_video(video, attention, features, share=0.5, segments=8, tau=0.9,
                                        context_share=0.4, stride=4, beta=0.6)
    assert keep.numel() == 10 and torch.equal(keep, keep.sort().values)
    assert {1, 4, 7, 10, 12, 19} <= set(keep.tolist()) and (keep < 10).sum() == 5
    flat = video.flatten(0, 1)
    salient = torch.isin(keep, torch.tensor([1, 4, 7, 10, 12, 19]))
    assert torch.equal(tokens[salient], flat[keep[salient]])
    torch.testing.assert_close(weights @ flat, tokens)
    assert torch.allclose(weights.sum(1), torch.ones(10, dtype=DTYPE))  # each a convex combination
    assert (weights[~salient][:, :10].sum(1) * weights[~salient][:, 10:].sum(1) == 0).all()  # within its frame


def test_prune_video_merges_a_segment_into_its_last_frame():
    """Four alike frames (one segment, p = 4): only the last frame holds anchors, 4 x C of them, and they absorb
    non-salient tokens of every frame of the segment."""
    generator = torch.Generator().manual_seed(1)
    video = torch.randn(4, 20, 6, generator=generator, dtype=DTYPE)
    attention = torch.rand(4, 20, generator=generator, dtype=DTYPE)
    features = torch.ones(4, 3, dtype=DTYPE)
    keep, tokens, weights = prune_video(video, attention, features, share=0.25, segments=1, tau=0.9,
                                        context_share=0.4, stride=4, beta=0.6)
    salient, context = per_frame_counts(20, 0.25, 0.4)
    assert (salient, context) == (3, 2)
    assert keep.numel() == 4 * salient + 4 * context
    anchors = weights.count_nonzero(1) > 1
    assert anchors.sum() == 4 * context and (keep[anchors] >= 60).all()
    sources = weights[anchors].nonzero()[:, 1] // 20
    assert set(sources.tolist()) == {0, 1, 2, 3}


def test_equals_the_official_code():
    """baselines.fastvid.prune_video keeps the tokens, at the positions, that the official LLaVA-OneVision
    `Qwen2Model.forward` passes to its first layer, with the same merged anchors (tie-breaking noise zeroed there)."""
    cases = torch.load(Path(__file__).parent / "parity" / "fastvid" / "fixture.pt")["cases"]
    settings = [s for case in cases for s in case["kept"]]
    assert len(settings) > 40 and any(s["stride"] == 1 for s in settings) and any(s["beta"] != 0.6 for s in settings)
    multi = 0
    for case in cases:
        segments = dynamic_segments(case["features"], case["kept"][0]["segments"], 0.9)
        multi += any(length > 1 for length in segments)
        for s in case["kept"]:
            keep, tokens, _ = prune_video(case["video"], case["attention"], case["features"], s["share"],
                                          s["segments"], s["tau"], s["context_share"], s["stride"], s["beta"])
            assert torch.equal(keep, s["keep"]), s
            torch.testing.assert_close(tokens, s["tokens"], atol=1e-6, rtol=1e-5)
    assert multi >= 3  # segments of several frames, merged into their anchor frames


def test_qwen_variant_counts():
    """A segment of 7 frames, R = 4, d = 0.4: 28 tokens, C = 11; sub-segments of 2, 3 and 2 frames: only their last
    frames keep tokens, 17 salient split 6/6/5, the context on every p-th sub-segment from the end (p = 2: the last
    and the first, 6 and 5, the larger one last), at most half a frame (8 of 16)."""
    assert qwen_counts([2, 3, 2], 4, 16, 0.4, 2) == ([0, 6, 0, 0, 6, 0, 5], [0, 5, 0, 0, 0, 0, 6])
    assert qwen_counts([2, 3, 2], 4, 10, 0.4, 4) == ([0, 6, 0, 0, 6, 0, 5], [0, 0, 0, 0, 0, 0, 5])  # 11, at most 5
    assert qwen_counts([1], 4, 16, 0.4, 4) == ([3], [1])  # a single frame: all of it, C = max(int(1.6), 1)


def test_qwen_variant_equals_the_official_code():
    """`prune_video_qwen` keeps the tokens the official Qwen2.5-VL block keeps (lifted verbatim: its file needs
    flash-attn), with the same merged anchors (tie-breaking noise zeroed there; tests/parity/fastvid/)."""
    fixture = torch.load(Path(__file__).parent / "parity" / "fastvid" / "fixture_qwen.pt")
    settings = [s for case in fixture["cases"] for s in case["kept"]]
    assert len(settings) > 30 and any(s["stride"] == 1 for s in settings)
    for case in fixture["cases"]:
        for s in case["kept"]:
            keep, tokens, weights = prune_video_qwen(case["video"], case["attention"], case["features"], s["share"],
                                                     s["segments"], s["tau"], s["ignore"], s["context_share"],
                                                     s["stride"], s["beta"])
            assert torch.equal(keep, s["keep"]), s
            torch.testing.assert_close(tokens, s["tokens"], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(weights @ case["video"].flatten(0, 1), tokens, atol=1e-5, rtol=1e-5)


def test_budget_options_and_refusals():
    info = ModelInfo(n_visual=2056, n_layers=32, vision_layer=22, cls_kept=True, crops=8, video=True)
    described = policy(info, budget=514).describe()
    assert described["retention"] == 0.25 and described["equivalent_tokens"] == 8 * (39 + 25)
    assert policy(info, retention=0.1).describe()["equivalent_tokens"] == 8 * 25
    with pytest.raises(Unreachable, match="smallest reachable budget is 8"):
        policy(info, budget=7)
    with pytest.raises(ValueError, match="not both"):
        policy(info, budget=100, retention=0.1)
    with pytest.raises(ValueError, match="segments >= 1"):
        policy(info, retention=0.1, anchor_stride=0)



def test_side_options_and_refusals(tmp_path):
    """The SigLIP head is the default where the model names its tower's original checkpoint (LLaVA-OneVision), the
    decoder substitutes elsewhere and on the Qwen2.5-VL variant; a head that is missing or has no pooling head is
    refused, naming the way out."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    video = ModelInfo(n_visual=2056, n_layers=32, vision_layer=22, cls_kept=True, crops=8, video=True)
    onevision = ModelInfo(n_visual=6272, n_layers=28, vision_layer=25, cls_kept=False, crops=32, video=True,
                          tower_cls=False, tower_head="google/siglip-so400m-patch14-384")
    assert policy(video, retention=0.1).describe()["side"] == "decoder"
    described = policy(onevision, retention=0.1).describe()
    assert (described["side"], described["head"]) == ("siglip_head", "google/siglip-so400m-patch14-384")
    assert policy(onevision, retention=0.1).reads_tower and not policy(video, retention=0.1).reads_tower
    assert policy(onevision, retention=0.1, variant="qwen2_5_vl").describe()["side"] == "decoder"
    assert "head" not in policy(onevision, retention=0.1, side="decoder").describe()
    with pytest.raises(ValueError, match="side is where"):
        policy(onevision, retention=0.1, side="tower")
    with pytest.raises(ValueError, match="pass head="):
        policy(video, retention=0.1, side="siglip_head")
    with pytest.raises(OSError, match="pass head=<local folder>, or use side='decoder'"):
        load_siglip_head(str(tmp_path / "absent"))
    headless = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=28, patch_size=14, vision_use_head=False)
    SiglipVisionModel(headless).save_pretrained(tmp_path / "headless")
    with pytest.raises(ValueError, match="without a pooling head"):
        load_siglip_head(str(tmp_path / "headless"))


def test_siglip_head_is_the_checkpoint_pooled_output_and_probe_attention(tmp_path):
    """g_f is the SigLIP checkpoint's pooled output of the tower's features (its post_layernorm, then its MAP head),
    a_f the head's probe attention over the tokens, mean over heads (the `nn.MultiheadAttention` weights the
    official `SigLipMultiheadAttentionPoolingHead` returns), in the features' dtype."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from visiondrop.testing.tiny import build_tiny_siglip_head

    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=384, patch_size=14)
    path = build_tiny_siglip_head(tmp_path / "head", config)
    # frozen, as the official SigLipVisionAbstract (nn.MultiheadAttention takes another kernel with trainable weights)
    model = SiglipVisionModel.from_pretrained(path).eval().requires_grad_(False)
    vision = getattr(model, "vision_model", model)
    features = torch.randn(3, 729, 32, generator=torch.Generator().manual_seed(0))
    weights = []
    hook = vision.head.attention.register_forward_hook(lambda module, args, out: weights.append(out[1]))
    with torch.no_grad():
        pooled = vision.head(vision.post_layernorm(features))
        pooled = getattr(pooled, "pooler_output", pooled)  # the pooled token (transformers 4: a tensor)
        ours, attention = load_siglip_head(str(path))(features)
    hook.remove()
    torch.testing.assert_close(ours, pooled, atol=0, rtol=0)
    torch.testing.assert_close(attention, weights[0][:, 0], atol=0, rtol=0)
    assert attention.shape == (3, 729) and torch.allclose(attention.sum(-1), torch.ones(3))
    assert not torch.allclose(vision.post_layernorm.weight, torch.ones(32))  # a head that is not the identity
    with torch.no_grad():
        as_double = load_siglip_head(str(path))(features.double())
    assert as_double[0].dtype == torch.float64
    torch.testing.assert_close(as_double[0].float(), ours, atol=1e-5, rtol=0)


def test_settings_the_official_code_raises_on():
    """Fewer frames than c, frames of fewer than 4 non-salient tokens, no context token: the cuts, the density's
    neighbours and the merge stay within what there is (the official code raises on each)."""
    generator = torch.Generator().manual_seed(2)
    video = torch.randn(3, 5, 4, generator=generator, dtype=DTYPE)
    attention = torch.rand(3, 5, generator=generator, dtype=DTYPE)
    features = torch.eye(3, dtype=DTYPE)
    keep, tokens, weights = prune_video(video, attention, features, share=0.6)  # R = 3: 2 salient + 1 anchor
    assert torch.equal(torch.bincount(keep // 5, minlength=3), torch.tensor([3, 3, 3]))
    torch.testing.assert_close(weights @ video.flatten(0, 1), tokens)
    keep, _, _ = prune_video(video, attention, features, share=0.4)  # R = 2, C = int(0.8) = 0: salient only
    assert torch.equal(keep, torch.cat([torch.topk(attention[f], 2).indices.sort().values + 5 * f
                                        for f in range(3)]))


def test_qwen_variant_on_two_videos_of_different_lengths(tiny_qwen):
    """The Qwen2.5-VL variant on Qwen2.5-VL videos of 8 and 7 temporal grids in one batch: equal to each alone,
    counts measured with hooks, cached decoding equal to replay."""
    from helpers import videos_batch_equals_alone
    from test_video_methods import GRIDS, QUESTIONS, encode, run

    model, processor = tiny_qwen
    batch = encode(processor, QUESTIONS, GRIDS, [0, 1])
    singles = [encode(processor, [q], [g], [seed]) for q, g, seed in zip(QUESTIONS, GRIDS, [0, 1])]
    cast = lambda inputs: {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in inputs.items()}  # noqa: E731
    handle, trace = videos_batch_equals_alone(model, "fastvid", run, cast(batch), [cast(x) for x in singles], 3,
                                              atol=1e-4, variant="qwen2_5_vl", tau=0.84, ratio=0.27)
    assert handle.policy.describe()["variant"] == "qwen2_5_vl"
    assert all(0 < layers[0] < n for layers, n in zip(trace.tokens_per_layer, (128, 168)))
