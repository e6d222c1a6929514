"""Qwen3-VL on videos: every registered method on clips decoded from real video files, whose temporal patches lie in
separate spans of the prompt, each after its text timestamp (`<t seconds><|vision_start|> ... <|vision_end|>`).

The tiny model has the real structure (tests/test_qwen3_vl.py); float64, so that a batch and each sample alone give
the same scores to the last bit among hundreds of tokens. Methods run at a retention ratio.
"""
from contextlib import contextmanager
from functools import partial

import pytest
import torch

import visiondrop
from helpers import IMAGE_METHODS, none_is_the_stock_model, videos_batch_equals_alone
from visiondrop.harness.video import read_frames
from visiondrop.methods import METHODS, method
from visiondrop.testing.tiny import load_tiny

QUESTIONS = ["What happens in the video?", "Is the red shape moving to the left or to the right? Answer briefly."]
FRAMES = 8  # 4 temporal patches of 70 tokens (320x224 frames) each
NEW_TOKENS = 3
DTYPE = torch.float64


@pytest.fixture(scope="module")
def model_and_processor(tiny_qwen3_dir):
    model, processor = load_tiny(tiny_qwen3_dir, dtype=DTYPE)
    processor.tokenizer.padding_side = "left"
    return model, processor


@pytest.fixture(scope="module")
def clips(demo_videos):
    return [read_frames(path, FRAMES) for path in demo_videos[:2]]


def encode(processor, questions, clips) -> dict:
    text = [processor.apply_chat_template([{"role": "user", "content": [{"type": "video"},
                                                                        {"type": "text", "text": q}]}],
                                          add_generation_prompt=True) for q in questions]
    inputs = dict(processor(text=text, videos=list(clips), padding=True, return_tensors="pt"))
    return {k: v.to(DTYPE) if v.is_floating_point() else v for k, v in inputs.items()}


@pytest.fixture(scope="module")
def batch(model_and_processor, clips):
    return encode(model_and_processor[1], QUESTIONS, clips)


def run(model, inputs):
    """Greedy tokens [B, T] and the logits of every step [B, T, V]."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, 1)


def test_a_video_is_spans_of_frames_after_their_timestamps(model_and_processor, batch):
    model, processor = model_and_processor
    assert batch["video_grid_thw"].tolist() == [[4, 14, 20]] * 2
    ids = batch["input_ids"][0]
    video = (ids == model.config.video_token_id).long()
    assert int(video.sum()) == 280 and int((video.diff() == 1).sum()) == 4  # four spans
    text = processor.tokenizer.decode(ids[batch["attention_mask"][0].bool()])
    stamps = [f"<{t:.1f} seconds><|vision_start|>" for t in (0.25, 1.25, 2.25, 3.25)]
    assert all(stamp in text for stamp in stamps)
    assert batch["attention_mask"].min() == 0, "prompts must differ in length to test left padding"


def test_none_is_the_stock_model(model_and_processor, batch):
    none_is_the_stock_model(model_and_processor[0], run, batch, [[280] * 36] * 2)


class Positions:
    """The positions [3, B, L] the language model's rotary embedding is asked for (the prompt's, then after each
    cut), recorded with a forward pre-hook."""

    def __init__(self, model):
        self.seen: list[torch.Tensor] = []
        self._hook = model.model.language_model.rotary_emb.register_forward_pre_hook(
            lambda module, args: self.seen.append(args[1]))

    def close(self) -> None:
        self._hook.remove()


def ratio_of(name: str) -> float:
    return method(name).example_budget / 576


@contextmanager
def keeps_the_timestamps(model, name: str, n_visual: int, single: dict, handle):
    """Around a video's run alone: every text token (the timestamps) is still there after every cut of its prefill,
    in its order, and every kept frame token stays between its own timestamps (temporal positions never decrease)."""
    positions = Positions(model)
    try:
        yield
    finally:
        positions.close()
    stock = model.model.get_rope_index(single["input_ids"], single["mm_token_type_ids"],
                                       video_grid_thw=single["video_grid_thw"])[0][:, 0]
    is_text = single["mm_token_type_ids"][0] == 0
    for pos in [p[:, 0] for p in positions.seen[:len(handle.trace.cuts) + 1]]:  # the prompt's, then after each cut
        text_rows = _subsequence(pos, stock[:, is_text])
        assert text_rows is not None, f"{name}: a text token (a timestamp?) is missing or moved"
        assert pos.shape[1] - len(text_rows) in {n_visual, *handle.trace.tokens_per_layer[0]}
        assert bool((pos[0].diff() >= 0).all()), f"{name}: a frame's token left its span"


@pytest.mark.parametrize("name", IMAGE_METHODS)
def test_every_method_on_videos(model_and_processor, batch, clips, name):
    """A batch of two videos with prompts of different lengths equals each alone; cached decoding equals re-running
    the prompt with the prefill's decisions; the tokens entering each decoder layer, counted with forward pre-hooks,
    are the trace's, and meet the ratio; the timestamps and spans hold after every cut (`keeps_the_timestamps`).
    (The video methods, which need more frames: `test_video_methods_on_videos`.)"""
    model, processor = model_and_processor
    ratio = ratio_of(name)
    singles = [encode(processor, [question], clips[i:i + 1]) for i, question in enumerate(QUESTIONS)]
    handle, trace = videos_batch_equals_alone(model, name, run, batch, singles, NEW_TOKENS,
                                              during_alone=partial(keeps_the_timestamps, model, name, 280),
                                              **({} if name == "none" else {"ratio": ratio}))
    if name != "none" and not method(name).counts_follow_content:  # the method's share of the nominal image, of each video's own 280 tokens (within one token
        # per temporal patch: whole counts per frame)
        described = handle.policy.describe()
        share = described.get("mean_tokens_entering_layers", described.get("equivalent_tokens")) / 576
        assert all(abs(sum(measured) / 36 - share * 280) <= 4 + 1 for measured in trace.tokens_per_layer), \
            (name, trace.tokens_per_layer)
        assert abs(share - ratio) < 0.05, (name, described)


LONG_FRAMES = 16  # 8 temporal patches of 70 tokens: DyCoke's official code needs more than 4, PruneVid 7
VIDEO_METHODS = [name for name in METHODS if method(name).video_only]


@pytest.fixture(scope="module")
def long_clips(demo_videos):
    return [read_frames(path, LONG_FRAMES) for path in demo_videos[:2]]


def video_ratio(name: str) -> float:
    """The video papers' 25%; DyCoke's official layout of 8 temporal patches keeps 3 of them whole (its floor is
    40%); PruneVid at 10%: its first stage keeps about 1/7 of these tiny random videos' tokens."""
    return {"dycoke": 0.5, "prunevid": 0.1}.get(name, 0.25)


