"""
DETR: DEtection TRansformer (Carion et al., "End-to-End Object Detection with Transformers", 2020)
in one file, top to bottom in the order the data flows:

    image (B, 3, H, W) -> ResNet backbone -> 1x1 projection -> + 2-D sine positions
      -> 6 encoder layers -> 6 decoder layers over 100 learned object queries
      -> class head (K + 1) and box head (cx, cy, w, h) for every query

This file is the model and nothing else: it reads and writes no file and imports no other file of
minidetr. Every weight format (the official checkpoints, minidetr's own, Hugging Face transformers
folders) lives in lib/weights.py (`weights.load_model('detr-r50')`); the loss is in train.py. The paper's DETR ends at the
banner "Additions beyond the paper": what follows it is optional, each section one follow-up paper.

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
    """A torchvision ResNet up to its last stage: (B, 3, H, W) -> (B, C, H/32, W/32) (H/16 with
    dilation or feature_stride 16, H/8 with feature_stride 8).

    BatchNorm is frozen (its statistics and affine parameters are buffers), because detection
    batches are too small to estimate them (paper App. A.4 / official code). trainable_layers counts
    the stages that learn, from the top (torchvision's convention, the stem counting as one): 3
    (layer2-4, the stem and layer1 frozen) as in the official code, 0 for a frozen backbone, 5 for
    all. With feature_stride < 32 it counts over the stages that remain. `dilation=True`
    turns the last stage's stride into dilation (the paper's DC5 models, stride 16). Frozen
    statistics and a frozen stem only make sense for pretrained weights (weights.load_imagenet_backbone
    loads ImageNet's): a backbone trained from scratch (the CPU configs) wants frozen_bn=False, a
    trained BatchNorm, and trainable_layers=5.

    feature_stride=16 or 8 stops after layer3 or layer2 (not in the paper): a 64-pixel image then
    gives a 4x4 or 8x8 token grid instead of 2x2, and the dropped stages cost nothing.
    """

    def __init__(self, name="resnet50", dilation=False, trainable_layers=3, frozen_bn=True, feature_stride=32):
        super().__init__()
        resnet = getattr(torchvision.models, name)(
            weights=None,
            norm_layer=FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d,
            replace_stride_with_dilation=[False, False, dilation],
        )
        # keep the ResNet's own module names (conv1, bn1, layer1 ...), drop its pooling and classifier
        self.conv1, self.bn1, self.maxpool = resnet.conv1, resnet.bn1, resnet.maxpool
        num_stages = {8: 2, 16: 3, 32: 4}[feature_stride]
        self.stages = [f"layer{i}" for i in range(1, num_stages + 1)]
        for stage in self.stages:
            setattr(self, stage, getattr(resnet, stage))
        self.num_channels = (64 if name in ("resnet18", "resnet34") else 256) * 2 ** (num_stages - 1)
        stages_from_top = [(stage,) for stage in reversed(self.stages)] + [("conv1", "bn1")]  # the stem counts as one
        trainable = sum(stages_from_top[:trainable_layers], ())
        for pname, p in self.named_parameters():
            if not pname.startswith(trainable):
                p.requires_grad_(False)

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
    def __init__(
        self,
        num_classes,
        backbone="resnet50",  # resnet18 / resnet34 / resnet50 / resnet101
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
        # not in the paper, all off by default (then this is exactly the paper's DETR); see the
        # sections "Additions beyond the paper" below
        feature_stride=32,  # 16 or 8: features from layer3 or layer2, a finer token grid for small images
        anchor_queries=False,  # DAB-DETR: each query is a box, refined by every decoder layer
        encoder_proposals=False,  # two-stage: the boxes start as the encoder's best tokens (needs anchor_queries)
        denoising_groups=0,  # DN-DETR: noised copies of the ground truth as extra queries (needs anchor_queries)
        query_groups=1,  # Group DETR: this many groups of queries in training, each matched on its own
        conditional_cross_attn=False,  # Conditional DETR / DAB-DETR: a box-made spatial query in cross-attention (needs anchor_queries)
        cls_loss="ce",  # how the class head is trained, so read: 'ce' (the paper's softmax), 'focal' or 'iou_aware' (sigmoid)
        look_forward_twice=False,  # DINO: a layer's box loss reaches the layer before (needs anchor_queries)
        dn_contrastive=False,  # DINO: each denoising group gets negatives, far-noised copies that say "no object" (needs denoising_groups)
    ):
        super().__init__()
        # what rebuilds this model (checkpoints store it); the weights, pretrained or not, come from lib/weights.py
        self.config = dict(
            num_classes=num_classes, backbone=backbone, dilation=dilation, trainable_layers=trainable_layers, frozen_bn=frozen_bn,
            hidden_dim=hidden_dim, num_heads=num_heads, num_encoder_layers=num_encoder_layers,
            num_decoder_layers=num_decoder_layers, dim_feedforward=dim_feedforward, dropout=dropout,
            num_queries=num_queries, feature_stride=feature_stride, anchor_queries=anchor_queries,
            encoder_proposals=encoder_proposals, denoising_groups=denoising_groups, query_groups=query_groups,
            conditional_cross_attn=conditional_cross_attn, cls_loss=cls_loss, look_forward_twice=look_forward_twice,
            dn_contrastive=dn_contrastive,
        )
        problem = argument_problem(self.config)
        if problem:
            raise ValueError(f"{problem[0]}={self.config[problem[0]]!r} must be {problem[1]}")
        self.num_classes, self.num_queries = num_classes, num_queries
        self.anchor_queries, self.encoder_proposals = anchor_queries, encoder_proposals
        self.denoising_groups, self.query_groups = denoising_groups, query_groups
        self.conditional_cross_attn = conditional_cross_attn
        self.sigmoid_classes, self.look_forward_twice, self.dn_contrastive = cls_loss != "ce", look_forward_twice, dn_contrastive
        self.classes = self.category_ids = None  # the outputs' names and dataset ids, where the weights' file gives them
        # how images are run through it (lib/inference.py): the paper's evaluation (2 images a batch as its training, DC5 1),
        # or the sizes, batch and autocast of the run that trained it (weights.load_model)
        self.eval_config = dict(val_scale=800, max_size=1333, batch_size=1 if dilation else 2, pad_to=1, dtype="float32")
        self.backbone = Backbone(backbone, dilation, trainable_layers, frozen_bn, feature_stride)
        self.input_proj = nn.Conv2d(self.backbone.num_channels, hidden_dim, kernel_size=1)
        self.encoder = nn.ModuleList(
            EncoderLayer(hidden_dim, num_heads, dim_feedforward, dropout) for _ in range(num_encoder_layers)
        )
        self.decoder = nn.ModuleList(
            DecoderLayer(hidden_dim, num_heads, dim_feedforward, dropout) for _ in range(num_decoder_layers)
        )  # (with an addition, AdditionsDecoderLayer: add_addition_modules below)
        self.decoder_norm = nn.LayerNorm(hidden_dim)  # shared by every decoder layer's output
        self.query_embed = nn.Embedding(num_queries * query_groups, hidden_dim)  # the object queries (x query_groups: addition 4)
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
        add_addition_modules(self)  # not in the paper: nothing when every addition is off

    def forward(self, images, mask=None, targets=None, need_weights=False):
        """images (B, 3, H, W) ImageNet-normalised, padded bottom/right; mask (B, H, W) True on
        padding, or None when nothing is padded. targets: only for denoising_groups in training
        (the targets of train.py's SetCriterion, on the model's device). need_weights=True also
        returns the attention weights of every layer (for plots; it uses a slower, written-out attention)."""
        B = images.shape[0]
        features = self.backbone(images)  # (B, backbone.num_channels, h, w): 2048 x H/32 x W/32 for ResNet-50
        h, w = features.shape[-2:]
        if mask is None:  # nothing padded (inference at one size): no attention mask, so SDPA may take its fastest kernel
            feature_mask = torch.zeros(B, h, w, dtype=torch.bool, device=images.device)
        else:
            feature_mask = F.interpolate(mask[:, None].float(), size=(h, w)).bool()[:, 0]  # (B, h, w), nearest
        pos = sine_pos_embed(feature_mask, self.input_proj.out_channels).flatten(1, 2)  # (B, hw, C)
        pos = pos.to(features.dtype)
        src = self.input_proj(features).flatten(2).transpose(1, 2).contiguous()  # (B, hw, C), laid out as every layer's output
        token_mask = None if mask is None else feature_mask.flatten(1)  # (B, hw) True on padding

        enc_weights = []
        memory = src
        for layer in self.encoder:
            memory, weights = layer(memory, pos, token_mask, need_weights)
            enc_weights.append(weights)
        if self.anchor_queries or self.query_groups > 1:  # not in the paper: see "Additions beyond the paper" below
            return decode_with_additions(self, memory, pos, feature_mask, token_mask, targets, need_weights, enc_weights)

        # the paper (§3.2): the decoder starts from zeros, and the N object queries enter as positions
        query_pos = self.query_embed.weight[None].expand(B, -1, -1)  # (B, N, C)
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
            out["feat_size"] = (h, w)
        return out


def argument_problem(args):
    """The first of DETR's arguments out of its range, as (name, what it must be), or None. The one place
    these rules live: DETR raises on them, and train.py checks its config with them before any work."""
    a = args
    rules = [
        ("num_classes", a.get("num_classes", 1) >= 1, ">= 1"),  # train.py's config has none: its dataset says it
        ("backbone", a["backbone"] in BACKBONES, ", ".join(BACKBONES)),
        ("dilation", not a["dilation"] or (a["backbone"] in ("resnet50", "resnet101") and a["feature_stride"] == 32),
         "False with resnet18/34 or feature_stride < 32 (DC5 dilates a bottleneck ResNet's last stage)"),
        ("trainable_layers", 0 <= a["trainable_layers"] <= 5, "0 to 5"),
        ("hidden_dim", a["hidden_dim"] >= 1 and a["num_heads"] >= 1 and a["hidden_dim"] % a["num_heads"] == 0,
         f"a multiple of num_heads={a['num_heads']} (>= 1)"),
        *((k, a[k] >= 1, ">= 1") for k in ("num_decoder_layers", "dim_feedforward", "num_queries", "query_groups")),
        *((k, a[k] >= 0, ">= 0") for k in ("num_encoder_layers", "denoising_groups")),
        ("dropout", 0 <= a["dropout"] < 1, "in [0, 1)"),
        ("feature_stride", a["feature_stride"] in (8, 16, 32), "8, 16 or 32"),
        ("anchor_queries", a["anchor_queries"] or not (a["encoder_proposals"] or a["denoising_groups"] or a["conditional_cross_attn"]
                                                       or a["look_forward_twice"]),
         "True for encoder_proposals, denoising_groups, conditional_cross_attn or look_forward_twice (their queries are boxes)"),
        ("cls_loss", a["cls_loss"] in CLS_LOSSES, ", ".join(map(repr, CLS_LOSSES))),
        ("dn_contrastive", not a["dn_contrastive"] or a["denoising_groups"] > 0, "False without denoising_groups (its negatives are denoising queries)"),
    ]
    return next(((key, want) for key, ok, want in rules if not ok), None)


def postprocess(outputs, sizes, sigmoid=False):
    """Model outputs -> one dict per image with `scores`, `labels` (Q,) and `boxes` (Q, 4) as absolute
    (x0, y0, x1, y1) pixels of the original image. sizes: (B, 2) of (height, width). sigmoid: the
    model's sigmoid_classes (a class head trained with a sigmoid loss, addition 6: K outputs, each
    class its own probability, no "no object")."""
    logits = outputs["pred_logits"]
    probs = logits.sigmoid() if sigmoid else logits.softmax(-1)[..., :-1]  # drop "no object"
    scores, labels = probs.max(-1)  # (B, Q): the best real class of each query
    sizes = torch.as_tensor(sizes, dtype=torch.float32, device=scores.device)
    scale = torch.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], dim=1)  # (B, 4): w, h, w, h
    boxes = box_convert(outputs["pred_boxes"].float(), "cxcywh", "xyxy") * scale[:, None, :]
    return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]


def mlp_layers(input_dim, hidden_dim, output_dim, num_layers):
    """The official MLP's layers: input_dim -> hidden_dim -> ... -> output_dim (applied by mlp)."""
    dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
    return nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))


