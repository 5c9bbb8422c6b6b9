"""The block loops every method runs over open_clip's stock blocks, with the hooks they need.

`encode_image`: the visual pass, tapping the residual stream after chosen blocks (no ``ln_post``,
no ``proj``), with optional prompt tokens inserted between blocks (AdaCLIP) and an optional
``block_hook(i, x_in, x_out) -> x_out`` after every block (side paths beside a block: AnomalyCLIP's
V-V attention, Crane's E-Attn; per-block adapters: AA-CLIP). `embed_image` and `pool` are its two
ends, for methods that run the transformer over their own token subsets (WinCLIP's windows).
`encode_text`: the text pass with prompt tokens after the start token, optional input embeddings of
the method's own (learned context vectors) and the same hook. `side_attention` computes the
self-correlation attentions those side paths use from a block's own weights (through SDPA).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


def embed_image(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) -> (B, 1+N, W): patch embedding, class token, positional embedding (before ``ln_pre``)."""
    x = visual.conv1(images)                                    # (B, W, g, g)
    x = x.flatten(2).transpose(1, 2)                            # (B, N, W)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    return torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)


def pool(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, T, W) -> (B, D): ``ln_post`` of the class token (position 0), then the projection."""
    pooled = visual.ln_post(x[:, 0])
    return pooled @ visual.proj if visual.proj is not None else pooled


def encode_image(visual: nn.Module, images: torch.Tensor, out_layers: Sequence[int],
                 layer_prompts: Optional[Sequence[torch.Tensor]] = None, checkpoint: bool = False,
                 keep_cls: bool = False, block_hook: Optional[Callable] = None):
    """Visual pass with prompts inserted between blocks.

    images: (B, 3, S, S). layer_prompts: one (B, L, W) tensor per prompted layer 0..J-1, or None.
    Layer 0 appends the prompt after the patch tokens; layers 1..J-1 replace the last L tokens;
    later layers leave them in place. Returns the pooled, projected feature (B, D) and, per output
    layer (1-based: after block k), the patch tokens (B, N, W) right after that block (no prompt
    tokens; the class token first when ``keep_cls``: (B, 1+N, W)). ``block_hook(i, x)`` runs after
    block i (0-based) and returns the stream to continue with. ``checkpoint``: keep no block
    activations for backward, recompute them (same gradients, less memory).
    """
    x = embed_image(visual, images)                             # (B, 1+N, W)
    x = visual.patch_dropout(x)
    x = visual.ln_pre(x)
    n_tok = x.shape[1]

    want = set(out_layers)
    patch_tokens = []
    for i, block in enumerate(visual.transformer.resblocks):
        if layer_prompts is not None and i < len(layer_prompts):
            p = layer_prompts[i].to(x.dtype).expand(x.shape[0], -1, -1)  # (B, L, W)
            x = torch.cat([x if i == 0 else x[:, :n_tok], p], dim=1)
        x_in, x = x, run_block(block, x, checkpoint=checkpoint)
        if block_hook is not None:
            x = block_hook(i, x_in, x)
        if i + 1 in want:
            patch_tokens.append(x[:, 0 if keep_cls else 1:n_tok])   # (B, N, W) or (B, 1+N, W)
    return pool(visual, x), patch_tokens                        # class token ('tok' pooling), (B, D)


def run_block(block: nn.Module, x: torch.Tensor, *args, checkpoint: bool = False, **kwargs) -> torch.Tensor:
    """``block(x, ...)``, or the same with its activations recomputed in backward (activation
    checkpointing: frozen blocks still store what backward needs to reach the prompts)."""
    if checkpoint and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, x, *args, use_reentrant=False, **kwargs)
    return block(x, *args, **kwargs)


def encode_text(clip: nn.Module, tokens: torch.Tensor,
                layer_prompts: Optional[Sequence[torch.Tensor]] = None, truncate: bool = True,
                length: Optional[int] = None, embeddings: Optional[torch.Tensor] = None,
                block_hook: Optional[Callable] = None, project: bool = True) -> torch.Tensor:
    """Text pass with prompts replacing the tokens right after SOT in layers 1..J-1.

    tokens: (G, S, T) token ids, G groups of S sentences. layer_prompts: one (G or 1, L, Wt)
    tensor per prompted layer 0..J-1 (layer 0 is left untouched, as in the reference), or None.
    Returns EOT features after ``ln_final`` and the projection: (G, S, D).
    ``truncate`` drops the padding after the last EOT: exact, because attention is causal
    (no token sees a later one), and ~5x less work for 77-token contexts. ``length``: the tokens
    up to the last EOT, when the caller knows it (a plain int keeps exported graphs static).
    ``embeddings`` (G, S, T, Wt): the input token embeddings instead of ``token_embedding(tokens)``
    (learned context vectors; ``tokens`` still place the EOT). ``block_hook(i, x_in, x_out)`` as in
    `encode_image`. ``project=False``: the EOT features after ``ln_final`` only, (G, S, Wt).
    """
    G, S, T = tokens.shape
    tokens = tokens.reshape(G * S, T)
    eot = tokens.argmax(dim=-1)                                 # EOT has the highest id
    L = layer_prompts[0].shape[1] if layer_prompts else 0
    if truncate and not tokens.is_meta:
        n = max(length if length is not None else int(eot.max()) + 1, 1 + L)
    else:
        n = T
    cast = clip.transformer.get_cast_dtype()
    if embeddings is not None:
        x = embeddings.reshape(G * S, T, -1)[:, :n].to(cast)   # (G·S, n, Wt)
    else:
        x = clip.token_embedding(tokens[:, :n]).to(cast)       # (G·S, n, Wt)
    x = x + clip.positional_embedding[:n].to(cast)
    mask = clip.attn_mask[:n, :n] if clip.attn_mask is not None else None
    for i, block in enumerate(clip.transformer.resblocks):
        if layer_prompts is not None and 1 <= i < len(layer_prompts):
            p = layer_prompts[i].to(x.dtype)                     # (G or 1, L, Wt)
            p = p.unsqueeze(1).expand(G, S, L, p.shape[-1]).reshape(G * S, L, -1)
            x = torch.cat([x[:, :1], p, x[:, 1 + L:]], dim=1)
        x_in, x = x, block(x, attn_mask=mask)
        if block_hook is not None:
            x = block_hook(i, x_in, x)
    x = clip.ln_final(x)
    x = x[torch.arange(G * S, device=x.device), eot]            # (G·S, Wt)
    if not project:
        return x.reshape(G, S, -1)
    proj = clip.text_projection
    x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return x.reshape(G, S, -1)


def side_attention(block: nn.Module, x: torch.Tensor, kinds: Sequence[str] = ("vv",)) -> torch.Tensor:
    """Self-correlation attention from a block's own weights: for each kind ("qq", "kk", "vv") per head
    softmax(A Aᵀ / sqrt(d)) V with A the query, key or value projection of ``x``, summed over the kinds
    (not renormalised: Crane's E-Attn rows sum to 3), heads concatenated, then the block's output
    projection. ``x``: (B, T, W), already through ``ln_1``. AnomalyCLIP's V-V attention is ("vv",)."""
    attn = block.attn
    B, T, W = x.shape
    H = attn.num_heads
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    heads = lambda t: t.reshape(B, T, H, W // H).transpose(1, 2)          # noqa: E731  (B, H, T, d)
    parts = {"qq": heads(q), "kk": heads(k), "vv": heads(v)}
    value = parts["vv"]
    out = sum(F.scaled_dot_product_attention(parts[kind], parts[kind], value) for kind in kinds)   # (B, H, T, d)
    return attn.out_proj(out.transpose(1, 2).reshape(B, T, W))


def run_block_with_attention(block: nn.Module, x: torch.Tensor, attention: Callable) -> torch.Tensor:
    """A stock block with its attention replaced, residuals and MLP kept (AA-CLIP's in-stream V-V
    teacher): x + attention(ln_1(x)), then + MLP(ln_2(x))."""
    x = x + block.ls_1(attention(block.ln_1(x)))
    return x + block.ls_2(block.mlp(block.ln_2(x)))
