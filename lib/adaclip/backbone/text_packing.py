"""The prompted text pass without repeated work (exact: the same features as `backbone.encode_text`).

With dynamic text prompts the text tower runs once per image over the 48 sentences of its class
name. Three things in that work repeat, and attention being causal lets each be done once:

- Layer 0 is never prompted, so its output depends on the class name only: computed once per class
  name and cached (`layer0`).
- From layer 1 on, positions 0..L (start token and the L prompt tokens) are the same in every
  sentence of an image and see only each other: they are computed once per image, as a shared prefix.
- Sentences differ in length (for "bottle" the end token sits at positions 8 to 13) and many begin
  alike ("a bad photo of a bottle with flaw" / "... with defect"): each distinct token prefix is
  computed once, up to each sentence's end token. These positions are packed behind the shared
  prefix, and a mask lets each see the prefix and its own earlier tokens, nothing else
  (`scaled_dot_product_attention` with that mask).

For "bottle" with L = 5 that is 1 + 5 + 185 packed positions per image instead of 48 x 14.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .passes import run_block


@dataclass
class Packing:
    """Where one class name's sentences sit in the packed sequence (for a prompt length L)."""
    suffix_rows: torch.Tensor   # (Σ,) a sentence holding each packed position
    suffix_cols: torch.Tensor   # (Σ,) its token position in that sentence
    eot_index: torch.Tensor     # (S,) position of each sentence's end token in the packed sequence
    mask: torch.Tensor          # (1+L+Σ, 1+L+Σ) bool, True = may attend

    @classmethod
    def build(cls, tokens: torch.Tensor, L: int) -> "Packing":
        """tokens: (S, T) ids of one class name's sentences.

        A position's state depends on the tokens up to it (causal attention; the layer-0 states
        too, which still carry the words the prompts replace), so sentences that agree on their
        first p + 1 tokens share position p: each distinct token prefix is packed once (a trie),
        and a position attends to the shared prompt prefix and to its own ancestors.
        """
        ids = tokens.tolist()
        eot = tokens.argmax(-1).tolist()                            # EOT has the highest id
        index, parent, rows, cols, eot_index = {}, [], [], [], []
        for s, e in enumerate(eot):
            if e <= L:                                             # end token inside the prompt: the prefix's
                eot_index.append(e)
                continue
            up = -1                                                # -1: the shared prefix
            for p in range(1 + L, e + 1):
                key = tuple(ids[s][:p + 1])
                if key not in index:
                    index[key] = len(rows)
                    rows.append(s)
                    cols.append(p)
                    parent.append(up)
                up = index[key]
            eot_index.append(1 + L + up)
        n = 1 + L + len(rows)
        mask = torch.zeros(n, n, dtype=torch.bool)
        mask[:1 + L, :1 + L] = torch.ones(1 + L, 1 + L, dtype=torch.bool).tril()
        mask[1 + L:, :1 + L] = True
        for i in range(len(rows)):                                 # itself and its ancestors
            j = i
            while j >= 0:
                mask[1 + L + i, 1 + L + j] = True
                j = parent[j]
        return cls(torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long),
                   torch.tensor(eot_index, dtype=torch.long), mask)


def supported(clip: nn.Module) -> bool:
    """Plain pre-norm blocks with nn.MultiheadAttention (the CLIP text towers open_clip builds)."""
    return all(isinstance(b.attn, nn.MultiheadAttention) and isinstance(getattr(b, "ln_attn", nn.Identity()), nn.Identity)
               for b in clip.transformer.resblocks)


def block_forward(block: nn.Module, x: torch.Tensor, mask: torch.Tensor, rows=None) -> torch.Tensor:
    """open_clip's ResidualAttentionBlock on (B, T, W) with a boolean attention mask (T, T).
    ``rows``: compute only these positions' outputs (B, R, W) (all positions still serve as keys)."""
    attn = block.attn
    B, T, W = x.shape
    H = attn.num_heads
    h = block.ln_1(x)
    k, v = F.linear(h, attn.in_proj_weight[W:], attn.in_proj_bias[W:]).chunk(2, dim=-1)
    if rows is not None:
        x, h, mask = x[:, rows], h[:, rows], mask[rows]
    q = F.linear(h, attn.in_proj_weight[:W], attn.in_proj_bias[:W])
    q, k, v = (t.reshape(B, -1, H, W // H).transpose(1, 2) for t in (q, k, v))      # (B, H, T, W/H)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(x.device))
    x = x + block.ls_1(F.linear(out.transpose(1, 2).reshape(B, -1, W), attn.out_proj.weight, attn.out_proj.bias))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


@torch.no_grad()
def layer0(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(S, T) ids -> (S, n, Wt): the unprompted layer 0 over each sentence up to the last end token.
    Computed outside any autocast region: the cached result serves full- and mixed-precision calls."""
    n = int(tokens.argmax(-1).max()) + 1
    cast = clip.transformer.get_cast_dtype()
    with torch.autocast(tokens.device.type, enabled=False):
        x = clip.token_embedding(tokens[:, :n]).to(cast) + clip.positional_embedding[:n].to(cast)
        mask = clip.attn_mask[:n, :n] if clip.attn_mask is not None else None
        return clip.transformer.resblocks[0](x, attn_mask=mask)


def encode_text_packed(clip: nn.Module, first: torch.Tensor, packing: Packing, layer_prompts,
                       checkpoint: bool = False) -> torch.Tensor:
    """The prompted text pass from layer 1 on, for G images of one class name.

    first: `layer0` of the class name's sentences (S, n, Wt); layer_prompts: one (G or 1, L, Wt)
    tensor per prompted layer (layer 0's is unused, as in the reference). Returns (G, S, D).
    """
    if len(layer_prompts) < 2:
        raise ValueError("the packed text pass needs prompts from layer 1 on (prompt depth >= 2)")
    G = max(p.shape[0] for p in layer_prompts)
    L = layer_prompts[0].shape[1]
    suffix = first[packing.suffix_rows, packing.suffix_cols]                          # (Σ, Wt)
    x = torch.cat([first[:1, :1].expand(G, 1, -1), first.new_zeros(G, L, first.shape[-1]),
                   suffix[None].expand(G, -1, -1)], dim=1)                             # (G, 1+L+Σ, Wt)
    blocks = clip.transformer.resblocks
    eot = packing.eot_index.to(x.device)
    for i, block in enumerate(blocks[1:], start=1):
        if i < len(layer_prompts):                         # replace the prompt positions (layers 1..J-1)
            x = torch.cat([x[:, :1], layer_prompts[i].to(x.dtype).expand(G, -1, -1), x[:, 1 + L:]], dim=1)
        # the last block only needs the end tokens' outputs (every position still serves as a key)
        x = run_block(partial(block_forward, block), x, packing.mask, rows=eot if i == len(blocks) - 1 else None,
                      checkpoint=checkpoint)
    x = clip.ln_final(x if len(blocks) > 1 else x[:, eot])                             # (G, S, Wt)
    proj = clip.text_projection
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj
