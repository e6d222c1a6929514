"""Video-LLaVA: every registered method on 8-frame videos decoded from real video files, and on its images.

The tiny model has the real depths (CLIP towers of 24 layers at 224/14: 257 tokens a frame with CLS, 2,056 a
video; Llama 32 layers). Methods run at a retention ratio, the form the video papers give their budgets in.
"""
import numpy as np
import pytest
import torch

import visiondrop
from helpers import (SYSTEM, LayerCounter, beams_equal_alone, greedy, greedy_with_logits, stock_and_pruned_means,
                     none_is_the_stock_model, videos_batch_equals_alone)
from visiondrop.families import ModelInfo, flops_dims, info_of
from visiondrop.harness.video import read_frames
from visiondrop.methods import METHODS, method, policy_for
from visiondrop.methods.visiondrop import schedule_for_budget
from visiondrop.testing.tiny import demo_image, load_tiny
from visiondrop.testing.videos import frame_number

QUESTIONS = ["What happens in the video?", "Is the red shape moving to the left or to the right? Answer briefly."]
NEW_TOKENS = 3
# float64: among 2,056 tokens, float32 noise of batched kernels (3e-8 on SparseVLM's scores) flips near-ties;
# in float64 a batch and each sample alone give the same scores to the last bit
DTYPE = torch.float64


def video_prompt(question: str, kind: str = "video") -> str:
    return f"{SYSTEM} USER: <{kind}>\n{question} ASSISTANT:"


def ratio_of(name: str) -> float:
    """The method's declared budget as a share of LLaVA-1.5's 576 tokens (64/576 of 2,056 is 228.4: methods that
    keep whole tokens keep the nearest count)."""
    return method(name).example_budget / 576


@pytest.fixture(scope="module")
def model_and_processor(tiny_video_dir):
    return load_tiny(tiny_video_dir, dtype=DTYPE)


@pytest.fixture(scope="module")
def clips(demo_videos):
    return [read_frames(path) for path in demo_videos]


def encode(processor, questions, clips=(), images=(), kind="video"):
    inputs = dict(processor(text=[video_prompt(q, kind) for q in questions], videos=list(clips) or None,
                            images=list(images) or None, padding=True, return_tensors="pt"))
    return {k: v.to(DTYPE) if v.is_floating_point() else v for k, v in inputs.items()}


@pytest.fixture(scope="module")
def batch(model_and_processor, clips):
    return encode(model_and_processor[1], QUESTIONS, clips[:2])


def test_frames_are_decoded_uniformly_and_laid_out_as_the_model_takes_them(model_and_processor, clips, batch):
    model, _ = model_and_processor
    assert [frame_number(f) for f in clips[0]] == [0, 3, 6, 9, 13, 16, 19, 23]  # 24 frames, np.linspace
    assert [frame_number(f) for f in clips[1]] == [0, 2, 4, 6, 8, 10, 12, 15]
    assert batch["pixel_values_videos"].shape == (2, 8, 3, 224, 224)
    assert (batch["input_ids"] == model.config.video_token_id).sum(1).tolist() == [2056] * 2
    assert batch["attention_mask"].min() == 0, "prompts must differ in length to test left padding"
    info = info_of(model)
    assert (info.n_visual, info.crops, info.per_crop, info.cls_kept, info.video) == (2056, 8, 257, True, True)


def test_only_the_sampled_frames_are_converted(demo_videos, monkeypatch):
    """A long clip costs the memory of its sampled frames only: 8 of 40 frames are converted to RGB arrays, and
    they are the ones a full decode samples."""
    import av

    converted = []
    to_ndarray = av.VideoFrame.to_ndarray

    def counted(frame, *args, **kwargs):
        converted.append(frame)
        return to_ndarray(frame, *args, **kwargs)

    monkeypatch.setattr(av.VideoFrame, "to_ndarray", counted)
    clip = read_frames(demo_videos[2])  # 40 frames
    assert len(converted) == 8
    with av.open(str(demo_videos[2])) as container:
        every = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(every) == 40 and np.array_equal(clip, np.stack([every[i] for i in (0, 5, 11, 16, 22, 27, 33, 39)]))


