"""Run HoliTom's own inner merge (`Qwen2Model_holitom.forward` of `holitom/modeling_qwen2.py`, the forward the official
`holitom(model)` puts on transformers' `Qwen2Model`) on a small random Qwen2 decoder with random input embeddings, and
save what enters its layer 18: the inner parity fixture of baselines/holitom.py (tests/test_holitom.py).

    python make_inner_fixture.py PATH/TO/holitom/modeling_qwen2.py inner_fixture.pt

The official file is loaded unmodified, in transformers 4.51.3 (it imports `LossKwargs`, `can_return_tuple` and
`dynamic_rope_update`), with SDPA attention as the official runs, HOLITOM_k 18 and HOLITOM_r 0.5 (the eval scripts'),
and the visual span given as the official LLaVA code sets it (`image_token_posi`, `image_tokens`). Forward hooks
record what layer 17 returns (the hidden states before the merge and its attention probabilities, from
`output_attentions=True`) and a pre-hook what enters layer 18 (the merged hidden states and their position ids).
Imports nothing of this project.
"""
import os
import runpy
import sys

import torch
from transformers import Qwen2Config

LAYERS, K, RATIO = 20, 18, 0.5


def main(path: str, out: str) -> None:
    os.environ.update(HOLITOM_k=str(K), HOLITOM_r=str(RATIO))
    official = runpy.run_path(path)["Qwen2Model_holitom"]  # the official file, run as it is
    config = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         attn_implementation="sdpa")
    cases = []
    for seed, (length, start, visual) in enumerate([(60, 5, 40), (90, 14, 49), (48, 3, 31), (120, 10, 100)]):
        torch.manual_seed(seed)
        model = official(config).eval()
        model.image_token_posi, model.image_tokens = [start], [visual]
        seen = {}
        model.layers[K - 1].register_forward_hook(
            lambda module, args, output: seen.update(before=output[0][0].clone(), attention=output[1][0].clone()))
        model.layers[K].register_forward_pre_hook(
            lambda module, args, kwargs: seen.update(after=args[0][0].clone(), positions=kwargs["position_ids"][0]),
            with_kwargs=True)
        embeds = torch.randn(1, length, config.hidden_size)
        with torch.no_grad():
            model(inputs_embeds=embeds, use_cache=True)
        cases.append({"start": start, "visual": visual, **seen})
    versions = {"torch": str(torch.__version__), "transformers": sys.modules["transformers"].__version__}
    torch.save({"cases": cases, **versions}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
