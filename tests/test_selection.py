"""Selection and merging rules checked against values worked out by hand on small crafted tensors."""
import torch

from visiondrop.engine import DecoderCut, EncoderView, complement, contextual_merge, topk_in_order
from visiondrop.engine.attention import decoder_attention
from visiondrop.families import ModelInfo
from visiondrop.methods.visiondrop import Schedule, Stage, VisionDrop


def test_topk_keeps_sequence_order_and_complement():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2]])
    keep = topk_in_order(scores, 3)
    assert keep.tolist() == [[1, 2, 3]]  # top-3 are 1, 3, 2 by score; returned in sequence order
    assert complement(keep, 5).tolist() == [[0, 4]]


def test_contextual_merge_by_hand():
    # Five remaining tokens, two contextual tokens: stride 5 // 2 = 2, anchors are remaining positions 0 and 2.
    metric = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [1.0, 0.05]]])
    hidden = torch.arange(5 * 3, dtype=torch.float).view(1, 5, 3)
    merged, weights = contextual_merge(hidden, metric, torch.arange(5).unsqueeze(0), 2)
    # members 1 and 4 are closest to anchor 0, member 3 to anchor 2; token = anchor + mean(members)
    expected = torch.stack([hidden[0, 0] + (hidden[0, 1] + hidden[0, 4]) / 2, hidden[0, 2] + hidden[0, 3]])
    torch.testing.assert_close(merged[0], expected)
    assert weights.tolist() == [[[1.0, 0.5, 0.0, 0.0, 0.5], [0.0, 0.0, 1.0, 1.0, 0.0]]]  # what side rows merge by
    torch.testing.assert_close(weights @ hidden, merged)


def test_contextual_merge_anchor_without_members_is_itself():
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]]])
    hidden = torch.tensor([[[1.0], [10.0], [100.0]]])
    merged, _ = contextual_merge(hidden, metric, torch.tensor([[0, 1, 2]]), 3)  # every token is an anchor
    assert merged.flatten().tolist() == [1.0, 10.0, 100.0]


def _info() -> ModelInfo:
    return ModelInfo(n_visual=576, n_layers=32, vision_layer=22, cls_kept=False)


def test_visiondrop_encoder_keeps_cls_then_top_patches_in_raster_order():
    cls_attention = torch.zeros(1, 2, 7)  # CLS + 6 patches, two heads
    cls_attention[0, 0, 1:] = torch.tensor([0.1, 0.5, 0.0, 0.3, 0.0, 0.2])
    cls_attention[0, 1, 1:] = torch.tensor([0.0, 0.0, 0.4, 0.1, 0.0, 0.3])  # head sums: .1 .5 .4 .4 0 .5
    keys = torch.randn(1, 2, 7, 4)
    view = EncoderView(hidden=torch.randn(1, 7, 8), importance=cls_attention, keys=keys)
    policy = VisionDrop(Schedule(Stage(3, 1), ()), _info())
    sel = policy.select_encoder(view)
    assert sel.keep.tolist() == [[0, 2, 6]]  # CLS, then patches 2 and 6 (scores .5, .5) in raster order
    rest = torch.tensor([[1, 3, 4, 5]])
    torch.testing.assert_close(sel.merged, contextual_merge(view.hidden, keys.mean(1), rest, 1)[0])


def test_encoder_selection_without_cls_ranks_every_token():
    importance = torch.tensor([[[0.1, 0.5, 0.0, 0.3, 0.0, 0.2],  # no CLS: six tokens, two heads
                                [0.6, 0.0, 0.4, 0.1, 0.0, 0.3]]])  # head sums: .7 .5 .4 .4 0 .5
    keys = torch.randn(1, 2, 6, 4)
    view = EncoderView(hidden=torch.randn(1, 6, 8), importance=importance, keys=keys, has_cls=False)
    sel = VisionDrop(Schedule(Stage(3, 1), ()), _info()).select_encoder(view)
    assert sel.keep.tolist() == [[0, 1, 5]]  # token 0 is ranked like the others (it is no CLS)
    torch.testing.assert_close(sel.merged, contextual_merge(view.hidden, keys.mean(1), torch.tensor([[2, 3, 4]]), 1)[0])


class CraftedCut(DecoderCut):
    """A cut whose attention rows are given, to check the scoring rule alone."""

    def attention(self, layer_idx, queries, hidden=None, keys=None):
        return self.scratch["probs"]

    def keys(self, layer_idx, hidden=None):
        return self.scratch["keys"]


def test_visiondrop_decoder_score_is_mean_over_heads_and_visual_queries():
    # sequence: 1 text token, then 3 visual tokens (indices 1..3), then 1 text token
    probs = torch.zeros(1, 2, 3, 5)  # [G, heads, visual queries, keys]
    probs[0, 0] = torch.tensor([[0.5, 0.5, 0, 0, 0], [0.2, 0.2, 0.6, 0, 0], [0.1, 0.1, 0.1, 0.7, 0]])
    probs[0, 1] = torch.tensor([[0.0, 1.0, 0, 0, 0], [0.0, 0.9, 0.1, 0, 0], [0.4, 0.0, 0.0, 0.6, 0]])
    # visual columns 1..3, averaged over heads then over the 3 query rows (masked zeros included):
    # token 1: (.5+1 + .2+.9 + .1+0)/6 = .45, token 2: (0+0 + .6+.1 + .1+0)/6 = .1333, token 3: (.7+.6)/6 = .2167
    cut = CraftedCut(layer_idx=8, layers=None, hidden=torch.randn(1, 5, 4), prev_hidden=None,
                     mask=torch.ones(1, 5, dtype=torch.bool), cos=None, sin=None,
                     visual=torch.tensor([[1, 2, 3]]), original_visual=576, samples=[0],
                     scratch={"probs": probs, "keys": torch.randn(1, 2, 5, 4)})
    policy = VisionDrop(Schedule(None, ((8, Stage(2, 1)),)), _info())
    sel = policy.select_decoder(cut)
    assert sel.keep.tolist() == [[0, 2]]  # visual tokens 1 and 3 of the block, in order
    assert sel.merged.shape == (1, 1, 4)
    torch.testing.assert_close(sel.merged[0, 0], cut.hidden[0, 2])  # the only leftover is its own anchor


def test_partial_attention_rows_equal_the_layers_own_attention(tiny_dir):
    """The rows recomputed from q/k projections equal what the eager layer computes, under left padding."""
    from visiondrop.testing.tiny import load_tiny

    model, _ = load_tiny(tiny_dir, attn_implementation="eager")
    lm = model.model.language_model
    torch.manual_seed(0)
    embeds = torch.randn(2, 9, lm.config.hidden_size)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    out = lm(inputs_embeds=embeds, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    layer_idx = 5
    hidden = out.hidden_states[layer_idx]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cos, sin = lm.rotary_emb(hidden, pos)
    queries = torch.tensor([[4, 8], [5, 8]])
    rows = decoder_attention(lm.layers[layer_idx], hidden, cos, sin, mask.bool(), queries)
    reference = out.attentions[layer_idx].gather(2, queries[:, None, :, None].expand(-1, 4, -1, 9))
    torch.testing.assert_close(rows[0], reference[0])
    torch.testing.assert_close(rows[1][..., 3:], reference[1][..., 3:])  # real keys of the padded sample
    assert rows[1][..., :3].abs().max() == 0
