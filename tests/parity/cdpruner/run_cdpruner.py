"""Run the OFFICIAL CDPruner LLaVA-1.5 path (github Theia-4869/CDPruner 9541616, unmodified, exported to ./cdpruner)
on the tiny parity model in original LLaVA format, float32 on CPU, as the shared cd32 fixture was made.

Environment shims only (no change to the official code): torch.cuda.Stream / stream / synchronize are no-ops on
this CPU-only torch (the official tower schedules the text and image towers on two CUDA streams). Instrumentation:
encode_images' returned mask (the kept set), torch.argmax inside encode_images (the greedy MAP's residual gains),
forward pre-hooks on the decoder layers (tokens per layer), a forward hook on the vision tower (its image and text
embeds, which encode_images normalises) and a forward pre-hook on the CLIP text tower (its input ids). The relevance
stored is the official formula (encode_images' lines, same shapes) applied to the recorded embeds."""
import contextlib
import json
import os
import sys

import torch

sys.path.insert(0, os.environ["OFFICIAL_CODE"])  # the official repository's code (its llava package's parent)
torch.cuda.Stream = lambda *a, **k: None
torch.cuda.stream = lambda s: contextlib.nullcontext()
torch.cuda.synchronize = lambda *a, **k: None

from llava.model import LlavaLlamaForCausalLM  # noqa: E402

PARITY = os.environ.get("VISIONDROP_SHARED", "../shared") + "/reference/parity"
MODEL = os.environ["ORIGINAL_MODEL"]  # the parity model in original LLaVA format (official.json: "model")
budgets = [int(b) for b in sys.argv[1].split(",")]
out_path = sys.argv[2]
instruction = json.load(open(f"{PARITY}/cdpruner/official.json"))["cases"]["cd32"]["settings"]["instruction"]
raw = torch.load(f"{PARITY}/visiondrop/inputs.pt")
ids = raw["input_ids"][0]
image = ids == 511
first = int(image.nonzero()[0])
input_ids = torch.cat([ids[:first], torch.tensor([-200]), ids[image.nonzero()[-1] + 1:]])[None]
pixels = raw["pixel_values"].float()

results, logits_out = {}, {}
for budget in budgets:
    model = LlavaLlamaForCausalLM.from_pretrained(MODEL, torch_dtype=torch.float32,
                                                  visual_token_num=budget).eval()
    tower = model.get_vision_tower()
    if not tower.is_loaded:
        tower.load_model()
    tower.load_text_tower()
    captured = {"gains": []}
    encode = model.encode_images
    argmax = torch.argmax

    def recording_argmax(x, *a, **k):
        if x.dim() == 2 and x.shape[-1] == 576:
            captured["gains"].append(x[0].clone())
        return argmax(x, *a, **k)

    def encode_images(images, texts=None):
        torch.argmax = recording_argmax
        try:
            features, mask = encode(images, texts=texts)
        finally:
            torch.argmax = argmax
        captured["mask"] = mask.clone()
        return features, mask

    model.encode_images = encode_images
    projector_hook = model.get_model().mm_projector.register_forward_hook(
        lambda m, a, out: captured.__setitem__("projected", out[0].detach().clone()))
    tower_hook = tower.register_forward_hook(lambda m, a, out: captured.update(embeds=(out[1].clone(), out[2].clone())))
    text_hook = tower.text_tower.register_forward_pre_hook(
        lambda m, a, kw: captured.__setitem__("text_ids", kw["input_ids"].clone()), with_kwargs=True)
    lengths = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, kw: lengths.append((kw["hidden_states"] if "hidden_states" in kw else a[0]).shape[1]),
                                             with_kwargs=True) for layer in model.model.layers]
    with torch.inference_mode():
        out, n_visual = model.generate(input_ids, images=pixels, image_sizes=[(336, 336)], texts=instruction,
                                       do_sample=False, temperature=0, top_p=None, num_beams=1, max_new_tokens=8,
                                       use_cache=True, return_dict_in_generate=True, output_scores=True)
    for h in hooks + [projector_hook, tower_hook, text_hook]:
        h.remove()
    tokens = out.sequences[0].tolist()[-8:] if out.sequences.shape[1] > 8 else out.sequences[0].tolist()
    step_logits = torch.stack([s[0] for s in out.scores])
    kept = captured["mask"][0].nonzero()[:, 0].tolist()
    gains = torch.stack(captured["gains"])  # [T, 576] the residuals each step picks from
    top2 = gains.topk(2, dim=1).values
    gap = (top2[:, 0] - top2[:, 1]).tolist()
    picks = [int(argmax(g)) for g in gains]
    nan_from = next((i for i, g in enumerate(top2[:, 0].tolist()) if not g > 0), None)
    image_embeds, text_embeds = captured["embeds"]
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)  # as encode_images
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = (-torch.matmul(image_embeds, text_embeds.t())).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    fragile_steps = [i for i, g in enumerate(gap[:nan_from]) if g < 1e-6]
    stable = min(fragile_steps + [len(picks) if nan_from is None else nan_from])
    prefill = lengths[:32]
    name = f"cd{budget}"
    results[name] = {
        "greedy_tokens": tokens,
        "visual_tokens_per_layer": [n - 55 for n in prefill],
        "kept_indices_sorted": kept, "n_kept": len(kept),
        "kept_indices_selection_order": picks,
        "dpp_nan_from_step": nan_from,
        "margins": {"gain": top2[:, 0].tolist(), "gap_abs": gap,
                    "min_gap_abs": min(g for g in gap[:nan_from]) if nan_from != 0 else None,
                    "min_gap_step": min(range(len(gap[:nan_from])), key=lambda i: gap[i]) if nan_from != 0 else None,
                    "fragile_steps_gap_below_1e-6": fragile_steps},
        "fragile": bool(fragile_steps) or nan_from is not None, "stable_prefix_picks": stable,
        "generate_returned_visual_token_num": int(n_visual),
        "settings": {"visual_token_num": budget, "instruction": instruction},
    }
    logits_out[name] = {"step_logits": step_logits, "prefill_last_logits": step_logits[0],
                        "projected_visual_tokens": captured["projected"], "kernel_diag": gains[0],
                        "image_embeds_normalized": image_embeds[0], "text_embeds_normalized": text_embeds,
                        "relevance": relevance[0], "clip_text_input_ids": captured["text_ids"],
                        "selected_order": torch.tensor(picks), "dpp_gains": top2[:, 0].clone()}
    print(name, tokens, len(kept), nan_from, min(gap[:nan_from] or [None]) if nan_from != 0 else None, flush=True)

json.dump(results, open(out_path + ".json", "w"), indent=1)
torch.save(logits_out, out_path + "_logits.pt")
