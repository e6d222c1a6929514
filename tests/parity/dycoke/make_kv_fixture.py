"""Build kv_fixture.pt: what DyCoke's own `PrunableDynamicCache` lets the decode steps attend to (README.md).

Usage: python make_kv_fixture.py <official modeling_qwen2.py> <output .pt>

The official module is loaded by path, unmodified, and driven as its `Qwen2Model.forward` drives it in a decode step
(q_len 1): for every layer below dycoke_l the cache's `kv_cache` is reset to None; at layer dycoke_l, with
`kv_cache` None, `dycoke_pruning` reads the previous layer's attention weights (`layer_outputs[1]`, [1, H, 1, kv]);
then each layer's `update` returns the keys its attention sees. The keys carry their own sequence index, so the keys
that layer dycoke_l receives say which cached tokens it attends to. The attention rows are random (a softmax of
random logits per head); some steps repeat the previous step's logits so that the attention changes little and the
official similarity test (>= 0.9) keeps the whole cache. Each case starts with a fresh `DycokeConfigs`-like state,
as one generation does here (the official state also carries over to the next sample; not reproduced).
"""
import importlib.util
import sys
from types import SimpleNamespace

import torch

START = 14  # image_token_start_index: the qwen_1_5 system prompt's length
LAYERS, HEADS, HEAD_DIM, LAYER = 6, 4, 8, 3  # a short decoder; dycoke_l = 3 as lmms-eval's default
STEPS = 10


def load(path):
    spec = importlib.util.spec_from_file_location("dycoke_modeling_qwen2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def keys_at(positions):
    """Keys [1, H, n, hd] whose first channel is each token's sequence index."""
    keys = torch.zeros(1, HEADS, len(positions), HEAD_DIM)
    keys[..., 0] = torch.as_tensor(positions, dtype=torch.float32)
    return keys


def run_case(official, generator, ttm_tokens, text_after, dycoke_p, steady):
    """One generation: prefill, then STEPS decode steps. Returns the attention rows and, per step, the sequence
    indices layer dycoke_l attended to."""
    prompt = START + ttm_tokens + 1 + text_after  # the frames' tokens, the newline, the question
    config = SimpleNamespace(dycoke_layer_idx=LAYER, dycoke_radio=dycoke_p, image_token_start_index=START,
                             image_token_length=ttm_tokens - 1,  # as `prepare_inputs_labels_for_multimodal` sets it
                             similarity=None, attention_score=None, seq_length_with_past=None)
    cache = official.PrunableDynamicCache()
    for layer in range(LAYERS):  # the prefill: no pruning (position_ids.shape[1] != 1)
        cache.kv_cache = None
        cache.update(keys_at(range(prompt)), keys_at(range(prompt)), layer)
    rows, attended = [], []
    logits = None
    for step in range(STEPS):
        kv = prompt + step + 1
        new = torch.randn(1, HEADS, 1, 1, generator=generator)
        if logits is not None and step in steady:  # the same attention as the step before, and the new token
            logits = torch.cat([logits, new], -1)
        else:
            logits = torch.randn(1, HEADS, 1, kv, generator=generator) * 3
        weights = logits.softmax(-1)
        rows.append(weights[0, :, 0])
        seen = None
        for layer in range(LAYERS):  # Qwen2Model.forward's loop, as the official code runs it
            config.seq_length_with_past = 1 + kv - 1
            if layer < LAYER:
                cache.kv_cache = None
            elif layer == LAYER and cache.kv_cache is None:
                cache.dycoke_pruning((None, weights), layer, config)
            keys, _ = cache.update(keys_at([kv - 1]), keys_at([kv - 1]), layer)
            if layer == LAYER:
                seen = keys[0, 0, :, 0].long()
        attended.append(seen)
    return {"ttm_tokens": ttm_tokens, "prompt": prompt, "dycoke_p": dycoke_p, "rows": rows, "attended": attended}


def main(path, out):
    official = load(path)
    generator = torch.Generator().manual_seed(0)
    cases = [run_case(official, generator, n, text, p, steady)
             for n, text, p, steady in [(40, 20, 0.8, {3, 4, 7}), (41, 9, 0.8, {2, 5, 6}), (58, 30, 0.7, {1, 8}),
                                        (23, 12, 0.5, {4}), (96, 15, 0.8, set()), (12, 5, 0.3, {2, 3, 4, 5})]]
    torch.save({"start": START, "layer": LAYER, "cases": cases}, out)
    kept_whole = sum(a.numel() == c["prompt"] + s + 1 for c in cases for s, a in enumerate(c["attended"]))
    print(f"{len(cases)} cases, {len(cases) * STEPS} decode steps, {kept_whole} with the whole cache -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
