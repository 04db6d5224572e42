"""ONNX Runtime-fused transformer blocks for the ``ort`` export graph (see surgery/export/onnx.py).

:class:`FusedBlock` stands in for an open_clip residual block while exporting: its autograd
Function computes the block exactly in PyTorch and exports as com.microsoft contrib ops
(``Attention`` / ``MultiHeadAttention``, ``SkipLayerNormalization``, ``BiasGelu`` / ``FastGelu`` /
``QuickGelu``). :func:`fuse_blocks_` swaps a tower's blocks for them; :func:`fuse_residual_norms`
rewrites an exported graph so each block's residual add joins the next block's LayerNorm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import SurgeryError, UnfusableBlockError

ORT_CONTRIB_DOMAIN = "com.microsoft"


def _activation_kind(module: nn.Module) -> str:
    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else "gelu_tanh"
    if type(module).__name__ == "QuickGELU":
        return "quick_gelu"
    raise UnfusableBlockError(f"activation {type(module).__name__} has no fused ONNX Runtime op")


def _is_identity(module) -> bool:
    return module is None or isinstance(module, nn.Identity)


class _FusedBlockFunction(torch.autograd.Function):
    """Forward: the block's math in plain torch (what tracing sees). ONNX: com.microsoft contrib
    ops (MultiHeadAttention or Attention, SkipLayerNormalization, BiasGelu/FastGelu/QuickGelu)."""

    @staticmethod
    def forward(ctx, x, ln1_w, ln1_b, w_qkv, b_qkv, w_o, b_o, ln2_w, ln2_b, w_fc, b_fc, w_proj, b_proj,
                heads, eps1, eps2, causal, cls_only, act):
        batch, n_tok, width = x.shape  # x: (B, N, C)
        h = F.layer_norm(x, (width,), ln1_w, ln1_b, eps1)
        q, k, v = (h @ w_qkv + b_qkv).split(width, dim=-1)  # each (B, N, C)
        q = q[:, :1] if cls_only else q
        n_q = q.shape[1]
        q, k, v = (t.reshape(batch, -1, heads, width // heads).transpose(1, 2) for t in (q, k, v))  # (B, H, N, d)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, H, Nq, d)
        a = a.transpose(1, 2).reshape(batch, n_q, width)
        x = (x[:, :1] if cls_only else x) + a @ w_o + b_o  # (B, Nq, C)
        m = F.layer_norm(x, (width,), ln2_w, ln2_b, eps2) @ w_fc + b_fc
        m = F.gelu(m) if act == "gelu" else F.gelu(m, approximate="tanh") if act == "gelu_tanh" else m * torch.sigmoid(1.702 * m)
        return x + m @ w_proj + b_proj

    @staticmethod
    def symbolic(g, x, ln1_w, ln1_b, w_qkv, b_qkv, w_o, b_o, ln2_w, ln2_b, w_fc, b_fc, w_proj, b_proj,
                 heads, eps1, eps2, causal, cls_only, act):
        ms = ORT_CONTRIB_DOMAIN + "::"
        h = g.op("LayerNormalization", x, ln1_w, ln1_b, axis_i=-1, epsilon_f=eps1)
        if cls_only:  # the class token's query (B, 1, C) against every token's keys and values (B, N, C)
            width = w_o.type().sizes()[0]
            q = g.op("MatMul", _slice(g, h, 0, 1, axis=1), _slice(g, w_qkv, 0, width, axis=1))
            kv = g.op("MatMul", h, _slice(g, w_qkv, width, 3 * width, axis=1))  # (B, N, 2C)
            k, v = g.op("Split", kv, g.op("Constant", value_t=torch.tensor([width, width])), axis_i=-1, outputs=2)
            a = g.op(ms + "MultiHeadAttention", q, k, v, b_qkv, num_heads_i=heads)  # biases added inside
        else:  # Attention (QKV projection inside, prepacked per head) beat a MatMul + MultiHeadAttention
            # on ViT-B-32 at batch 1 and 32 (benchmarks/RESULTS.md)
            a = g.op(ms + "Attention", h, w_qkv, b_qkv, num_heads_i=heads, unidirectional_i=int(causal))
        skip = _slice(g, x, 0, 1, axis=1) if cls_only else x
        h2, _, _, x1 = g.op(ms + "SkipLayerNormalization", g.op("MatMul", a, w_o), skip, ln2_w, ln2_b, b_o,
                            epsilon_f=eps2, outputs=4)
        m = g.op("MatMul", h2, w_fc)
        if act == "gelu":
            m = g.op(ms + "BiasGelu", m, b_fc)
        elif act == "gelu_tanh":
            m = g.op(ms + "FastGelu", m, b_fc)
        else:
            m = g.op(ms + "QuickGelu", g.op("Add", m, b_fc), alpha_f=1.702)
        out = g.op("Add", g.op("Add", g.op("MatMul", m, w_proj), b_proj), x1)
        for value in (out, x1):
            value.setType(x.type().with_sizes(None) if hasattr(x.type(), "with_sizes") else x.type())
        return out


def _slice(g, value, start: int, end: int, axis: int):
    def const(v):
        return g.op("Constant", value_t=torch.tensor([v]))

    return g.op("Slice", value, const(start), const(end), const(axis))


class FusedBlock(nn.Module):
    """Export-time stand-in for one open_clip residual block (``x += attn(ln_1(x)); x += mlp(ln_2(x))``)
    holding its weights pre-transposed for ``x @ W``; LayerScale is folded into the output weights.
    ``cls_only``: the block returns the class token alone (B, 1, C) (its keys and values still come
    from every token): exact when the tower pools the class token after this, the last, block."""

    def __init__(self, block: nn.Module, causal: bool, cls_only: bool = False):
        super().__init__()
        attn = block.attn
        for name in ("ln_attn", "ln_1_kv"):
            if not _is_identity(getattr(block, name, None)):
                raise UnfusableBlockError(f"block has {name}")
        for name in ("ln_q", "ln_k", "ln_inner"):
            if not _is_identity(getattr(attn, name, None)):
                raise UnfusableBlockError(f"attention has {name}")
        if getattr(attn, "head_scale", None) is not None or getattr(attn, "logit_scale", None) is not None:
            raise UnfusableBlockError("attention has a head_scale or scaled-cosine logits")
        if getattr(attn, "head_mask", None) is not None or getattr(attn, "head_fill", None) is not None:
            raise UnfusableBlockError("attention carries a runtime head mask; bake it first")
        if getattr(attn, "bias_k", None) is not None or getattr(attn, "add_zero_attn", False):
            raise UnfusableBlockError("attention has bias_k/bias_v or add_zero_attn")
        if not getattr(attn, "batch_first", True):
            raise UnfusableBlockError("attention is not batch-first")
        if getattr(attn, "in_proj_weight", None) is None:
            raise UnfusableBlockError("attention has no packed in_proj_weight")
        mlp = block.mlp
        if not _is_identity(getattr(mlp, "ln", None)):
            raise UnfusableBlockError("MLP has an inner LayerNorm")
        for ln in (block.ln_1, block.ln_2):
            if not isinstance(ln, nn.LayerNorm) or not ln.elementwise_affine or len(ln.normalized_shape) != 1:
                raise UnfusableBlockError(f"norm {type(ln).__name__} is not an affine LayerNorm")
        self.act = _activation_kind(mlp.gelu)
        self.heads = int(attn.num_heads)
        self.causal, self.cls_only = bool(causal), bool(cls_only)
        self.eps1, self.eps2 = float(block.ln_1.eps), float(block.ln_2.eps)
        width = attn.in_proj_weight.shape[1]
        gamma1, gamma2 = _layer_scale(block.ls_1, width), _layer_scale(block.ls_2, width)

        def const(t):
            return t.detach().float().contiguous().clone()

        zeros = torch.zeros(3 * width)
        self.register_buffer("ln1_w", const(block.ln_1.weight))
        self.register_buffer("ln1_b", const(block.ln_1.bias))
        self.register_buffer("w_qkv", const(attn.in_proj_weight.t()))  # (C, 3C)
        self.register_buffer("b_qkv", const(attn.in_proj_bias if attn.in_proj_bias is not None else zeros))
        self.register_buffer("w_o", const(attn.out_proj.weight.t() * gamma1))  # (C, C)
        self.register_buffer("b_o", const(_bias(attn.out_proj, width) * gamma1))
        self.register_buffer("ln2_w", const(block.ln_2.weight))
        self.register_buffer("ln2_b", const(block.ln_2.bias))
        self.register_buffer("w_fc", const(mlp.c_fc.weight.t()))  # (C, 4C)
        self.register_buffer("b_fc", const(_bias(mlp.c_fc, mlp.c_fc.out_features)))
        self.register_buffer("w_proj", const(mlp.c_proj.weight.t() * gamma2))  # (4C, C)
        self.register_buffer("b_proj", const(_bias(mlp.c_proj, width) * gamma2))

    def get_weight_dtype(self) -> torch.dtype:  # open_clip's Transformer.get_cast_dtype asks the first block
        return self.w_qkv.dtype

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, N, C) -> (B, N, C), or (B, 1, C) when cls_only; the tower's mask is encoded by `causal`
        return _FusedBlockFunction.apply(
            x, self.ln1_w, self.ln1_b, self.w_qkv, self.b_qkv, self.w_o, self.b_o, self.ln2_w, self.ln2_b,
            self.w_fc, self.b_fc, self.w_proj, self.b_proj, self.heads, self.eps1, self.eps2, self.causal,
            self.cls_only, self.act)


def _layer_scale(module: nn.Module, width: int) -> torch.Tensor:
    if _is_identity(module):
        return torch.ones(width)
    gamma = getattr(module, "gamma", None)
    if gamma is None:
        raise UnfusableBlockError(f"residual scale {type(module).__name__} is not a LayerScale")
    return gamma.detach().float()


def _bias(linear: nn.Linear, width: int) -> torch.Tensor:
    return linear.bias.detach().float() if linear.bias is not None else torch.zeros(width)


def _causal_mask_ok(mask: torch.Tensor | None, n: int) -> bool:
    if mask is None or mask.shape != (n, n):
        return False
    want = torch.full((n, n), float("-inf")).triu(1)
    return bool(torch.equal(mask.float().isinf(), want.isinf()) and (mask.float()[~want.isinf()] == 0).all())


def fuse_blocks_(model: nn.Module, tower: str) -> None:
    """Replace the tower's residual blocks with :class:`FusedBlock` s (in place; use on a copy).
    Raises :class:`UnfusableBlockError` (leaving the model unchanged) when any part does not fit."""
    if tower == "vision":
        visual = model.visual
        owner, causal = visual, False
        if not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
            raise UnfusableBlockError(f"vision tower {type(visual).__name__} is not an open_clip ViT")
        cls_only = (getattr(visual, "attn_pool", None) is None and getattr(visual, "pool_type", None) == "tok"
                    and not getattr(visual, "output_tokens", False))
    else:
        owner = model.text if hasattr(model, "text") else model
        if getattr(owner, "cls_emb", None) is not None or getattr(owner, "use_pad_mask", False):
            raise UnfusableBlockError("text tower uses a class token or a padding mask")
        mask = getattr(owner, "attn_mask", None)
        causal = mask is not None
        if causal and not _causal_mask_ok(mask, owner.context_length if hasattr(owner, "context_length") else mask.shape[0]):
            raise UnfusableBlockError("text attention mask is not the plain causal mask")
        cls_only = False
    transformer = owner.transformer
    if not getattr(transformer, "batch_first", True):
        raise UnfusableBlockError("transformer is not batch-first")
    blocks = transformer.resblocks
    fused = [FusedBlock(b, causal, cls_only=cls_only and i == len(blocks) - 1) for i, b in enumerate(blocks)]
    for i, block in enumerate(fused):
        blocks[i] = block


def fuse_residual_norms(graph) -> int:
    """Rewrite ``LayerNormalization(Add(Add(MatMul, bias), residual))`` (one block's output feeding
    the next block's, or the final, norm) into one com.microsoft ``SkipLayerNormalization`` whose
    fourth output is the residual sum. In place on an onnx GraphProto; returns the number fused."""
    from onnx import helper

    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    initializers = {init.name: init for init in graph.initializer}
    outputs = {o.name for o in graph.output}
    dropped, added = set(), []
    for norm in graph.node:
        if norm.op_type != "LayerNormalization" or norm.domain not in ("", "ai.onnx") or len(norm.input) != 3:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in norm.attribute}
        if attrs.get("axis", -1) != -1 or len(norm.output) != 1 or norm.input[1] not in initializers \
                or norm.input[2] not in initializers:
            continue
        total = producer.get(norm.input[0])
        if total is None or total.op_type != "Add" or id(total) in dropped:
            continue
        biased = next((producer.get(i) for i in total.input if _is_bias_add(producer.get(i), initializers)), None)
        if biased is None or len(consumers.get(biased.output[0], [])) != 1 or biased.output[0] in outputs:
            continue
        residual = [i for i in total.input if i != biased.output[0]]
        bias = next(i for i in biased.input if i in initializers)
        hidden = next(i for i in biased.input if i != bias)
        if len(residual) != 1:
            continue
        sum_used = len(consumers.get(total.output[0], [])) > 1 or total.output[0] in outputs
        added.append(helper.make_node(
            "SkipLayerNormalization", [hidden, residual[0], norm.input[1], norm.input[2], bias],
            [norm.output[0], "", "", total.output[0] if sum_used else ""],
            name=f"{norm.name or total.name}_skip", domain=ORT_CONTRIB_DOMAIN, epsilon=float(attrs.get("epsilon", 1e-5))))
        dropped.update((id(norm), id(total), id(biased)))
    if added:
        kept = [n for n in graph.node if id(n) not in dropped] + added
        del graph.node[:]
        graph.node.extend(_topological(kept, graph))
    return len(added)


def _is_bias_add(node, initializers) -> bool:
    """An Add of a computed tensor and a 1-D initializer (a Linear's bias)."""
    if node is None or node.op_type != "Add" or len(node.input) != 2:
        return False
    consts = [i for i in node.input if i in initializers]
    return len(consts) == 1 and len(initializers[consts[0]].dims) == 1


def _topological(nodes: list, graph) -> list:
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(nodes), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise SurgeryError("internal error: the fused ONNX graph has a cycle")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    return ordered
