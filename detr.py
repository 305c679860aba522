"""
DETR: DEtection TRansformer (Carion et al., "End-to-End Object Detection with Transformers", 2020)
in one file, top to bottom in the order the data flows:

    image (B, 3, H, W) -> ResNet backbone -> 1x1 projection -> + 2-D sine positions
      -> 6 encoder layers -> 6 decoder layers over 100 learned object queries
      -> class head (K + 1) and box head (cx, cy, w, h) for every query

This file is the paper's model and nothing else: it reads and writes no file and imports no other file
of minidetr. Every weight format lives in lib/weights.py (`load_model('detr-r50')`), the loss in
train.py; the follow-up papers' changes extend this model in additions/model.py.

    python detr.py                               # parameter count per part of DETR-R50 (91 classes)
    python detr.py --backbone=resnet18 --num_classes=20
"""

import math
import sys

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops import box_convert
from torchvision.ops.misc import FrozenBatchNorm2d


# -----------------------------------------------------------------------------
# Backbone (paper §3.2 "Backbone")


BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")  # torchvision ResNets the backbone can be


class Backbone(nn.Module):
    """A torchvision ResNet up to its last stage: (B, 3, H, W) -> (B, C, H/32, W/32) (H/16 with dilation).

    BatchNorm is frozen (its statistics and affine parameters are buffers): detection batches are too
    small to estimate them (paper App. A.4). trainable_layers counts the stages that learn, from the top
    (the stem counting as one): 3 (layer2-4) as the official code, 0 for a frozen backbone, 5 for all.
    `dilation=True` turns the last stage's stride into dilation (the paper's DC5, stride 16). A backbone
    trained from scratch (the CPU configs) wants frozen_bn=False and trainable_layers=5.
    """

    def __init__(self, name="resnet50", dilation=False, trainable_layers=3, frozen_bn=True):
        super().__init__()
        resnet = getattr(torchvision.models, name)(
            weights=None,
            norm_layer=FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d,
            replace_stride_with_dilation=[False, False, dilation],
        )
        # keep the ResNet's own module names (conv1, bn1, layer1 ...), drop its pooling and classifier
        self.conv1, self.bn1, self.maxpool = resnet.conv1, resnet.bn1, resnet.maxpool
        self.stages = ["layer1", "layer2", "layer3", "layer4"]
        for stage in self.stages:
            setattr(self, stage, getattr(resnet, stage))
        self.num_channels = 512 if name in ("resnet18", "resnet34") else 2048
        self.freeze(trainable_layers)

    def freeze(self, trainable_layers):
        """Only the top trainable_layers stages learn (the stem counts as one)."""
        stages_from_top = [(stage,) for stage in reversed(self.stages)] + [("conv1", "bn1")]
        trainable = sum(stages_from_top[:trainable_layers], ())
        for name, p in self.named_parameters():
            p.requires_grad_(name.startswith(trainable))

    def train(self, mode=True):
        """A trained BatchNorm (frozen_bn=False) in a stage that does not learn keeps its statistics too."""
        super().train(mode)
        for bn in self.modules():
            if isinstance(bn, nn.BatchNorm2d) and not any(p.requires_grad for p in bn.parameters()):
                bn.eval()
        return self

    def forward(self, x):
        """The ResNet's own computation, written out so that each frozen BatchNorm folds into its conv."""
        x = self.maxpool(F.relu(conv_bn(self.conv1, self.bn1, x), inplace=True))
        for stage in self.stages:
            for block in getattr(self, stage):
                identity = x if block.downsample is None else conv_bn(*block.downsample, x)
                out = F.relu(conv_bn(block.conv1, block.bn1, x), inplace=True)
                if hasattr(block, "conv3"):  # bottleneck: 1x1, 3x3, 1x1
                    out = F.relu(conv_bn(block.conv2, block.bn2, out), inplace=True)
                    out = conv_bn(block.conv3, block.bn3, out)
                else:  # basic block: 3x3, 3x3
                    out = conv_bn(block.conv2, block.bn2, out)
                x = F.relu(out + identity, inplace=True)
        return x