def mlp(linears, x):
    """The official MLP: the linear layers in turn, with a ReLU between each two."""
    for i, linear in enumerate(linears):
        x = linear(x) if i == len(linears) - 1 else F.relu(linear(x))
    return x


# =============================================================================
# Additions beyond the paper
#
# Vanilla DETR learns slowly: 500 epochs for 42.0 AP on COCO (paper Table 1), and from scratch on a
# small set it sits for thousands of steps where every query predicts the same thing. Each section
# below is one follow-up paper's fix, switched on by one DETR argument (one config key in train.py)
# and off by default: with all of them off, nothing below runs and the model above is the paper's.
# Their loss terms sit beside the set loss in train.py, under the same titles.


# -----------------------------------------------------------------------------
# Where the additions enter DETR: their modules, the decoder layer they need, and the decoder's loop
# with anchor boxes, proposals, denoising queries and groups (DETR.forward's one marked dispatch)


def add_addition_modules(model):
    """The parameters of each addition switched on (each explained in its section below)."""
    c, dim = model.config, model.config["hidden_dim"]
    queries = c["num_queries"] * c["query_groups"]
    if c["anchor_queries"] or c["query_groups"] > 1:  # the same parameters, a forward that takes masks and spatial parts
        for layer in model.decoder:
            layer.__class__ = AdditionsDecoderLayer
    if c["anchor_queries"]:  # a query's position is an MLP of its box's sine encoding (DAB-DETR Eq. 2)
        model.box_pos_head = mlp_layers(2 * dim, dim, dim, 2)
        if not c["encoder_proposals"]:  # learned boxes (before the sigmoid), one per query
            model.anchor_embed = nn.Embedding(queries, 4)
            init_anchors(model.anchor_embed.weight)
    if model.sigmoid_classes:  # K outputs, no "no object", each starting at the prior probability (addition 6)
        model.class_head = sigmoid_class_head(dim, c["num_classes"])
    if c["encoder_proposals"]:  # every encoder token proposes a box (Deformable DETR §4.2, two-stage)
        model.proposal_proj = nn.Linear(dim, dim)
        model.proposal_norm = nn.LayerNorm(dim)
        model.proposal_class_head = (sigmoid_class_head(dim, c["num_classes"]) if model.sigmoid_classes
                                     else nn.Linear(dim, c["num_classes"] + 1))
        model.proposal_box_head = mlp_layers(dim, dim, 4, 3)
        model.proposal_size = 0.05 * c["feature_stride"] / 8  # the tokens' anchor side (Deformable DETR: 0.05 at stride 8)
    if c["denoising_groups"]:  # a noised ground-truth label enters the decoder as its embedding
        model.label_embed = nn.Embedding(c["num_classes"], dim)
    if c["conditional_cross_attn"]:  # a spatial query made from each box, a spatial key from each position
        model.spatial_scale_head = mlp_layers(dim, dim, dim, 2)
        model.spatial_size_head = mlp_layers(dim, dim, 2, 2)
        model.spatial_query_proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(c["num_decoder_layers"]))
        model.spatial_key_proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(c["num_decoder_layers"]))
        for part in (model.spatial_scale_head, model.spatial_size_head, model.spatial_query_proj, model.spatial_key_proj):
            for p in part.parameters():
                if p.dim() > 1:  # Xavier, as Conditional DETR's and DAB-DETR's code give every transformer matrix
                    nn.init.xavier_uniform_(p)