@pytest.mark.parametrize("name", VIDEO_METHODS)
def test_video_methods_on_videos(model_and_processor, long_clips, name):
    """Every video method on videos of 8 temporal patches, each after its timestamp: a sample's visual tokens are one
    set across the spans (a temporal patch is a frame), the timestamps are never cut, every kept token stays in its
    own span, PruneVid's merged tokens in the span of the place they stand for (`keeps_the_timestamps`); the batch
    equals each video alone (DeepStack rows carried: a merged token's are its members' by its weights); counts
    measured with pre-hooks meet the ratio of each video's own 560 tokens (the video papers' retention ratios)."""
    model, processor = model_and_processor
    batch = encode(processor, QUESTIONS, long_clips)
    singles = [encode(processor, [question], long_clips[i:i + 1]) for i, question in enumerate(QUESTIONS)]
    ratio = video_ratio(name)
    handle, trace = videos_batch_equals_alone(model, name, run, batch, singles, NEW_TOKENS, ratio=ratio,
                                              during_alone=partial(keeps_the_timestamps, model, name, 560))
    for counts in trace.tokens_per_layer:
        mean = sum(counts) / 36
        if name == "prunevid":  # stage 1 then alpha of its tokens: each group's count rounded down (18 at most)
            assert counts[-1] < counts[0] and abs(mean - ratio * 560) <= 18 * 26 / 36, counts
        elif name == "dycoke":  # frames 0, 4, 6 whole, 5 pruned of m each
            assert counts == [3 * 70 + 5 * round((ratio * 560 - 3 * 70) / 5)] * 36
        elif name == "evs":
            assert counts == [int(ratio * 560)] * 36
        elif name == "holitom":  # its outer merge before the LLM, then its inner merge at layer 18's depth
            assert counts == sorted(counts, reverse=True) and len(set(counts)) == 2, counts
        else:  # VidCom2, FastVID: within half a token a frame
            assert counts == [counts[0]] * 36 and abs(mean - ratio * 560) <= 4, counts
    if name == "prunevid":  # the merged tokens' weights over the video's tokens (their DeepStack rows merge alike)
        assert all(selection[2].shape[1] == 560 for selection in trace.selections[0].values())


def hand_fed_logits(model, single: dict, kept: torch.Tensor, shift_deepstack: bool = False) -> torch.Tensor:
    """The stock decoder's last logits [1, V] on a one-video prompt with only its `kept` video tokens: their stock
    embeddings, 3-D positions and DeepStack rows, with every text token (the timestamps) between them, fed by hand.
    shift_deepstack: give each kept token the DeepStack rows of the token after it instead (a misalignment)."""
    ids = single["input_ids"][0]
    with torch.no_grad():
        encoded = model.model.get_video_features(single["pixel_values_videos"], single["video_grid_thw"])
        embeds = model.get_input_embeddings()(ids)
        positions = model.model.get_rope_index(single["input_ids"], single["mm_token_type_ids"],
                                               video_grid_thw=single["video_grid_thw"])[0]
    is_video = ids == model.config.video_token_id
    slots = is_video.nonzero()[:, 0]
    embeds[slots] = encoded.pooler_output[0].to(embeds.dtype)
    # the kept tokens in the method's order, each in its own span (at the span's first slot), the text in between
    span_start = torch.cummax(torch.where(is_video & ~torch.cat([is_video.new_zeros(1), is_video[:-1]]),
                                          torch.arange(len(ids)), 0), 0).values
    text = (~is_video).nonzero()[:, 0]
    step = 2 * len(ids)
    keys = torch.cat([text * step, span_start[slots[kept]] * step + 1 + torch.arange(kept.numel())])
    chosen = torch.cat([text, slots[kept]])[keys.argsort()]
    rows = (kept + 1).clamp(max=len(slots) - 1) if shift_deepstack else kept
    with torch.no_grad():
        hidden = model.model.language_model(
            inputs_embeds=embeds[chosen][None], position_ids=positions[:, :, chosen],
            visual_pos_masks=is_video[chosen][None],
            deepstack_visual_embeds=[level[0][rows] for level in encoded.deepstack_features]).last_hidden_state
        return model.lm_head(hidden[:, -1])