def test_visiondrop_video_schedule_keeps_three_times_the_target_after_the_encoder():
    info = ModelInfo(n_visual=2056, n_layers=32, vision_layer=22, cls_kept=True, crops=8, video=True)
    schedule = schedule_for_budget(0.125 * 2056, info)  # the paper's 12.5%
    assert schedule.encoder.total * 8 == 768 and abs(schedule.encoder.total / (257 / 8) - 3) < 0.02
    described = policy_for(info, "visiondrop", ratio=0.125).describe()
    assert described["encoder"] == [84, 12] and abs(described["equivalent_tokens"] - 257) / 257 < 0.02
    image_like = policy_for(info, "visiondrop", ratio=0.125, first_stage=1.5).describe()
    assert image_like["encoder"] == [42, 6] and image_like["decoder"] == [[30, 5], [22, 4], [16, 3]]  # official


def run(model, inputs):
    return greedy_with_logits(model, inputs, NEW_TOKENS)


def test_none_is_the_stock_model(model_and_processor, batch):
    none_is_the_stock_model(model_and_processor[0], run, batch, [[2056] * 32] * 2)


def described_mean(described: dict, n_visual: int) -> float:
    return described.get("mean_tokens_entering_layers", described.get("equivalent_tokens", n_visual))


@pytest.mark.parametrize("name", METHODS)
def test_every_method_on_videos(model_and_processor, batch, clips, name):
    """A batch of videos with prompts of different lengths equals each alone; cached decoding equals re-running
    the prompt with the prefill's decisions; the tokens entering each decoder layer, counted with forward
    pre-hooks, are the trace's and the description's; the retention ratio holds."""
    model, processor = model_and_processor
    ratio = ratio_of(name)
    singles = [encode(processor, [question], clips[i:i + 1]) for i, question in enumerate(QUESTIONS)]
    handle, _ = videos_batch_equals_alone(model, name, run, batch, singles, NEW_TOKENS, ratio=ratio)
    measured = handle.trace.tokens_per_layer[0]
    described = handle.policy.describe()
    if method(name).exact_count:
        assert sum(measured) / len(measured) == described_mean(described, 2056)
    else:  # per-frame counts rounded per frame (VidCom2): within a token a frame of the description
        assert abs(sum(measured) / len(measured) - described_mean(described, 2056)) <= 8, f"{name}: {measured}"
    if name != "none" and not method(name).counts_follow_content:  # the ratio holds, in the method's own count, within one token a frame (whole counts)
        assert abs(described["equivalent_tokens"] - ratio * 2056) <= 8, f"{name}: {described}"


def test_the_ratio_is_the_share_of_each_sample_images_included(model_and_processor, clips):
    """An image (256 tokens, CLS dropped) keeps the ratio of its own tokens; a video its 2,056's."""
    model, processor = model_and_processor
    image = encode(processor, QUESTIONS[:1], images=[demo_image(0, (224, 224))], kind="image")
    video = encode(processor, QUESTIONS[:1], clips[:1])
    for name in ("fastv", "visiondrop", "visionzip"):
        with visiondrop.apply(model, name, ratio=0.25) as handle, torch.no_grad():
            model(**image)
            image_mean = handle.trace.mean_tokens[0]
            model(**video)
            video_mean = handle.trace.mean_tokens[0]
        assert abs(image_mean / 256 - video_mean / 2056) < 0.01, (name, image_mean, video_mean)


