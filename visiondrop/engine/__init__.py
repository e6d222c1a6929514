"""The engine: mechanics shared by every method (cuts, masks, positions, caches, merging, trace)."""
from ..core import EncoderView
from .policy import DecoderCut, Policy, Selection
from .select import complement, contextual_merge, topk_in_order
from .trace import Trace

__all__ = ["DecoderCut", "EncoderView", "Policy", "Selection", "Trace", "complement", "contextual_merge",
           "topk_in_order"]
