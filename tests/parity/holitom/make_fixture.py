"""Run HoliTom's own outer stage (`select_static_windows`, `get_static_dynamic_features` and `holitom` of
`holitom/llava_arch.py`, with the methods they call: `merge_tokens_by_attention_density`, `merge_tokens_by_density`,
`merge_tokens_by_clustering`, `cluster_dpc_knn`) on random video features and attention, and save what it returns: the
parity fixture of baselines/holitom.py (tests/test_holitom.py).

    python make_fixture.py PATH/TO/holitom/llava_arch.py fixture.pt

The official file is loaded unmodified; the three LLaVA-NeXT modules it imports at the top (`llava.constants`,
`llava.mm_utils`, `llava.utils`, none used by these functions) are stand-ins. The calls between them are the ones of
its `prepare_inputs_labels_for_multimodal` for a video (normalise, cosine of consecutive frames, windows, retention
over what the windows leave, static/dynamic split, `holitom` per window, concatenated), with its one-token newline
layout ("one_token": no newline between windows). Its DPC-kNN adds `torch.rand(...) * 1e-6` to break density ties;
as the reference prescribes, `torch.rand` returns zeros here (the port adds no noise). Imports nothing of this project.
"""
import runpy
import sys
import types

import torch


def stand_ins() -> None:
    """The LLaVA-NeXT names the official module imports (unused by the functions run here)."""
    llava = types.ModuleType("llava")
    constants = types.ModuleType("llava.constants")
    for name in ("IGNORE_INDEX", "IMAGE_TOKEN_INDEX", "DEFAULT_IMAGE_PATCH_TOKEN", "DEFAULT_IM_START_TOKEN",
                 "DEFAULT_IM_END_TOKEN"):
        setattr(constants, name, None)
    mm_utils = types.ModuleType("llava.mm_utils")
    mm_utils.get_anyres_image_grid_shape = None
    utils = types.ModuleType("llava.utils")
    utils.rank0_print = utils.rank_print = lambda *args, **kwargs: None
    sys.modules.update({"llava": llava, "llava.constants": constants, "llava.mm_utils": mm_utils,
                        "llava.utils": utils})


def scenes(frames: int, tokens: int, channels: int, cuts: list[int], change: float, moving: float, generator):
    """Frames of a few scenes: each scene's frames repeat its first one up to `change` x noise, and a share `moving`
    of the places change on every frame (dynamic tokens)."""
    video = torch.empty(frames, tokens, channels)
    for start, end in zip([0, *cuts], [*cuts, frames]):
        scene = torch.randn(1, tokens, channels, generator=generator)
        video[start:end] = scene + change * torch.randn(end - start, tokens, channels, generator=generator)
    place = torch.rand(1, tokens, 1, generator=generator) < moving
    return torch.where(place, torch.randn(frames, tokens, channels, generator=generator), video)


def outer(official, video: torch.Tensor, attention: torch.Tensor, retain_ratio: float, tau: float):
    """The official caller's sequence for one video [F, N, D] and its pooled attention [F, N]."""
    frames, per_frame, _ = video.shape
    normed = torch.nn.functional.normalize(video, p=2, dim=-1)
    feature_sim = torch.nn.functional.cosine_similarity(normed[:-1], normed[1:], dim=-1)
    windows, reduced = official.select_static_windows(feature_sim, frames, tau, 1024)
    total = frames * per_frame
    ratio = min(retain_ratio / ((total - reduced) / total), 1)
    static, dynamic, _, dynamic_attn, static_pos, dynamic_pos = official.get_static_dynamic_features(
        video, attention, windows, feature_sim, tau)
    tokens = [official.holitom(static[i], dynamic[i], dynamic_attn[i], static_pos[i], dynamic_pos[i], end - start + 1,
                               ratio, 0.0, 0.6, 7, video.dtype, "one_token")
              for i, (start, end) in enumerate(windows)]
    return torch.cat(tokens), windows, reduced, ratio


def main(path: str, out: str) -> None:
    stand_ins()
    module = runpy.run_path(path)  # the official file, run as it is
    official = type("Official", (module["LlavaMetaForCausalLM_holitom"],), {})()
    generator = torch.Generator().manual_seed(0)
    draw = torch.rand
    cases = []
    for frames, cuts, change, moving, tokens, retain_ratio, tau in [
            (8, [4], 0.05, 0.2, 49, 0.25, 0.8), (16, [5, 11], 0.05, 0.3, 49, 0.15, 0.8),
            (16, [8], 0.2, 0.1, 36, 0.10, 0.65), (12, [], 0.02, 0.5, 49, 0.20, 0.8),
            (8, [2, 4, 6], 0.05, 0.2, 25, 0.30, 0.8), (32, [10, 20], 0.05, 0.2, 196, 0.10, 0.65),
            (6, [1, 2, 3, 4, 5], 0.05, 0.2, 16, 0.50, 0.8), (10, [5], 0.01, 0.0, 36, 0.05, 0.9)]:
        video = scenes(frames, tokens, 16, cuts, change, moving, generator)
        attention = torch.rand(frames, tokens, generator=generator)
        torch.rand = lambda *shape, **kwargs: torch.zeros(*shape, **kwargs)  # the DPC-kNN tie-break, zeroed
        merged, windows, reduced, ratio = outer(official, video, attention, retain_ratio, tau)
        torch.rand = draw
        cases.append({"features": video, "attention": attention, "retain_ratio": retain_ratio, "tau": tau,
                      "merged": merged, "windows": windows, "reduced": reduced, "ratio": ratio})
    torch.save({"cases": cases, "torch": str(torch.__version__)}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