@pytest.mark.parametrize("frames", [4, 12])
def test_other_frame_counts_keep_the_ratio_of_their_own_tokens(model_and_processor, demo_videos, frames):
    """transformers takes any number of frames (257 tokens each); budgets still count against the checkpoint's
    8-frame reference, so a ratio keeps that share of each video's own tokens, and `none` is the stock model."""
    model, processor = model_and_processor
    video = encode(processor, QUESTIONS[:1], [read_frames(demo_videos[2], frames)])
    n_visual = int((video["input_ids"] == model.config.video_token_id).sum())
    assert n_visual == 257 * frames
    for name, mean in stock_and_pruned_means(model, video, 0.25).items():
        assert abs(mean / n_visual - 0.25) < 0.005, (name, mean)


def test_generate_on_images_equals_stock_and_prunes(model_and_processor):
    model, processor = model_and_processor
    inputs = encode(processor, QUESTIONS, images=[demo_image(0, (224, 224)), demo_image(1, (300, 200))],
                    kind="image")
    assert (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist() == [256, 256]
    with torch.no_grad():
        reference = greedy(model, inputs, NEW_TOKENS)
    with visiondrop.apply(model, "none"), torch.no_grad():
        assert torch.equal(greedy(model, inputs, NEW_TOKENS), reference)
    counter = LayerCounter(model)
    try:
        with visiondrop.apply(model, "visionzip", ratio=0.25) as handle, torch.no_grad():
            model(**inputs)
    finally:
        counter.close()
    assert handle.trace.tokens_per_layer == [[64] * 32] * 2  # 25% of 256: CLS + 53 dominant + 10 merged
    assert counter.lengths[0] == inputs["input_ids"].shape[1] - 256 + 64


def test_mixed_batch_is_refused_by_encoder_methods(model_and_processor, clips):
    model, processor = model_and_processor
    mixed = dict(processor(text=[video_prompt(QUESTIONS[0]), video_prompt(QUESTIONS[1], "image")], videos=clips[:1],
                           images=[demo_image(0, (224, 224))], padding=True, return_tensors="pt"))
    mixed = {k: v.to(DTYPE) if v.is_floating_point() else v for k, v in mixed.items()}
    with visiondrop.apply(model, "visionzip", ratio=0.25), pytest.raises(NotImplementedError, match="mixes images"):
        model(**mixed)
    with visiondrop.apply(model, "fastv", ratio=0.25) as handle, torch.no_grad():  # decoder-side: each its own
        model(**mixed)
    assert [round(m) for m in handle.trace.mean_tokens] == [514, 64]


def test_flops_of_an_8_frame_video(model_and_processor):
    """The FLOPs count measures the schedules on a tiny proxy video (2,056 tokens, the nominal count itself)."""
    from visiondrop.efficiency.flops import checkpoint_dims, method_flops, schedule

    dims = checkpoint_dims("video-llava-7b")
    tiny = flops_dims(model_and_processor[0].config)
    assert (tiny.vision_tokens, tiny.visual_per_crop, tiny.crops, tiny.model_type) == (257, 257, 8, "video_llava")
    info = ModelInfo(n_visual=2056, n_layers=32, vision_layer=22, cls_kept=True, crops=8, video=True)
    for name in ("visiondrop", "fastv", "visionzip"):
        counts = schedule(dims, name, 257).tokens_per_layer
        assert sum(counts) / 32 == policy_for(info, name, ratio=0.125).describe()["equivalent_tokens"]
    full, pruned = method_flops(dims, "none").total, method_flops(dims, "fastv", 257).total
    assert 5 < full / pruned < 6.5  # the first two layers still see all 2,056 tokens


def test_beam_search_on_videos_with_an_encoder_cut(model_and_processor, batch, clips):
    """generate() copies the stacked video features per beam: the engine finds each copy's bookkeeping again."""
    model, processor = model_and_processor
    with visiondrop.apply(model, "visionzip", ratio=0.25):
        beams_equal_alone(model, batch, [encode(processor, [q], clips[i:i + 1]) for i, q in enumerate(QUESTIONS)],
                          NEW_TOKENS)