class AdditionsDecoderLayer(DecoderLayer):
    """DecoderLayer with what the additions add: a self-attention mask (which queries see which: query
    groups, denoising) and, for conditional_cross_attn (addition 5), the cross-attention's spatial query
    and key with whether the positions are added to its content part too (its first layer only)."""

    def forward(self, content, query_pos, memory, pos, mask, need_weights=False, self_attn_mask=None, spatial=None):
        q = k = content + query_pos
        attn, _ = masked_attention(self.self_attn, q, k, content, self_attn_mask)
        content = self.norm1(content + F.dropout(attn, self.dropout, self.training))
        query, key = content + query_pos, memory + pos
        if spatial is not None and not spatial[2]:  # addition 5 after its first layer: position is in the spatial part alone
            query, key = content, memory
        allowed = None if mask is None else ~mask[:, None, None, :]
        attn, weights = masked_attention(self.cross_attn, query, key, memory, allowed, need_weights, spatial)
        content = self.norm2(content + F.dropout(attn, self.dropout, self.training))
        ffn = self.linear2(F.dropout(F.relu(self.linear1(content)), self.dropout, self.training))
        content = self.norm3(content + F.dropout(ffn, self.dropout, self.training))
        return content, weights


def masked_attention(attn, query, key, value, allowed=None, need_weights=False, spatial=None):
    """An Attention's computation where allowed (L, S) or (B, 1, L, S) is True where query l may attend
    to key s, and spatial, a second part (B, L, C), (B, S, C) that each head's query and key get beside
    their own: each head's dot product becomes content . content + space . space (addition 5)."""
    q, k, v = attn.heads(query, key, value)  # (B, h, L, C/h), (B, h, S, C/h)
    if spatial is not None:
        B, h, L, S = *q.shape[:3], k.shape[2]
        q = torch.cat([q, spatial[0].view(B, L, h, -1).transpose(1, 2)], dim=-1)  # (B, h, L, 2C/h)
        k = torch.cat([k, spatial[1].view(B, S, h, -1).transpose(1, 2)], dim=-1)
    return attn.attend(q, k, v, allowed, need_weights)


