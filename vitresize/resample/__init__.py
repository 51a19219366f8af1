"""Small, pure functions on shapes (``geometry``, ``conventions``) and on tensors (``pos_embed``, ``patch_embed``).

Only ``pos_embed`` and ``patch_embed`` import torch; the shape logic stays importable without it.
"""