@pytest.mark.parametrize("name", ["evs", "vidcom2", "dycoke"])
def test_video_selection_equals_the_stock_decoder_fed_by_hand(model_and_processor, long_clips, name):
    """A video method's cut before the first decoder layer equals the stock decoder fed the kept video tokens'
    embeddings, original 3-D positions and DeepStack rows by hand, with all the timestamps; the kept tokens'
    DeepStack rows shifted by one token change the logits far beyond float noise (what the test catches)."""
    model, processor = model_and_processor
    single = encode(processor, QUESTIONS[:1], long_clips[:1])
    with visiondrop.apply(model, name, ratio=video_ratio(name)) as handle, torch.no_grad():
        pruned = model(**single).logits[:, -1]
    kept = handle.trace.kept[0][0]
    assert 0 < kept.numel() < 560
    torch.testing.assert_close(pruned, hand_fed_logits(model, single, kept), atol=1e-9, rtol=1e-9)
    assert (hand_fed_logits(model, single, kept, shift_deepstack=True) - pruned).abs().max() > 1e-2


def _subsequence(positions: torch.Tensor, text: torch.Tensor) -> list[int] | None:
    """The rows of `positions` [3, L] that are the text positions `text` [3, T], matched in order; None if some
    text position is not there in order. Text positions are equal on the three axes and increase, so a row that
    matches the next text position is that token."""
    rows, j = [], 0
    for r in range(positions.shape[1]):
        if j < text.shape[1] and torch.equal(positions[:, r], text[:, j]):
            rows.append(r)
            j += 1
    return rows if j == text.shape[1] else None


def test_plugin_runs_videos_with_timestamps(tiny_qwen3_dir, demo_videos):
    """The lmms-eval plugin on a video task: the clip decoded to 8 frames, the prompt with its four timestamps,
    VisionZip per temporal patch; the positional maps lay every kept token of every temporal patch on the grid."""
    from lmms_eval.api.instance import Instance

    from visiondrop.harness.lmms_model import PrunedLVLM

    docs = [{"visual": str(demo_videos[0]), "question": "What happens in the video?"}]
    lm = PrunedLVLM(pretrained=str(tiny_qwen3_dir), method="visionzip", ratio=0.25, frames=FRAMES)
    lm.task_dict = {"demo": {"test": docs}}
    request = Instance(request_type="generate_until", idx=0, metadata={"task": "demo", "doc_id": 0, "repeats": 1},
                       arguments=(docs[0]["question"], {"max_new_tokens": 2}, lambda d: [d["visual"]], 0, "demo",
                                  "test"))
    [answer] = lm.generate_until([request])
    assert isinstance(answer, str)
    trace, maps = lm.handle.trace, lm.position_maps
    assert trace.cuts == ["encoder"] and maps.modality == "video"
    assert int(maps.cuts["encoder"].kept.sum()) == len(trace.kept[0][0])
    assert abs(trace.mean_tokens[0] - 0.25 * 280) <= 4  # a quarter of each temporal patch's 70 tokens


@pytest.mark.parametrize("name", ["evs", "prunevid"])
def test_video_methods_on_the_moe(tiny_dir_of, long_clips, name):
    """The MoE variant (the same adapter; decoder layers that differ only in their MLP) runs the video methods on
    timestamped videos too: a cut that keeps (EVS) and one that merges then prunes inside (PruneVid) give each video
    alone the batch's answers, with the timestamps kept and counts measured with pre-hooks."""
    model, processor = load_tiny(tiny_dir_of("qwen3_vl_moe"))  # float32: its grouped expert matmuls take no float64
    processor.tokenizer.padding_side = "left"
    as_float = lambda inputs: {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}  # noqa: E731
    batch = as_float(encode(processor, QUESTIONS, long_clips))
    singles = [as_float(encode(processor, [question], long_clips[i:i + 1])) for i, question in enumerate(QUESTIONS)]
    ratio = video_ratio(name)
    _, trace = videos_batch_equals_alone(model, name, run, batch, singles, atol=1e-4, ratio=ratio,
                                         during_alone=partial(keeps_the_timestamps, model, name, 560))
    for counts in trace.tokens_per_layer:
        assert len(counts) == 48 and counts[-1] < 560
        if name == "evs":
            assert counts == [int(ratio * 560)] * 48