def decode_with_additions(model, memory, pos, feature_mask, token_mask, targets, need_weights, enc_weights):
    """DETR.forward's decoder and heads when an addition changes the queries: the paper's outputs, and the
    additions' own (enc_outputs: the encoder proposals, dn_outputs: the denoising queries', start_boxes)."""
    Q = model.num_queries * (model.query_groups if model.training else 1)  # addition 4 trains K groups, infers with one
    additions = {}
    content, query_pos, boxes, self_attn_mask, additions["enc_outputs"] = initial_queries(model, Q, memory, feature_mask, targets)
    hs, dec_weights, layer_boxes, spatial = [], [], [], None
    start_boxes = boxes  # None with query groups alone
    for i, layer in enumerate(model.decoder):
        if boxes is not None:  # addition 1 (and 5): each layer's positions come from the current boxes
            query_pos, spatial = box_positions(model, i, content, boxes, pos)
        content, weights = layer(content, query_pos, memory, pos, token_mask, need_weights, self_attn_mask, spatial)
        hs.append(model.decoder_norm(content))
        dec_weights.append(weights)
        if boxes is not None:  # addition 1: ... and each layer moves the boxes; the next layer starts from them,
            reference = layer_boxes[-1] if model.look_forward_twice and layer_boxes else boxes  # (addition 7)
            layer_boxes.append(refine_boxes(model, hs[-1], reference))  # but the refinement is not back-propagated
            boxes = layer_boxes[-1].detach()  # through the layers (Deformable DETR, DAB-DETR)
    hs = torch.stack(hs)  # (num_decoder_layers, B, Q, C)
    logits = model.class_head(hs)  # (L, B, Q, K+1)
    if start_boxes is None:
        boxes = mlp(model.box_head, hs).sigmoid()
    else:  # addition 1 (and 3): the refined boxes; the denoising queries' outputs set apart
        logits, boxes, additions["start_boxes"], additions["dn_outputs"] = split_denoising_queries(
            model, logits, torch.stack(layer_boxes), start_boxes, Q)
    out = {
        "pred_logits": logits[-1],
        "pred_boxes": boxes[-1],
        "aux_outputs": [{"pred_logits": lg, "pred_boxes": bx} for lg, bx in zip(logits[:-1], boxes[:-1])],
        **{k: v for k, v in additions.items() if v is not None},
    }
    if need_weights:
        out.update(enc_attn=enc_weights, dec_attn=dec_weights, feat_size=tuple(feature_mask.shape[-2:]))
    return out


