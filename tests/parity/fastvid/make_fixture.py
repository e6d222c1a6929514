"""Run FastVID's own pruning (the official `Qwen2Model.forward` of its LLaVA-OneVision code, unmodified) on random
video embeddings and save what enters its first decoder layer: the parity fixture of baselines/fastvid.py
(tests/test_fastvid.py).

    python make_fixture.py PATH/TO/fastvid_llavaonevision/LLaVA-NeXT/llava/model/language_model/modeling_qwen2.py fixture.pt

Imports nothing of this project. The official module (it needs transformers 4.51.3 and loguru) is loaded by path and
its `Qwen2Model` built at a tiny width (one layer); `set_my_kwargs` gives it the video's span, frame count, frames'
attention rows and global features, as its LLaVA code does. Its DPC-kNN tie-breaking noise (`torch.rand`) is zeroed.
Settings where a frame keeps no context token are left out (the official
merge raises on an empty anchor set). Per video and setting: the position ids and hidden states entering layer 0 (a
forward pre-hook) of the video's tokens FastVID kept, in order, as original indices (the text around the video is
checked here to pass unchanged at its own positions).
"""
import itertools
import runpy
import sys

import torch

TEXT_BEFORE, TEXT_AFTER, WIDTH = 5, 7, 16
#: (retention, STPrune_d, DTM_p, DTM_beta): the official setting's neighbours, and a low beta once
SETTINGS = [*itertools.product((0.1, 0.25), (0.4, 0.6), (1, 2, 4), (0.6,)), (0.25, 0.4, 4, 0.2)]


def frame_features(frames: int, runs: int, generator: torch.Generator) -> torch.Tensor:
    """Global features of `frames` frames in `runs` scenes: frames of a scene nearly alike (cosine above 0.9)."""
    scene = torch.randint(0, runs, (frames,), generator=generator).sort().values
    centres = torch.randn(runs, 24, generator=generator)
    return centres[scene] + 0.05 * torch.randn(frames, 24, generator=generator)


def main(path: str, out: str) -> None:
    official = runpy.run_path(path)  # the official file, run as it is
    generator = torch.Generator().manual_seed(0)
    rand = torch.rand
    torch.rand = lambda *args, **kwargs: torch.zeros(*args, **{k: v for k, v in kwargs.items() if k != "generator"})
    cases = []
    try:
        for frames, per_frame, runs in [(32, 196, 5), (32, 196, 12), (16, 49, 3), (8, 24, 8), (12, 36, 2)]:
            video = torch.randn(frames * per_frame, WIDTH, generator=generator)
            before = torch.randn(TEXT_BEFORE, WIDTH, generator=generator)
            after = torch.randn(TEXT_AFTER, WIDTH, generator=generator)
            embeds = torch.cat([before, video, after])[None]
            attention = torch.rand(frames, 1, per_frame, generator=generator).softmax(-1)
            features = frame_features(frames, runs, generator)
            kept = []
            for share, context, stride, beta in SETTINGS:
                if int(int(per_frame * share) * context) == 0:  # no context token: the official merge raises
                    continue
                config = official["Qwen2Config"](
                    hidden_size=WIDTH, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=100, max_position_embeddings=8192,
                    fastvid_retention_ratio=share, fastvid_DySeg_c=min(8, frames), fastvid_DySeg_tau=0.9,
                    fastvid_STPrune_d=context, fastvid_DTM_p=stride, fastvid_DTM_beta=beta)
                config._attn_implementation = "eager"
                model = official["Qwen2Model"](config).eval()
                model.set_my_kwargs(TEXT_BEFORE, frames * per_frame, frames, attention, features)
                seen = {}
                model.layers[0].register_forward_pre_hook(
                    lambda module, args, kwargs: seen.update(hidden=args[0] if args else kwargs["hidden_states"],
                                                             position_ids=kwargs["position_ids"]), with_kwargs=True)
                with torch.no_grad():
                    model(inputs_embeds=embeds, use_cache=False)
                positions, hidden = seen["position_ids"][0], seen["hidden"][0]
                # the text around the video stays, at its own positions
                assert torch.equal(positions[:TEXT_BEFORE], torch.arange(TEXT_BEFORE))
                assert torch.equal(hidden[:TEXT_BEFORE], before) and torch.equal(hidden[-TEXT_AFTER:], after)
                end = TEXT_BEFORE + frames * per_frame
                assert torch.equal(positions[-TEXT_AFTER:], torch.arange(end, end + TEXT_AFTER))
                kept.append({"share": share, "segments": min(8, frames), "tau": 0.9, "context_share": context,
                             "stride": stride, "beta": beta, "keep": positions[TEXT_BEFORE:-TEXT_AFTER] - TEXT_BEFORE,
                             "tokens": hidden[TEXT_BEFORE:-TEXT_AFTER].clone()})
            cases.append({"video": video.view(frames, per_frame, WIDTH), "attention": attention[:, 0],
                          "features": features, "kept": kept})
    finally:
        torch.rand = rand
    torch.save({"cases": cases, "torch": str(torch.__version__)}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
