"""The shared backbone machinery: one frozen open_clip CLIP (`clip.py`), the block loops with the
hooks the methods need (`passes.py`), and the exact packed text pass (`text_packing.py`)."""
from .clip import (WEIGHTS_ENV, WeightsUnavailableError, build_clip, build_transform, config_quick_gelu,
                   default_out_layers, normalization, patch_size, weights_quick_gelu)
from .passes import (embed_image, encode_image, encode_text, pool, run_block, run_block_with_attention,
                     side_attention)

__all__ = ["WEIGHTS_ENV", "WeightsUnavailableError", "build_clip", "build_transform", "config_quick_gelu",
           "default_out_layers", "normalization", "patch_size", "weights_quick_gelu", "embed_image", "encode_image",
           "encode_text", "pool", "run_block", "run_block_with_attention", "side_attention"]