def initial_queries(model, Q, memory, feature_mask, targets):
    """The queries the decoder starts from when an addition changes them: content (B, Q', C), query_pos
    (B, Q', C) or None (then made from the boxes), boxes (B, Q', 4) or None, the self-attention mask
    (Q', Q') or (B, 1, Q', Q') or None, and the encoder proposals' outputs or None. Q counts every
    query group in training (addition 4); Q' = Q plus the denoising queries, which come last (addition 3)."""
    B = memory.shape[0]
    query_embed = model.query_embed.weight[:Q][None].expand(B, -1, -1)  # (B, Q, C)
    enc_outputs = None
    if not model.anchor_queries:  # query groups alone: the paper's queries, K times
        content, query_pos, boxes = torch.zeros_like(query_embed), query_embed, None
    else:  # the embeddings are the queries' content, their positions come from boxes (DAB-DETR)
        content, query_pos = query_embed, None
        if model.encoder_proposals:
            enc_outputs, proposals = propose_boxes(model, memory, feature_mask)
            boxes = proposals.repeat(1, Q // model.num_queries, 1)
        else:
            boxes = model.anchor_embed.weight[:Q].sigmoid()[None].expand(B, -1, -1)  # (B, Q, 4)
    self_attn_mask = group_attention_mask(Q, model.num_queries, content.device) if Q > model.num_queries else None
    if model.denoising_groups and model.training and targets is not None:
        content, boxes, self_attn_mask = add_denoising_queries(model, targets, content, boxes, self_attn_mask)
    return content, query_pos, boxes, self_attn_mask, enc_outputs


def box_positions(model, i, content, boxes, pos):
    """Decoder layer i's query positions (B, Q, C), an MLP of the boxes' sine encoding (DAB-DETR
    Eq. 2), and its spatial query and key with conditional_cross_attn (else None)."""
    box_sine = sine_encode(boxes * 2 * math.pi, content.shape[-1] // 2)  # (B, Q, 4, C/2): cx, cy, w, h
    query_pos = mlp(model.box_pos_head, box_sine.flatten(-2))
    spatial = spatial_query_and_key(model, i, content, boxes, box_sine, pos) if model.conditional_cross_attn else None
    return query_pos, spatial


def refine_boxes(model, layer_out, boxes):
    """A decoder layer's boxes (B, Q, 4): its box head's offset (before the sigmoid) moves the boxes it
    was given. layer_out (B, Q, C)."""
    return (mlp(model.box_head, layer_out) + inverse_sigmoid(boxes)).sigmoid()


def split_denoising_queries(model, logits, boxes, start_boxes, Q):
    """The heads' outputs (L, B, Q, ...) and start boxes (B, Q, 4) of the matching queries, and the
    denoising queries' outputs (the queries after the first Q), or None when there are none."""
    if Q == logits.shape[2]:
        return logits, boxes, start_boxes, None
    dn_outputs = {"pred_logits": logits[:, :, Q:], "pred_boxes": boxes[:, :, Q:],  # (L, B, D, ...)
                  "start_boxes": start_boxes[:, Q:], "groups": model.denoising_groups, "contrastive": model.dn_contrastive}
    return logits[:, :, :Q], boxes[:, :, :Q], start_boxes[:, :Q], dn_outputs


# -----------------------------------------------------------------------------
# Addition 1: anchor-box queries, refined layer by layer (anchor_queries=True)
# DAB-DETR (Liu et al., "DAB-DETR: Dynamic Anchor Boxes are Better Queries for DETR", ICLR 2022;
# R50, 50 epochs: 42.2 AP, against 42.0 for DETR after 500, Table 2). Each query carries a box; its
# position in every attention is an MLP of the box's sine encoding, and every decoder layer
# predicts an offset (before the sigmoid) that moves the box for the next layer, so a query
# attends around where it currently thinks its object is. The query embeddings become the
# queries' content. DAB-DETR's width/height-modulated cross-attention (its §4.3) is addition 5,
# conditional_cross_attn.


def inverse_sigmoid(x, eps=1e-5):
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def init_anchors(weight):
    """Learned anchors (Q, 4), stored before the sigmoid: centres spread uniformly over the image,
    sides 0.1 of it (DAB-DETR draws the centres uniformly too)."""
    with torch.no_grad():
        weight[:, :2] = inverse_sigmoid(torch.rand(len(weight), 2))
        weight[:, 2:] = inverse_sigmoid(torch.full((len(weight), 2), 0.1))


# -----------------------------------------------------------------------------
# Addition 2: encoder proposals (encoder_proposals=True, with anchor_queries)
# Deformable DETR's two-stage variant (Zhu et al., ICLR 2021, §4.2; 46.2 AP against 45.4 with box
# refinement alone, Table 1) and DINO's query selection (Zhang et al., ICLR 2023, §3.4): every
# encoder token predicts a class and a box (an offset from an anchor box centred on the token), and
# these dense predictions are matched to the ground truth with the same Hungarian matcher (their
# loss: train.py, "Addition 2's loss"). The top-scoring tokens' boxes start the decoder's queries;
# the learned query embeddings stay their content (DINO's "mixed" selection). The backbone and the
# encoder are supervised densely from the first step, as in a one-stage detector, instead of only
# through the decoder's few matches.


def propose_boxes(model, memory, feature_mask):
    """memory (B, hw, C), feature_mask (B, h, w) True on padding. Returns every token's prediction
    (enc_outputs: pred_logits (B, hw, K+1), pred_boxes (B, hw, 4), valid (B, hw)) and the num_queries
    best tokens' boxes (B, num_queries, 4), detached (Deformable DETR: the decoder refines them;
    gradients reach the proposals through their own loss)."""
    B, h, w = feature_mask.shape
    valid = ~feature_mask  # each token's anchor is centred on it, in units of its image's own valid size
    valid_h, valid_w = valid[:, :, 0].sum(1), valid[:, 0, :].sum(1)  # (B,)
    ys, xs = torch.meshgrid(torch.arange(h, device=memory.device), torch.arange(w, device=memory.device), indexing="ij")
    cx = (xs[None] + 0.5) / valid_w[:, None, None]  # (B, h, w)
    cy = (ys[None] + 0.5) / valid_h[:, None, None]
    side = torch.full_like(cx, model.proposal_size)
    anchors = torch.stack([cx, cy, side, side], dim=-1).flatten(1, 2)  # (B, hw, 4)
    features = model.proposal_norm(model.proposal_proj(memory))
    logits = model.proposal_class_head(features)  # (B, hw, K+1)
    boxes = (mlp(model.proposal_box_head, features) + inverse_sigmoid(anchors)).sigmoid()
    valid = valid.flatten(1)
    if logits.shape[1] < model.num_queries:
        raise ValueError(f"encoder_proposals needs at least num_queries={model.num_queries} feature tokens, the "
                         f"images give {h}x{w}: use larger images, a smaller feature_stride or fewer queries")
    if model.sigmoid_classes:  # addition 6: the best class's own probability (DINO's selection)
        objectness = logits.sigmoid().max(-1).values
    else:  # the probability of any real class
        objectness = 1 - logits.softmax(-1)[..., -1]
    objectness = objectness.masked_fill(~valid, -1.0)  # padding is chosen last
    top = objectness.topk(model.num_queries, dim=1).indices  # (B, num_queries)
    enc_outputs = {"pred_logits": logits, "pred_boxes": boxes, "valid": valid}
    return enc_outputs, boxes.gather(1, top[..., None].expand(-1, -1, 4)).detach()


# -----------------------------------------------------------------------------
# Addition 3: denoising queries (denoising_groups=N, with anchor_queries)
# DN-DETR (Li et al., "DN-DETR: Accelerate DETR Training by Introducing Query DeNoising", CVPR 2022;
# +1.9 AP over DAB-DETR in the same setting, 44.1 AP with R50 after 50 epochs, Table 1). In
# training, N noised copies of each image's ground truth enter the decoder as extra queries: the
# box shifted and rescaled, the label sometimes swapped for another, embedded as content. Each is
# trained to reconstruct its own object, with no matching: an easy, stable task from the first
# step, while the Hungarian matching of the real queries is still unstable (DN-DETR §3). An
# attention mask keeps the real queries from seeing them (they would see the answers) and each
# group from seeing the others.
DN_BOX_NOISE = 0.4  # centres move by up to 0.4 of half the box's side, sides scale by 1 +- 0.4 (DN-DETR §3.1)
DN_LABEL_NOISE = 0.2  # the chance that a label is replaced by a random one (DN-DETR §4)


def add_denoising_queries(model, targets, content, boxes, self_attn_mask):
    """Append denoising_groups noised copies of each image's targets to the queries. content (B, Q, C),
    boxes (B, Q, 4). Returns the longer content and boxes (B, Q + D, ...) and the self-attention mask
    (B, 1, Q + D, Q + D) True where allowed. Images with fewer objects are padded: a padded query
    has no content (DINO), so it cannot pass for an object of some class, is seen by no other, and
    is in no loss (DN-DETR)."""
    B, Q, C = content.shape
    device = content.device
    labels, gt_boxes, real = padded_targets(targets, content.dtype)  # (B, n, ...)
    groups, n = model.denoising_groups, labels.shape[1]
    copies = groups * (2 if model.dn_contrastive else 1)  # addition 8: each group its positives, then its negatives
    labels, gt_boxes, real = labels.repeat(1, copies), gt_boxes.repeat(1, copies, 1), real.repeat(1, copies)  # (B, D, ...)
    swap = torch.rand(labels.shape, device=device) < DN_LABEL_NOISE
    labels = torch.where(swap, torch.randint_like(labels, model.num_classes), labels)
    wh = gt_boxes[..., 2:]
    noise = torch.rand_like(gt_boxes) * 2 - 1  # (B, D, 4) in (-1, 1): of DN_BOX_NOISE times half the side, or the side
    if model.dn_contrastive:
        noise = negatives_noise(noise, n)
    noised = (gt_boxes + noise * torch.cat([wh / 2, wh], -1) * DN_BOX_NOISE).clamp(0, 1)
    D = copies * n
    allowed = torch.ones(Q + D, Q + D, dtype=torch.bool, device=device)
    if self_attn_mask is not None:
        allowed[:Q, :Q] = self_attn_mask
    allowed[:Q, Q:] = False  # the real queries must not see the answers
    allowed[Q:, Q:] = group_attention_mask(D, D // groups, device)  # each denoising group sees only itself (and the real queries)
    allowed = allowed[None].repeat(B, 1, 1)
    allowed[:, :, Q:] &= real[:, None, :]  # padded queries are keys to nobody ...
    own = torch.arange(Q, Q + D, device=device)  # made on the device: a CPU index would be a host copy each step
    allowed[:, own, own] = True  # ... but themselves
    content = torch.cat([content, model.label_embed(labels) * real[..., None]], dim=1)  # padding: no content (DINO)
    boxes = torch.cat([boxes, noised], dim=1)
    return content, boxes, allowed[:, None]


DN_MIN_SLOTS = 8  # an image's denoising slots per group: the most objects rounded up to a power of two, at least this


def padded_targets(targets, dtype):
    """(B, n) labels, (B, n, 4) boxes and (B, n) real (False on padding) on the targets' device. n takes
    a few sizes (8, 16, 32, ...), not every object count, so that compiled layers meet few shapes."""
    n = max(DN_MIN_SLOTS, 2 ** math.ceil(math.log2(max([len(t["labels"]) for t in targets] + [1]))))
    device = targets[0]["boxes"].device
    labels = torch.zeros(len(targets), n, dtype=torch.int64, device=device)
    boxes = torch.full((len(targets), n, 4), 0.5, dtype=dtype, device=device)
    real = torch.zeros(len(targets), n, dtype=torch.bool, device=device)
    for b, t in enumerate(targets):
        k = len(t["labels"])
        labels[b, :k], boxes[b, :k], real[b, :k] = t["labels"], t["boxes"].to(dtype), True
    return labels, boxes, real


# -----------------------------------------------------------------------------
# Addition 4: query groups (query_groups=K)
# Group DETR (Chen et al., "Group DETR: Fast DETR Training with Group-Wise One-to-Many Assignment",
# ICCV 2023; 11 groups, faster convergence for Conditional DETR, DAB-DETR, DN-DETR and DINO, Fig. 1).
# In training there are K groups of num_queries queries. Each group is matched one-to-one on its
# own, so every object has K positive queries per step instead of one, and self-attention stays
# inside a group, so that each group still learns to remove its own duplicates. Inference keeps
# only the first group: the same model and cost as without groups.


def group_attention_mask(num_queries_total, num_queries, device):
    """(Q, Q) True where two queries are in the same group (block diagonal)."""
    group = torch.arange(num_queries_total, device=device) // num_queries
    return group[:, None] == group[None, :]


# -----------------------------------------------------------------------------
# Addition 5: conditional cross-attention (conditional_cross_attn=True, with anchor_queries)
# Conditional DETR (Meng et al., ICCV 2021, §3.3; its training converges 6.7x faster than DETR's with
# R50, Fig. 1) and DAB-DETR's width/height-modulated attention (Liu et al., ICLR 2022, §4.3). In DETR's
# cross-attention a query's box enters only as an embedding added to its content, and the values
# carry no position, so a layer cannot tell where what it saw lies relative to its box: it can
# hardly move the box. Here every head's query and key get a second, spatial part beside the
# content part (Conditional DETR Eq. 4). The spatial query is the sine encoding of the box centre,
# scaled per channel by an MLP of the content (from the second layer on: which part of its box a
# head looks at, e.g. an edge), and its x and y channels are scaled by a learned reference size
# over the box's size, so that a wide box attends widely (DAB-DETR Eq. 6). The spatial key is a
# projection of the features' own sine positions. As both papers' code does (DAB-DETR with its
# default keep_query_pos=False), the first layer's content part still carries the positions, the
# query's and the features', as in DETR: its content knows nothing of the image yet. From the
# second layer on it is content alone, so the attention logit is content . content + space . space.


def spatial_query_and_key(model, i, content, boxes, box_sine, pos):
    """The spatial query (B, Q, C) and key (B, HW, C) of decoder layer i. content (B, Q, C) the queries'
    content, boxes (B, Q, 4) their current boxes, box_sine (B, Q, 4, C/2) the boxes' sine encoding,
    pos (B, HW, C) the features' positions (y channels first, then x). The third item says whether
    the positions are added to the cross-attention's content part too (the first layer only)."""
    y, x = box_sine[..., 1, :], box_sine[..., 0, :]  # (B, Q, C/2) each, in the features' order
    if i > 0:  # the first layer's content knows nothing of the image yet: it gets the plain centre
        scale = mlp(model.spatial_scale_head, content).chunk(2, dim=-1)
        y, x = y * scale[0], x * scale[1]
    size = mlp(model.spatial_size_head, content).sigmoid()  # (B, Q, 2) reference width and height
    y = y * (size[..., 1] / boxes[..., 3])[..., None]  # DAB-DETR §4.3: a tall box attends tall
    x = x * (size[..., 0] / boxes[..., 2])[..., None]
    return model.spatial_query_proj[i](torch.cat([y, x], dim=-1)), model.spatial_key_proj[i](pos), i == 0


# -----------------------------------------------------------------------------
# Addition 6: sigmoid class scores (cls_loss='focal' or 'iou_aware')
# Deformable DETR (Zhu et al., ICLR 2021, §5), DAB-DETR, DN-DETR and DINO train their class heads
# with the sigmoid focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017) instead
# of DETR's softmax with a down-weighted "no object". Their successors make a matched query's target
# its box's IoU, so that a better box scores higher: RT-DETR's varifocal loss, Align-DETR's and
# LW-DETR's IoU-aware BCE (Align-DETR: +3.8 AP for DAB-DETR-R50 from it alone), DEIM's
# matchability-aware loss (Huang et al., CVPR 2025; with its dense one-to-one matching it halves
# D-FINE's schedule). Either way a query gives each class its own probability: the class head has K
# outputs and no "no object" row, and postprocess and the proposals' selection read sigmoids. The
# losses and the focal matching cost are train.py's "Addition 6's loss".
CLS_LOSSES = ("ce", "focal", "iou_aware")  # cls_loss: the paper's softmax cross-entropy, or a sigmoid loss
PRIOR_PROBABILITY = 0.01  # every class starts at this probability (focal loss §4.1: else the many background queries swamp the first steps)


def sigmoid_class_head(dim, num_classes):
    """A class head of num_classes sigmoid outputs, its bias set so that every class starts at PRIOR_PROBABILITY."""
    head = nn.Linear(dim, num_classes)
    nn.init.constant_(head.bias, -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY))
    return head


# -----------------------------------------------------------------------------
# Addition 7: look forward twice (look_forward_twice=True, with anchor_queries)
# DINO (Zhang et al., ICLR 2023, §3.5; with addition 8 and its query selection, 49.4 AP at 12 epochs
# against DN-DETR's 43.4). Addition 1 detaches each layer's boxes before the next layer refines them,
# so a layer's box loss trains only that layer's offset ("look forward once"). Here the box a layer's
# loss sees is its offset applied to the previous layer's box before the detach: its loss also
# corrects the layer before. The boxes' values are the same; only where the gradients go changes.
# One line of decode_with_additions.


# -----------------------------------------------------------------------------
# Addition 8: contrastive denoising (dn_contrastive=True, with denoising_groups)
# DINO (Zhang et al., ICLR 2023, §3.3; 49.4 AP at 12 epochs with addition 7, DN-DETR 43.4). Each
# denoising group gets a second copy of the ground truth, noised further: where addition 3's positive
# copies move by up to DN_BOX_NOISE (DINO's lambda_1), these negatives move by DN_BOX_NOISE to twice
# it (lambda_2), and must say "no object" (train.py, "Addition 3's loss"). DN-DETR's queries learn only
# to reconstruct; the negatives teach a query near an object to reject a box that is not its
# object's, the duplicates and near misses that the one-to-one matching otherwise leaves to chance.


def negatives_noise(noise, n):
    """noise (B, D, 4) in (-1, 1), for groups of n positives then n negatives: the negatives' noise
    pushed out to [1, 2) of the bound, with its sign (the positives' stays as it was)."""
    negative = (torch.arange(noise.shape[1], device=noise.device) // n) % 2 == 1  # (D,)
    return torch.where(negative[:, None], noise + noise.sign(), noise)


# -----------------------------------------------------------------------------
# Parameter counts (python detr.py), the paper's parts and each addition's


# the model's parts: the paper's seven, then each addition's modules
PARTS = {
    "backbone": ["backbone"], "input_proj": ["input_proj"], "encoder": ["encoder"],
    "decoder": ["decoder", "decoder_norm"], "query_embed": ["query_embed"], "class_head": ["class_head"],
    "box_head": ["box_head"], "anchors": ["box_pos_head", "anchor_embed"],
    "proposals": ["proposal_proj", "proposal_norm", "proposal_class_head", "proposal_box_head"],
    "denoising": ["label_embed"],
    "conditional": ["spatial_scale_head", "spatial_size_head", "spatial_query_proj", "spatial_key_proj"],
}


def parameters_by_part(model):
    """The model's parameters by part (PARTS), those of the additions switched on included.
    `python detr.py` counts them; train.py logs their gradient and weight norms."""
    params = {name: [p for a in attrs if hasattr(model, a) for p in getattr(model, a).parameters()]
              for name, attrs in PARTS.items()}
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
    lines.append(f"{'total':<12} {total:>12,} params ({trainable:,} trainable), {len(model.state_dict())} state-dict keys")
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