def conv_bn(conv, bn, x):
    """bn(conv(x)). A frozen BatchNorm is a fixed per-channel affine map, so it folds into the conv's
    weights and bias: one pass over the activations instead of two (forward and backward), same result."""
    if not isinstance(bn, FrozenBatchNorm2d):
        return bn(conv(x))
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()  # (C_out,)
    weight = conv.weight * scale[:, None, None, None]
    bias = bn.bias - bn.running_mean * scale
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


# -----------------------------------------------------------------------------
# Positional encoding (paper §3.2 and App. A.4)


def sine_pos_embed(mask, dim=256, temperature=10000.0, scale=2 * math.pi):
    """2-D sine positional encoding of a feature map, computed from its padding mask.

    mask: (B, h, w) bool, True on padding. Returns (B, h, w, dim): the first dim/2 channels
    encode y, the last dim/2 encode x. Positions are counted over valid pixels only and normalised
    by each image's own valid height/width, so padding never shifts the position of a real pixel.
    """
    not_mask = ~mask
    y = not_mask.cumsum(1, dtype=torch.float32)  # 1, 2, ... down each column
    x = not_mask.cumsum(2, dtype=torch.float32)  # 1, 2, ... along each row
    eps = 1e-6
    y = y / (y[:, -1:, :] + eps) * scale  # the last row holds each column's valid height
    x = x / (x[:, :, -1:] + eps) * scale
    return torch.cat((sine_encode(y, dim // 2, temperature), sine_encode(x, dim // 2, temperature)), dim=3)


def sine_encode(x, dim, temperature=10000.0):
    """(...) -> (..., dim): x divided by dim/2 geometric frequencies; even channels take the sine,
    odd channels the cosine (channels 2j and 2j+1 share a frequency)."""
    i = torch.arange(dim, dtype=torch.float32, device=x.device)
    freq = temperature ** (2 * (i // 2) / dim)
    x = x[..., None] / freq  # (..., dim)
    return torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(-2)


# -----------------------------------------------------------------------------
# Transformer (paper §3.2, Fig. 10): post-norm layers, positions added to queries and keys only


class Attention(nn.Module):
    """Multi-head attention with the same parameters as nn.MultiheadAttention (so official weights
    load as they are): one (3C, C) input projection for q, k, v and an output projection."""

    def __init__(self, dim, num_heads, dropout):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False):
        """query (B, L, C), key and value (B, S, C), key_padding_mask (B, S) True on padding.
        Returns the output (B, L, C) and, if asked, the attention weights (B, heads, L, S)."""
        q, k, v = self.heads(query, key, value)
        # SDPA's boolean mask is True where attention is allowed: every query sees every real key
        allowed = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]  # (B, 1, 1, S)
        return self.attend(q, k, v, allowed, need_weights)

    def heads(self, query, key, value):
        """The input projections, split into heads: q (B, h, L, C/h), k and v (B, h, S, C/h)."""
        (B, L, C), S, h = query.shape, key.shape[1], self.num_heads
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = F.linear(query, w_q, b_q).view(B, L, h, C // h).transpose(1, 2)
        k = F.linear(key, w_k, b_k).view(B, S, h, C // h).transpose(1, 2)
        v = F.linear(value, w_v, b_v).view(B, S, h, C // h).transpose(1, 2)
        return q, k, v

    def attend(self, q, k, v, allowed, need_weights):
        """softmax(q k^T / sqrt(d)) v over the keys allowed (None: all), then the output projection."""
        B, h, L, _ = q.shape
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:  # the same computation written out, to keep the weights for plots
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, h, L, S)
            if allowed is not None:
                scores = scores.masked_fill(~allowed, float("-inf"))
            weights = scores.softmax(-1)
            out = F.dropout(weights, dropout, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
        out = out.transpose(1, 2).reshape(B, L, h * v.shape[-1])
        return self.out_proj(out), weights


class EncoderLayer(nn.Module):
    def __init__(self, dim, num_heads, dim_feedforward, dropout):
        super().__init__()
        self.dropout = dropout
        self.self_attn = Attention(dim, num_heads, dropout)
        self.linear1 = nn.Linear(dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, src, pos, mask, need_weights=False):
        """src, pos (B, HW, C); mask (B, HW) True on padding, or None."""
        q = k = src + pos
        attn, weights = self.self_attn(q, k, src, mask, need_weights)
        src = self.norm1(src + F.dropout(attn, self.dropout, self.training))
        ffn = self.linear2(F.dropout(F.relu(self.linear1(src)), self.dropout, self.training))
        src = self.norm2(src + F.dropout(ffn, self.dropout, self.training))
        return src, weights


class DecoderLayer(nn.Module):
    def __init__(self, dim, num_heads, dim_feedforward, dropout):
        super().__init__()
        self.dropout = dropout
        self.self_attn = Attention(dim, num_heads, dropout)
        self.cross_attn = Attention(dim, num_heads, dropout)
        self.linear1 = nn.Linear(dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, content, query_pos, memory, pos, mask, need_weights=False):
        """content, query_pos (B, Q, C); memory, pos (B, HW, C); mask (B, HW) True on padding, or None."""
        q = k = content + query_pos  # the queries talk to each other: this is what removes duplicates
        attn, _ = self.self_attn(q, k, content)
        content = self.norm1(content + F.dropout(attn, self.dropout, self.training))
        # then to the image, positions on queries and keys
        attn, weights = self.cross_attn(content + query_pos, memory + pos, memory, mask, need_weights)
        content = self.norm2(content + F.dropout(attn, self.dropout, self.training))
        ffn = self.linear2(F.dropout(F.relu(self.linear1(content)), self.dropout, self.training))
        content = self.norm3(content + F.dropout(ffn, self.dropout, self.training))
        return content, weights


# -----------------------------------------------------------------------------
# The detector (paper §3.2, Fig. 2)


class DETR(nn.Module):
    PARTS = {"backbone": ["backbone"], "input_proj": ["input_proj"], "encoder": ["encoder"],  # parameters_by_part's
             "decoder": ["decoder", "decoder_norm"], "query_embed": ["query_embed"], "class_head": ["class_head"],
             "box_head": ["box_head"]}

    def __init__(
        self,
        num_classes,
        backbone="resnet50",  # resnet18 / resnet34 / resnet50 / resnet101, or a built backbone (additions/model.py)
        dilation=False,  # DC5: dilate the last ResNet stage (paper §4, "DETR-DC5")
        trainable_layers=3,  # ResNet stages that learn, from the top: 3 as the paper, 0 freezes the backbone
        frozen_bn=True,  # False: a trained BatchNorm, for a backbone trained from scratch
        hidden_dim=256,
        num_heads=8,
        num_encoder_layers=6,
        num_decoder_layers=6,
        dim_feedforward=2048,
        dropout=0.1,
        num_queries=100,  # N, the most objects one image can hold (paper §3.1)
    ):
        super().__init__()
        # what rebuilds this model (checkpoints store it); the weights, pretrained or not, come from lib/weights.py
        self.config = dict(
            num_classes=num_classes, backbone=backbone, dilation=dilation, trainable_layers=trainable_layers,
            frozen_bn=frozen_bn, hidden_dim=hidden_dim, num_heads=num_heads, num_encoder_layers=num_encoder_layers,
            num_decoder_layers=num_decoder_layers, dim_feedforward=dim_feedforward, dropout=dropout,
            num_queries=num_queries,
        )
        problem = argument_problem(self.config)
        if problem:
            raise ValueError(f"{problem[0]}={self.config[problem[0]]!r} must be {problem[1]}")
        self.num_classes, self.num_queries = num_classes, num_queries
        self.classes = self.category_ids = None  # the outputs' names and dataset ids, where the weights give them
        # how lib/inference.py runs images through it: the paper's evaluation (2 images a batch as its training,
        # DC5 1), or the sizes, batch and autocast of the run that trained it (weights.load_model)
        self.eval_config = dict(val_scale=800, max_size=1333, batch_size=1 if dilation else 2, pad_to=1,
                                dtype="float32")
        if isinstance(backbone, str):
            backbone = Backbone(backbone, dilation, trainable_layers, frozen_bn)
        self.backbone = backbone
        self.input_proj = nn.Conv2d(self.backbone.num_channels, hidden_dim, kernel_size=1)
        self.encoder = nn.ModuleList(
            EncoderLayer(hidden_dim, num_heads, dim_feedforward, dropout) for _ in range(num_encoder_layers)
        )
        self.decoder = nn.ModuleList(
            DecoderLayer(hidden_dim, num_heads, dim_feedforward, dropout) for _ in range(num_decoder_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)  # shared by every decoder layer's output
        self.query_embed = nn.Embedding(num_queries, hidden_dim)  # the object queries
        self.class_head = nn.Linear(hidden_dim, num_classes + 1)  # the last class is "no object"
        self.box_head = mlp_layers(hidden_dim, hidden_dim, 4, 3)  # -> (cx, cy, w, h)
        # as the official code: Xavier for every transformer matrix, zero attention biases
        for layer in [*self.encoder, *self.decoder]:
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
            for attn in [m for m in layer.modules() if isinstance(m, Attention)]:
                nn.init.zeros_(attn.in_proj_bias)
                nn.init.zeros_(attn.out_proj.bias)

    def forward(self, images, mask=None, *, need_weights=False):
        """images (B, 3, H, W) ImageNet-normalised, padded bottom/right; mask (B, H, W) True on
        padding, or None when nothing is padded. need_weights=True also returns the attention weights
        of every layer (for plots; it uses a slower, written-out attention)."""
        memory, pos, feature_mask, token_mask, enc_weights = self.encode(images, mask, need_weights)
        # the decoder starts from zeros, and the N object queries enter as positions (§3.2)
        query_pos = self.query_embed.weight[None].expand(memory.shape[0], -1, -1)  # (B, N, C)
        content = torch.zeros_like(query_pos)
        hs, dec_weights = [], []
        for layer in self.decoder:
            content, weights = layer(content, query_pos, memory, pos, token_mask, need_weights)
            hs.append(self.decoder_norm(content))
            dec_weights.append(weights)
        hs = torch.stack(hs)  # (num_decoder_layers, B, N, C)
        logits = self.class_head(hs)  # (L, B, N, K+1)
        boxes = mlp(self.box_head, hs).sigmoid()  # (L, B, N, 4) cx, cy, w, h relative to the image's own size
        out = {
            "pred_logits": logits[-1],
            "pred_boxes": boxes[-1],
            # every earlier decoder layer is supervised too (paper §3.2, "Auxiliary decoding losses")
            "aux_outputs": [{"pred_logits": lg, "pred_boxes": bx} for lg, bx in zip(logits[:-1], boxes[:-1])],
        }
        if need_weights:
            out["enc_attn"] = enc_weights  # per layer (B, heads, hw, hw)
            out["dec_attn"] = dec_weights  # per layer (B, heads, N, hw): cross-attention over the features
            out["feat_size"] = tuple(feature_mask.shape[-2:])
        return out

    def encode(self, images, mask, need_weights=False):
        """The backbone and the encoder: memory and pos (B, hw, C), the feature map's padding mask
        (B, h, w), the tokens' (B, hw) or None, and the encoder's attention weights (None each unless asked)."""
        B = images.shape[0]
        features = self.backbone(images)  # (B, backbone.num_channels, h, w): 2048 x H/32 x W/32 for ResNet-50
        h, w = features.shape[-2:]
        if mask is None:  # nothing padded (inference at one size): no attention mask, SDPA's fastest kernel
            feature_mask = torch.zeros(B, h, w, dtype=torch.bool, device=images.device)
        else:
            feature_mask = F.interpolate(mask[:, None].float(), size=(h, w)).bool()[:, 0]  # (B, h, w), nearest
        pos = sine_pos_embed(feature_mask, self.input_proj.out_channels).flatten(1, 2)  # (B, hw, C)
        pos = pos.to(features.dtype)
        src = self.input_proj(features).flatten(2).transpose(1, 2).contiguous()  # (B, hw, C), as every layer's output
        token_mask = None if mask is None else feature_mask.flatten(1)  # (B, hw) True on padding
        enc_weights = []
        memory = src
        for layer in self.encoder:
            memory, weights = layer(memory, pos, token_mask, need_weights)
            enc_weights.append(weights)
        return memory, pos, feature_mask, token_mask, enc_weights

    def postprocess(self, outputs, sizes):
        """Model outputs -> one dict per image with `scores`, `labels` (Q,) and `boxes` (Q, 4) as absolute
        (x0, y0, x1, y1) pixels of the original image. sizes: (B, 2) of (height, width)."""
        scores, labels = self.class_probabilities(outputs["pred_logits"]).max(-1)  # (B, Q): each query's best class
        sizes = torch.as_tensor(sizes, dtype=torch.float32, device=scores.device)
        scale = torch.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], dim=1)  # (B, 4): w, h, w, h
        boxes = box_convert(outputs["pred_boxes"].float(), "cxcywh", "xyxy") * scale[:, None, :]
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]

    @staticmethod
    def class_probabilities(logits):
        """(..., K) each real class's probability: the softmax over K + 1, "no object" dropped."""
        return logits.softmax(-1)[..., :-1]


def argument_problem(args):
    """The first of DETR's arguments out of its range, as (name, what it must be), or None. DETR raises on
    them, and train.py checks its config with them (additions.model.argument_problem adds the additions')."""
    a = args
    rules = [
        ("num_classes", a.get("num_classes", 1) >= 1, ">= 1"),  # train.py's config has none: its dataset says it
        ("backbone", not isinstance(a["backbone"], str) or a["backbone"] in BACKBONES, ", ".join(BACKBONES)),
        ("dilation", not a["dilation"] or a["backbone"] in ("resnet50", "resnet101"),
         "False with resnet18/34 (DC5 dilates a bottleneck ResNet's last stage)"),
        ("trainable_layers", 0 <= a["trainable_layers"] <= 5, "0 to 5"),
        ("hidden_dim", a["hidden_dim"] >= 1 and a["num_heads"] >= 1 and a["hidden_dim"] % a["num_heads"] == 0,
         f"a multiple of num_heads={a['num_heads']} (>= 1)"),
        *((k, a[k] >= 1, ">= 1") for k in ("num_decoder_layers", "dim_feedforward", "num_queries")),
        ("num_encoder_layers", a["num_encoder_layers"] >= 0, ">= 0"),
        ("dropout", 0 <= a["dropout"] < 1, "in [0, 1)"),
    ]
    return next(((key, want) for key, ok, want in rules if not ok), None)


def mlp_layers(input_dim, hidden_dim, output_dim, num_layers):
    """The official MLP's layers: input_dim -> hidden_dim -> ... -> output_dim (applied by mlp)."""
    dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
    return nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))


def mlp(linears, x):
    """The official MLP: the linear layers in turn, with a ReLU between each two."""
    for i, linear in enumerate(linears):
        x = linear(x) if i == len(linears) - 1 else F.relu(linear(x))
    return x


# -----------------------------------------------------------------------------
# Parameter counts (python detr.py)


def parameters_by_part(model):
    """The model's parameters by part (model.PARTS), as `python detr.py` counts them and train.py logs their norms."""
    params = {name: [p for a in attrs if hasattr(model, a) for p in getattr(model, a).parameters()]
              for name, attrs in model.PARTS.items()}
    return {name: p for name, p in params.items() if p}


def summary(model):
    """Parameter counts per part, as the lines `python detr.py` prints."""
    lines = []
    for name, params in parameters_by_part(model).items():
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        lines.append(f"{name:<12} {total:>12,} params ({trainable:,} trainable)")
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    keys = len(model.state_dict())
    lines.append(f"{'total':<12} {total:>12,} params ({trainable:,} trainable), {keys} state-dict keys")
    return "\n".join(lines)


if __name__ == "__main__":
    from configurator import configure

    args = configure(dict(num_classes=91, backbone="resnet50"), sys.argv[1:])
    try:
        model = DETR(**args)
    except ValueError as e:  # argument_problem's line
        sys.exit(f"error: {e}")
    print(f"DETR with {args['backbone']} backbone, {args['num_classes']} classes")
    print(summary(model))
