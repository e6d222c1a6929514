"""The engine: mechanics shared by every method (cuts, masks, positions, caches, merging, trace)."""
from ..core import EncoderView
from .policy import DecodeStep, DecoderCut, Policy, Selection
from .select import complement, contextual_merge, topk_in_order, unmarked
from .trace import Trace

__all__ = ["DecodeStep", "DecoderCut", "EncoderView", "Policy", "Selection", "Trace", "complement", "contextual_merge",
           "topk_in_order", "unmarked"]
