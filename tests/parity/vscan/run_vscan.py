"""Run the OFFICIAL VScan LLaVA-1.5 path (github Tencent/SelfEvolvingAgent a82450e, VScan/, unmodified, exported to
./vscan) on the tiny parity model in original LLaVA format, float32 on CPU, as the shared vscan64 fixture was made:
LlavaLlamaForCausalLM_X with model.model.layer_list = [16], image_token_list = [T, keep] (model_vqa_loader's setup).

Instrumentation only (no change to the official code): encode_images' returned mask (the encoder's kept set),
torch.topk / Tensor.argmax inside encode_images (the scans' scores, the merge cosines), Tensor.topk inside
layer_prune (the LLM stage's scores), forward pre-hooks on the decoder layers (tokens per layer)."""
import json
import os
import sys

import torch

sys.path.insert(0, os.environ["OFFICIAL_CODE"])  # the official repository's code (its llava package's parent)

from llava.model.language_model.llava_llama_x import LlavaLlamaForCausalLM_X  # noqa: E402

PARITY = os.environ.get("VISIONDROP_SHARED", "../shared") + "/reference/parity"
MODEL = os.environ["ORIGINAL_MODEL"]  # the parity model in original LLaVA format (official.json: "model")
settings = [tuple(int(x) for x in s.split(":")) for s in sys.argv[1].split(",")]  # T:keep
out_path = sys.argv[2]
raw = torch.load(f"{PARITY}/visiondrop/inputs.pt")
ids = raw["input_ids"][0]
image = ids == 511
first = int(image.nonzero()[0])
input_ids = torch.cat([ids[:first], torch.tensor([-200]), ids[image.nonzero()[-1] + 1:]])[None]
pixels = raw["pixel_values"].float()

results, logits_out = {}, {}
for tokens, keep in settings:
    model = LlavaLlamaForCausalLM_X.from_pretrained(MODEL, torch_dtype=torch.float32,
                                                    visual_token_num=tokens, selected_indices=[]).eval()
    tower = model.get_vision_tower()
    if not tower.is_loaded:
        tower.load_model()
    model.model.layer_list = [16]
    model.model.image_token_list = [keep]
    model.model.image_token_list.insert(0, tokens)
    cap = {"topk": [], "argmax": [], "llm": []}
    topk, t_topk, t_argmax = torch.topk, torch.Tensor.topk, torch.Tensor.argmax
    encode, prune = model.encode_images, model.model.layer_prune

    def rec_topk(x, k, *a, **kw):
        cap["topk"].append((x.detach().clone(), k))
        return topk(x, k, *a, **kw)

    def rec_argmax(self, *a, **kw):
        cap["argmax"].append(self.detach().clone())
        return t_argmax(self, *a, **kw)

    def encode_images(images):
        torch.topk, torch.Tensor.argmax = rec_topk, rec_argmax
        try:
            feats, mask, att = encode(images)
        finally:
            torch.topk, torch.Tensor.argmax = topk, t_argmax
        cap["mask"] = mask.clone()
        return feats, mask, att

    def rec_t_topk(self, k, *a, **kw):
        cap["llm"].append((self.detach().clone(), k))
        return t_topk(self, k, *a, **kw)

    def layer_prune(*a, **kw):
        torch.Tensor.topk = rec_t_topk
        try:
            return prune(*a, **kw)
        finally:
            torch.Tensor.topk = t_topk

    model.encode_images = encode_images
    model.model.layer_prune = layer_prune
    lengths = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, kw: lengths.append((kw["hidden_states"] if "hidden_states" in kw else a[0]).shape[1]),
                                             with_kwargs=True) for layer in model.model.layers]
    with torch.inference_mode():
        out = model.generate(input_ids, images=pixels, image_sizes=[(336, 336)], do_sample=False, temperature=0,
                             top_p=None, num_beams=1, max_new_tokens=8, use_cache=True,
                             return_dict_in_generate=True, output_scores=True)
    for h in hooks:
        h.remove()
    step_logits = torch.stack([s[0] for s in out.scores])
    greedy = out.sequences[0].tolist()[-8:]
    kept = cap["mask"][0].nonzero()[:, 0].tolist()
    scores, k = cap["llm"][0]
    ordered = scores.sort(descending=True).values
    llm_gap = float(ordered[k - 1] - ordered[k])
    llm_kept_stage = t_topk(scores, k).indices.sort().values.tolist()
    deep, n_global = cap["topk"][-1]
    deep_sorted = deep[0].sort(descending=True).values
    global_gap = float(deep_sorted[n_global - 1] - deep_sorted[n_global])
    cosine = cap["argmax"][-1][0]  # [576 - T', T'] the merge's cosine
    top2 = cosine.topk(2, dim=1).values if cosine.shape[1] > 1 else None
    merge_gaps = (top2[:, 0] - top2[:, 1]) if top2 is not None else torch.tensor([])
    prefill = lengths[:32]
    name = f"vscan{(16 * tokens + 16 * keep) // 32}"
    results[name] = {
        "greedy_tokens": greedy,
        "visual_tokens_per_layer": [n - 55 for n in prefill],
        "encoder_kept_indices_sorted": kept,
        "llm_kept_indices_0_575": [kept[i] for i in llm_kept_stage],
        "margins": {"llm_cut_gap": llm_gap, "global_scan_gap": global_gap,
                    "merge_min_top1_minus_top2_cos": float(merge_gaps.min()) if len(merge_gaps) else None,
                    "merge_gaps_below_1e-5": int((merge_gaps < 1e-5).sum()),
                    "merge_gaps_below_1e-4": int((merge_gaps < 1e-4).sum())},
        "settings": {"visual_token_num": tokens, "layer_list": "[16]", "image_token_list": f"[{keep}]"},
    }
    logits_out[name] = {"step_logits": step_logits, "prefill_last_logits": step_logits[0],
                        "merge_nearest_kept_slot": t_argmax(cosine, dim=1), "merge_top1_minus_top2_cos": merge_gaps}
    print(name, greedy, results[name]["visual_tokens_per_layer"][:1], results[name]["visual_tokens_per_layer"][-1:],
          results[name]["margins"], flush=True)

json.dump(results, open(out_path + ".json", "w"), indent=1)
torch.save(logits_out, out_path + "_logits.pt")
