"""
DETR: DEtection TRansformer (Carion et al., "End-to-End Object Detection with Transformers", 2020)
in one file, top to bottom in the order the data flows:

    image (B, 3, H, W) -> ResNet backbone -> 1x1 projection -> + 2-D sine positions
      -> 6 encoder layers -> 6 decoder layers over 100 learned object queries
      -> class head (K + 1) and box head (cx, cy, w, h) for every query

The module names differ from facebookresearch/detr, but `official_to_minidetr_key` maps the
official checkpoint keys onto these ones, so `DETR.from_pretrained('detr-r50')` loads the official
COCO model and reproduces its outputs.

    python detr.py                               # parameter count per part of DETR-R50 (91 classes)
    python detr.py --backbone=resnet18 --num_classes=20
"""

import importlib.util
import json
import math
import os
import re
import shutil
import sys

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops import box_convert
from torchvision.ops.misc import FrozenBatchNorm2d


class LoadError(RuntimeError):
    """A checkpoint or weights file could not be loaded; the message is one line meant for the user."""


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
    statistics and a frozen stem only make sense for pretrained weights: a backbone trained from
    scratch (the CPU configs) wants frozen_bn=False, a trained BatchNorm, and trainable_layers=5.

    feature_stride=16 or 8 stops after layer3 or layer2 (not in the paper): a 64-pixel image then
    gives a 4x4 or 8x8 token grid instead of 2x2, and the dropped stages cost nothing.
    """

    def __init__(self, name="resnet50", pretrained=False, dilation=False, trainable_layers=3, frozen_bn=True,
                 feature_stride=32):
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone '{name}': use {', '.join(BACKBONES)}")
        if dilation and name in ("resnet18", "resnet34"):
            raise ValueError(f"dilation (DC5) needs a bottleneck ResNet (resnet50 or resnet101), not {name}")
        if feature_stride not in (8, 16, 32):
            raise ValueError(f"feature_stride must be 8, 16 or 32 (features after layer2, layer3 or layer4), not {feature_stride}")
        if dilation and feature_stride != 32:
            raise ValueError("dilation (DC5) and feature_stride < 32 both shorten the stride: use one of them")
        resnet = getattr(torchvision.models, name)(
            weights=None,
            norm_layer=FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d,
            replace_stride_with_dilation=[False, False, dilation],
        )
        if pretrained:
            resnet.load_state_dict(imagenet_state_dict(name))
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


def imagenet_state_dict(name):
    """The ImageNet weights the paper starts from (torchvision's IMAGENET1K_V1), or one clear error."""
    weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=True)
    except Exception as e:  # no network, a proxy, a truncated file: all end here
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
        raise LoadError(
            f"could not get ImageNet weights for {name} ({type(e).__name__}); download {weights.url} "
            f"to {path}, or train without them (pretrained_backbone=False)"
        ) from None


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

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None, spatial=None):
        """query (B, L, C), key and value (B, S, C), key_padding_mask (B, S) True on padding;
        attn_mask (L, S) or (B, 1, L, S), True where query l may attend to key s (None: everywhere);
        spatial: only for conditional_cross_attn (addition 5), a second part (B, L, C), (B, S, C) that
        each head's query and key get beside their own.
        Returns the output (B, L, C) and, if asked, the attention weights (B, heads, L, S)."""
        B, L, C = query.shape
        S = key.shape[1]
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        h = self.num_heads
        q = F.linear(query, w_q, b_q).view(B, L, h, C // h).transpose(1, 2)  # (B, h, L, C/h)
        k = F.linear(key, w_k, b_k).view(B, S, h, C // h).transpose(1, 2)  # (B, h, S, C/h)
        v = F.linear(value, w_v, b_v).view(B, S, h, C // h).transpose(1, 2)
        if spatial is not None:  # each head's dot product becomes content . content + space . space
            q = torch.cat([q, spatial[0].view(B, L, h, C // h).transpose(1, 2)], dim=-1)  # (B, h, L, 2C/h)
            k = torch.cat([k, spatial[1].view(B, S, h, C // h).transpose(1, 2)], dim=-1)
        # SDPA's boolean mask is True where attention is allowed: every query sees every real key
        allowed = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]  # (B, 1, 1, S)
        if attn_mask is not None:
            allowed = attn_mask if allowed is None else allowed & attn_mask
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
        out = out.transpose(1, 2).reshape(B, L, C)
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

    def forward(self, content, query_pos, memory, pos, mask, need_weights=False, self_attn_mask=None, spatial=None):
        """content, query_pos (B, Q, C); memory, pos (B, HW, C); mask (B, HW) True on padding, or None;
        self_attn_mask: which queries see which (only for the additions: query groups, denoising);
        spatial: the cross-attention's spatial query and key (only for conditional_cross_attn)."""
        q = k = content + query_pos  # the queries talk to each other: this is what removes duplicates
        attn, _ = self.self_attn(q, k, content, attn_mask=self_attn_mask)
        content = self.norm1(content + F.dropout(attn, self.dropout, self.training))
        attn, weights = self.cross_attn(content + query_pos, memory + pos, memory, mask, need_weights, spatial=spatial)
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
        pretrained_backbone=False,  # start from torchvision's ImageNet weights (paper §4)
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
    ):
        super().__init__()
        if (encoder_proposals or denoising_groups or conditional_cross_attn) and not anchor_queries:
            raise ValueError("encoder_proposals, denoising_groups and conditional_cross_attn need anchor_queries=True: their queries are boxes")
        if denoising_groups < 0 or query_groups < 1:
            raise ValueError(f"denoising_groups must be >= 0 and query_groups >= 1, not {denoising_groups} and {query_groups}")
        self.num_classes, self.num_queries = num_classes, num_queries
        self.anchor_queries, self.encoder_proposals = anchor_queries, encoder_proposals
        self.denoising_groups, self.query_groups = denoising_groups, query_groups
        self.conditional_cross_attn = conditional_cross_attn
        self.classes = self.category_ids = None  # the outputs' names and dataset ids, where the weights' file gives them
        # what rebuilds this model (checkpoints store it); the weights, pretrained or not, come from the file
        self.config = dict(
            num_classes=num_classes, backbone=backbone, dilation=dilation, trainable_layers=trainable_layers, frozen_bn=frozen_bn,
            hidden_dim=hidden_dim, num_heads=num_heads, num_encoder_layers=num_encoder_layers,
            num_decoder_layers=num_decoder_layers, dim_feedforward=dim_feedforward, dropout=dropout,
            num_queries=num_queries, feature_stride=feature_stride, anchor_queries=anchor_queries,
            encoder_proposals=encoder_proposals, denoising_groups=denoising_groups, query_groups=query_groups,
            conditional_cross_attn=conditional_cross_attn,
        )
        self.backbone = Backbone(backbone, pretrained_backbone, dilation, trainable_layers, frozen_bn, feature_stride)
        self.input_proj = nn.Conv2d(self.backbone.num_channels, hidden_dim, kernel_size=1)
        self.encoder = nn.ModuleList(
            EncoderLayer(hidden_dim, num_heads, dim_feedforward, dropout) for _ in range(num_encoder_layers)
        )
        self.decoder = nn.ModuleList(
            DecoderLayer(hidden_dim, num_heads, dim_feedforward, dropout) for _ in range(num_decoder_layers)
        )
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
        if anchor_queries:  # a query's position is an MLP of its box's sine encoding (DAB-DETR Eq. 2)
            self.box_pos_head = mlp_layers(2 * hidden_dim, hidden_dim, hidden_dim, 2)
            if not encoder_proposals:  # learned boxes (before the sigmoid), one per query
                self.anchor_embed = nn.Embedding(num_queries * query_groups, 4)
                init_anchors(self.anchor_embed.weight)
        if encoder_proposals:  # every encoder token proposes a box (Deformable DETR §4.2, two-stage)
            self.proposal_proj = nn.Linear(hidden_dim, hidden_dim)
            self.proposal_norm = nn.LayerNorm(hidden_dim)
            self.proposal_class_head = nn.Linear(hidden_dim, num_classes + 1)
            self.proposal_box_head = mlp_layers(hidden_dim, hidden_dim, 4, 3)
            self.proposal_size = 0.05 * feature_stride / 8  # the tokens' anchor side (Deformable DETR: 0.05 at stride 8)
        if denoising_groups:  # a noised ground-truth label enters the decoder as its embedding
            self.label_embed = nn.Embedding(num_classes, hidden_dim)
        if conditional_cross_attn:  # a spatial query made from each box, a spatial key from each position
            self.spatial_scale_head = mlp_layers(hidden_dim, hidden_dim, hidden_dim, 2)
            self.spatial_size_head = mlp_layers(hidden_dim, hidden_dim, 2, 2)
            self.spatial_query_proj = nn.ModuleList(nn.Linear(hidden_dim, hidden_dim) for _ in range(num_decoder_layers))
            self.spatial_key_proj = nn.ModuleList(nn.Linear(hidden_dim, hidden_dim) for _ in range(num_decoder_layers))

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

        enc_weights, dec_weights = [], []
        memory = src
        for layer in self.encoder:
            memory, weights = layer(memory, pos, token_mask, need_weights)
            enc_weights.append(weights)

        out = {}
        if self.anchor_queries or self.query_groups > 1:  # not in the paper: see "Additions beyond the paper" below
            content, query_pos, boxes, self_attn_mask = initial_queries(self, memory, feature_mask, targets, out)
        else:  # the paper (§3.2): the decoder starts from zeros, and the N object queries enter as positions
            query_pos = self.query_embed.weight[None].expand(B, -1, -1)  # (B, N, C)
            content, boxes, self_attn_mask = torch.zeros_like(query_pos), None, None

        hs = []
        start_boxes, layer_boxes, spatial = boxes, [], None  # the additions' state (boxes is None in the paper)
        for i, layer in enumerate(self.decoder):
            if boxes is not None:  # addition 1 (and 5): each layer's positions come from the current boxes
                query_pos, spatial = box_positions(self, i, content, boxes, pos)
            content, weights = layer(content, query_pos, memory, pos, token_mask, need_weights, self_attn_mask, spatial)
            hs.append(self.decoder_norm(content))
            dec_weights.append(weights)
            if boxes is not None:  # addition 1: ... and each layer moves the boxes
                boxes = refine_boxes(self, hs[-1], boxes, layer_boxes)
        hs = torch.stack(hs)  # (num_decoder_layers, B, Q, C)

        logits = self.class_head(hs)  # (L, B, Q, K+1)
        if boxes is None:
            boxes = mlp(self.box_head, hs).sigmoid()  # (L, B, Q, 4) cx, cy, w, h relative to the image's own size
        else:  # addition 1 (and 3): the refined boxes; the denoising queries' outputs set apart
            logits, boxes = box_query_outputs(self, logits, layer_boxes, start_boxes, out)
        out.update({
            "pred_logits": logits[-1],
            "pred_boxes": boxes[-1],
            # every earlier decoder layer is supervised too (paper §3.2, "Auxiliary decoding losses")
            "aux_outputs": [{"pred_logits": lg, "pred_boxes": bx} for lg, bx in zip(logits[:-1], boxes[:-1])],
        })
        if need_weights:
            out["enc_attn"] = enc_weights  # per layer (B, heads, hw, hw)
            out["dec_attn"] = dec_weights  # per layer (B, heads, Q, hw): cross-attention over the features
            out["feat_size"] = (h, w)
        return out

    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs):
        """Build a DETR from pretrained weights, with the names of its classes (`model.classes`):
        - an official facebookresearch/detr checkpoint: a known name ('detr-r50', 'detr-r50-dc5',
          'detr-r101', 'detr-r101-dc5', downloaded by torch.hub) or a local .pth file;
        - a Hugging Face transformers DETR: a folder (config.json and model.safetensors or
          pytorch_model.bin) or a hub id such as 'facebook/detr-resnet-50' (see its section below).
        The architecture is read off the weights or config.json; kwargs override the rest (dropout,
        trainable_layers; num_heads and dilation for an official .pth, which does not say them)."""
        if name_or_path in OFFICIAL_CHECKPOINTS:
            url = OFFICIAL_CHECKPOINTS[name_or_path]
            kwargs.setdefault("dilation", "-dc5" in name_or_path)
            try:
                ckpt = torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True)
            except Exception as e:
                path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
                raise LoadError(f"could not download {url} ({type(e).__name__}); put the file at {path}") from None
        else:
            folder = transformers_folder(name_or_path)
            if folder is not None:
                return from_transformers_folder(cls, folder, name_or_path, **kwargs)
            ckpt = load_checkpoint_file(name_or_path)
        return cls.from_official_checkpoint(ckpt, name_or_path, **kwargs)

    @classmethod
    def from_official_checkpoint(cls, ckpt, source, **kwargs):
        """from_pretrained for an official checkpoint already read: {'model': state dict}, or the state dict."""
        state_dict = ckpt.get("model", ckpt)
        model = cls(**{**official_model_args(state_dict, source), **kwargs})
        model.load_official_state_dict(state_dict, source)
        model.classes = COCO_CLASSES if model.num_classes == len(COCO_CLASSES) else None
        return model

    def load_official_state_dict(self, state_dict, source="checkpoint"):
        """Load a state dict with the official key names (see load_named_state_dict)."""
        named = {official_to_minidetr_key(k): (k, v) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
        self.load_named_state_dict(named, source, "an official DETR checkpoint", minidetr_to_official_key)

    def load_named_state_dict(self, named, source, kind, their_key):
        """Load {our key: (the file's key, tensor)} after checking every key and shape, so that a
        wrong file fails with one line naming the first bad key as the file names it."""
        expected = self.state_dict()
        for ours, (theirs, value) in named.items():
            if ours not in expected:
                raise LoadError(f"{source}: unexpected key '{theirs}' (not part of {kind})")
            if not torch.is_tensor(value) or value.shape != expected[ours].shape:
                shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                raise LoadError(f"{source}: key '{theirs}' has shape {shape}, expected {tuple(expected[ours].shape)}")
        missing = [their_key(k) for k in expected if k not in named and not k.endswith("num_batches_tracked")]
        if missing:
            raise LoadError(f"{source}: missing key '{missing[0]}' ({len(missing)} missing in all)")
        self.load_state_dict({ours: value for ours, (_, value) in named.items()}, strict=False)


def postprocess(outputs, sizes):
    """Model outputs -> one dict per image with `scores`, `labels` (Q,) and `boxes` (Q, 4) as absolute
    (x0, y0, x1, y1) pixels of the original image. sizes: (B, 2) of (height, width)."""
    probs = outputs["pred_logits"].softmax(-1)[..., :-1]  # drop "no object"
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


def compile_model(model, backend="inductor"):
    """torch.compile the backbone and each encoder and decoder layer, in place (the checkpoint's keys
    stay as they are). What runs between them (encoder proposals, the denoising queries made from each
    image's targets) stays eager, so that no object count reaches a graph, and image sizes are dynamic:
    a run compiles a few graphs in its first steps (again at the first non-square batch) and at its
    first evaluation, and none after."""
    for part in [model.backbone, *model.encoder, *model.decoder]:
        part.compile(dynamic=True, backend=backend)


# =============================================================================
# Additions beyond the paper
#
# Vanilla DETR learns slowly: 500 epochs for 42.0 AP on COCO (paper Table 1), and from scratch on a
# small set it sits for thousands of steps where every query predicts the same thing. Each section
# below is one follow-up paper's fix, switched on by one DETR argument (one config key in train.py)
# and off by default: with all of them off, nothing below runs and the model above is the paper's.


# -----------------------------------------------------------------------------
# Where the additions enter DETR.forward: four marked calls


def initial_queries(model, memory, feature_mask, targets, out):
    """The queries the decoder starts from when an addition changes them: content (B, Q, C), query_pos
    (B, Q, C) or None (then made from the boxes), boxes (B, Q, 4) or None, and the self-attention
    mask (Q, Q) or (B, 1, Q, Q) or None. In training, Q counts every query group (addition 4) and
    the denoising queries come last (addition 3)."""
    B = memory.shape[0]
    Q = model.num_queries * (model.query_groups if model.training else 1)  # Group DETR: one group at inference
    query_embed = model.query_embed.weight[:Q][None].expand(B, -1, -1)  # (B, Q, C)
    if not model.anchor_queries:  # query groups alone: the paper's queries, K times
        content, query_pos, boxes = torch.zeros_like(query_embed), query_embed, None
    else:  # the embeddings are the queries' content, their positions come from boxes (DAB-DETR)
        content, query_pos = query_embed, None
        if model.encoder_proposals:
            boxes = propose_boxes(model, memory, feature_mask, out).repeat(1, Q // model.num_queries, 1)
        else:
            boxes = model.anchor_embed.weight[:Q].sigmoid()[None].expand(B, -1, -1)  # (B, Q, 4)
    self_attn_mask = group_attention_mask(Q, model.num_queries, content.device) if Q > model.num_queries else None
    if model.denoising_groups and model.training and targets is not None:
        content, boxes, self_attn_mask = add_denoising_queries(model, targets, content, boxes, self_attn_mask)
    return content, query_pos, boxes, self_attn_mask


def box_positions(model, i, content, boxes, pos):
    """Decoder layer i's query positions (B, Q, C), an MLP of the boxes' sine encoding (DAB-DETR
    Eq. 2), and its spatial query and key with conditional_cross_attn (else None)."""
    box_sine = sine_encode(boxes * 2 * math.pi, content.shape[-1] // 2)  # (B, Q, 4, C/2): cx, cy, w, h
    query_pos = mlp(model.box_pos_head, box_sine.flatten(-2))
    spatial = spatial_query_and_key(model, i, content, boxes, box_sine, pos) if model.conditional_cross_attn else None
    return query_pos, spatial


def refine_boxes(model, layer_out, boxes, layer_boxes):
    """A decoder layer's boxes: its box head's offset (before the sigmoid) moves the boxes it was
    given; appended to layer_boxes. Returned detached: the next layer starts from them, but the
    refinement is not back-propagated through the layers (Deformable DETR, DAB-DETR)."""
    layer_boxes.append((mlp(model.box_head, layer_out) + inverse_sigmoid(boxes)).sigmoid())  # layer_out (B, Q, C)
    return layer_boxes[-1].detach()


def box_query_outputs(model, logits, layer_boxes, start_boxes, out):
    """The heads' outputs (L, B, Q, ...) of the matching queries. The boxes the decoder started from
    go to out["start_boxes"] (for diagnostics), the denoising queries' outputs to out["dn_outputs"]."""
    boxes = torch.stack(layer_boxes)
    Q = model.num_queries * (model.query_groups if model.training else 1)
    if Q < logits.shape[2]:  # the denoising queries come after the matching ones
        out["dn_outputs"] = {"pred_logits": logits[:, :, Q:], "pred_boxes": boxes[:, :, Q:],  # (L, B, D, ...)
                             "start_boxes": start_boxes[:, Q:], "groups": model.denoising_groups}
        logits, boxes = logits[:, :, :Q], boxes[:, :, :Q]
    out["start_boxes"] = start_boxes[:, :Q]  # (B, Q, 4)
    return logits, boxes


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
# these dense predictions are matched to the ground truth with the same Hungarian matcher. The
# top-scoring tokens' boxes start the decoder's queries; the learned query embeddings stay their
# content (DINO's "mixed" selection). The backbone and the encoder are supervised densely from the
# first step, as in a one-stage detector, instead of only through the decoder's few matches.
# Every token that no object is matched to is trained to say "no object". Summed over the tokens
# that background would grow with the image (64 tokens at 64 px and stride 8, ~850 at 800 px and
# stride 32) and drown the objects; Deformable DETR and DINO tame it with the sigmoid focal loss.
# Here an image's background tokens together weigh a fixed multiple of its objects at any size,
# and padding weighs nothing: measured against the focal loss in the README, this keeps the dense
# signal that lets a backbone trained from scratch leave DETR's plateau.


def propose_boxes(model, memory, feature_mask, out):
    """memory (B, hw, C), feature_mask (B, h, w) True on padding. Stores every token's prediction in
    out["enc_outputs"] and returns the num_queries best tokens' boxes (B, num_queries, 4), detached
    (Deformable DETR: the decoder refines them; gradients reach the proposals through their own loss)."""
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
    out["enc_outputs"] = {"pred_logits": logits, "pred_boxes": boxes, "valid": valid}
    if logits.shape[1] < model.num_queries:
        raise ValueError(f"encoder_proposals needs at least num_queries={model.num_queries} feature tokens, the "
                         f"images give {h}x{w}: use larger images, a smaller feature_stride or fewer queries")
    objectness = 1 - logits.softmax(-1)[..., -1]  # the probability of any real class
    objectness = objectness.masked_fill(~valid, -1.0)  # padding is chosen last
    top = objectness.topk(model.num_queries, dim=1).indices  # (B, num_queries)
    return boxes.gather(1, top[..., None].expand(-1, -1, 4)).detach()


PROPOSAL_BACKGROUND_WEIGHT = 2.0  # an image's background tokens weigh as this many of its objects (2 to 8 alike, README)


def proposal_background_weight(targets, valid):
    """(B, hw) the weight of each token's "no object" cross-entropy: an image's background tokens
    together weigh PROPOSAL_BACKGROUND_WEIGHT times its objects (at least one), padding nothing."""
    objects = torch.tensor([len(t["labels"]) for t in targets], device=valid.device)
    background = (valid.sum(1) - objects).clamp(min=1)  # the tokens that no object is matched to
    return valid * (PROPOSAL_BACKGROUND_WEIGHT * objects.clamp(min=1) / background)[:, None]


# its losses (train.py's SetCriterion calls these; each term a sum over num_boxes, so that gradient
# accumulation stays exact and no term grows with the image)


def proposal_set(outputs):
    """The encoder proposals as the matcher takes them: every valid token is a query, one group."""
    enc = outputs["enc_outputs"]
    return {"pred_logits": enc["pred_logits"][None].float(), "pred_boxes": enc["pred_boxes"][None].float(),
            "valid": enc["valid"]}, 1


def proposal_losses(criterion, enc, targets, indices, num_boxes):
    """Every token matched to an object learns its class and box; the others say "no object", an
    image's background tokens together weighing a fixed multiple of its objects, padding nothing.
    enc: the proposals as proposal_set gives them to the matcher."""
    weight = proposal_background_weight(targets, enc["valid"])
    sums = criterion.summed_losses(enc["pred_logits"], enc["pred_boxes"], targets, indices, weight)
    return tuple(s / num_boxes for s in sums)


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
    labels, gt_boxes, real = labels.repeat(1, groups), gt_boxes.repeat(1, groups, 1), real.repeat(1, groups)  # (B, D, ...)
    swap = torch.rand(labels.shape, device=device) < DN_LABEL_NOISE
    labels = torch.where(swap, torch.randint_like(labels, model.num_classes), labels)
    wh = gt_boxes[..., 2:]
    noise = (torch.rand_like(gt_boxes) * 2 - 1) * torch.cat([wh / 2, wh], -1) * DN_BOX_NOISE
    noised = (gt_boxes + noise).clamp(0, 1)
    D = groups * n
    allowed = torch.ones(Q + D, Q + D, dtype=torch.bool, device=device)
    if self_attn_mask is not None:
        allowed[:Q, :Q] = self_attn_mask
    allowed[:Q, Q:] = False  # the real queries must not see the answers
    allowed[Q:, Q:] = group_attention_mask(D, n, device)  # each denoising group sees only itself (and the real queries)
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


def denoising_pairs(targets, groups, n):
    """Per image, (query_idx, tgt_idx): denoising query g * n + j is the noised copy of target j."""
    return [(torch.cat([torch.arange(len(t["labels"])) + g * n for g in range(groups)]),
             torch.arange(len(t["labels"])).repeat(groups)) for t in targets]


# its loss (train.py's SetCriterion calls it)


def denoising_losses(criterion, outputs, targets, num_boxes):
    """Denoising query g * n + j reconstructs target j at every decoder layer, with no matching;
    padded queries are in no loss. Averaged over the groups."""
    dn = outputs["dn_outputs"]
    logits, boxes = dn["pred_logits"].float(), dn["pred_boxes"].float()  # (L, B, groups * n, ...)
    L, B, D = logits.shape[:3]
    groups = dn["groups"]
    padding_weight = torch.zeros(B, D, device=logits.device)  # every real query is matched: the rest, padding, weighs 0
    pairs = denoising_pairs(targets, groups, D // groups)
    sums = criterion.summed_losses(logits, boxes, targets, [pairs] * L, padding_weight)
    return tuple(s / (groups * num_boxes) for s in sums)


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
# content part, so that the attention logit is content . content + space . space. The spatial query
# is the sine encoding of the box centre, scaled per channel by an MLP of the content (from the
# second layer on: which part of its box a head looks at, e.g. an edge), and its x and y channels
# are scaled by a learned reference size over the box's size, so that a wide box attends widely.
# The spatial key is a projection of the features' own sine positions.


def spatial_query_and_key(model, i, content, boxes, box_sine, pos):
    """The spatial query (B, Q, C) and key (B, HW, C) of decoder layer i. content (B, Q, C) the queries'
    content, boxes (B, Q, 4) their current boxes, box_sine (B, Q, 4, C/2) the boxes' sine encoding,
    pos (B, HW, C) the features' positions (y channels first, then x)."""
    y, x = box_sine[..., 1, :], box_sine[..., 0, :]  # (B, Q, C/2) each, in the features' order
    if i > 0:  # the first layer's content knows nothing of the image yet: it gets the plain centre
        scale = mlp(model.spatial_scale_head, content).chunk(2, dim=-1)
        y, x = y * scale[0], x * scale[1]
    size = mlp(model.spatial_size_head, content).sigmoid()  # (B, Q, 2) reference width and height
    y = y * (size[..., 1] / boxes[..., 3])[..., None]  # DAB-DETR §4.3: a tall box attends tall
    x = x * (size[..., 0] / boxes[..., 2])[..., None]
    return model.spatial_query_proj[i](torch.cat([y, x], dim=-1)), model.spatial_key_proj[i](pos)


# =============================================================================
# Checkpoints: the official ones, minidetr's own and Hugging Face transformers' (not additions:
# whatever is switched on above, these read and write the weights)
# -----------------------------------------------------------------------------
# Official checkpoints: key names and architecture

# the official models' 91 outputs: output i is COCO category id i (N/A: ids that COCO leaves unused)
COCO_CLASSES = [
    "N/A", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A", "N/A", "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop",
    "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]
OFFICIAL_CHECKPOINTS = {
    "detr-r50": "https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth",
    "detr-r50-dc5": "https://dl.fbaipublicfiles.com/detr/detr-r50-dc5-f0fb7ef5.pth",
    "detr-r101": "https://dl.fbaipublicfiles.com/detr/detr-r101-2c7b67e5.pth",
    "detr-r101-dc5": "https://dl.fbaipublicfiles.com/detr/detr-r101-dc5-a2e86def.pth",
}

# official key prefix -> ours; and whole dotted parts renamed anywhere in a key
KEY_PREFIXES = [
    ("backbone.0.body.", "backbone."),
    ("transformer.encoder.layers.", "encoder."),
    ("transformer.decoder.layers.", "decoder."),
    ("transformer.decoder.norm.", "decoder_norm."),
    ("class_embed.", "class_head."),
    ("bbox_embed.layers.", "box_head."),
]
KEY_PARTS = {"multihead_attn": "cross_attn"}


def official_to_minidetr_key(key):
    for official, ours in KEY_PREFIXES:
        if key.startswith(official):
            key = ours + key[len(official) :]
            break
    return ".".join(KEY_PARTS.get(part, part) for part in key.split("."))


def minidetr_to_official_key(key):
    for official, ours in KEY_PREFIXES:
        if key.startswith(ours):
            key = official + key[len(ours) :]
            break
    renamed = {ours: official for official, ours in KEY_PARTS.items()}
    return ".".join(renamed.get(part, part) for part in key.split("."))


def official_model_args(state_dict, source):
    """Read the architecture off an official state dict (the number of heads is not in the weights:
    the official models all use 8)."""
    try:
        num_queries, hidden_dim = state_dict["query_embed.weight"].shape
        blocks = {k.split(".")[4] for k in state_dict if k.startswith("backbone.0.body.layer3.")}
        bottleneck = "backbone.0.body.layer1.0.conv3.weight" in state_dict
        backbone = {(False, 2): "resnet18", (False, 6): "resnet34", (True, 6): "resnet50", (True, 23): "resnet101"}
        return dict(
            num_classes=state_dict["class_embed.weight"].shape[0] - 1,
            backbone=backbone[(bottleneck, len(blocks))],
            hidden_dim=hidden_dim,
            num_queries=num_queries,
            num_encoder_layers=len({k.split(".")[3] for k in state_dict if k.startswith("transformer.encoder.layers.")}),
            num_decoder_layers=len({k.split(".")[3] for k in state_dict if k.startswith("transformer.decoder.layers.")}),
            dim_feedforward=state_dict["transformer.encoder.layers.0.linear1.weight"].shape[0],
        )
    except (KeyError, AttributeError, ValueError, TypeError) as e:
        raise LoadError(f"{source}: not an official DETR checkpoint (cannot read the architecture: {e!r})") from None


# -----------------------------------------------------------------------------
# minidetr checkpoints: what train.py writes (out_dir/ckpt.pt and best.pt), read and written here
# A checkpoint is a dict: model (the state dict), model_args (DETR's arguments, enough to rebuild it),
# classes (the names of its outputs), category_ids (the dataset's own id of each class, or None),
# config (train.py's whole config), and for an exact resume optimizer (its state dict), iter_num,
# best_val (the best val metric so far) and rng (every process's CPU and CUDA generator states).
# Every file is read with weights_only=True: a checkpoint runs no code.


def model_from_checkpoint(checkpoint, source):
    """The model of a minidetr checkpoint (train.py's ckpt.pt / best.pt: model_args and model), or one
    line (LoadError) saying why its weights do not make one."""
    missing = [k for k in ("model", "model_args") if k not in checkpoint]
    if missing:
        raise LoadError(f"{source}: not a minidetr checkpoint (no '{missing[0]}')")
    try:
        model = DETR(**checkpoint["model_args"])
        model.load_state_dict(checkpoint["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        detail = [line.strip() for line in str(e).strip().splitlines()][-1][:300]
        raise LoadError(f"{source}: its weights do not make a model ({detail})") from None
    model.classes, model.category_ids = checkpoint.get("classes"), checkpoint.get("category_ids")
    return model


def load_checkpoint_file(path):
    """torch.load that fails with one line: a missing file, or a file that is no checkpoint."""
    if not os.path.isfile(path):
        known = ", ".join(OFFICIAL_CHECKPOINTS)
        raise LoadError(f"no checkpoint file at '{path}' (known names: {known})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LoadError(f"{path}: not a PyTorch checkpoint ({first_line(e)})") from None
    if not isinstance(ckpt, dict):
        raise LoadError(f"{path}: not a checkpoint (holds a {type(ckpt).__name__}, expected a dict)")
    return ckpt


def first_line(error):
    """An exception as one short line: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


def save_checkpoint(checkpoint, path):
    """Write to a temporary file, then rename: a run killed mid-write leaves the old file whole. A
    failed write (a full disk, no permission, a vanished folder) removes the temporary file and
    stops with one error line; the previous checkpoint is left as it was."""
    tmp = path + ".tmp"
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        if "DataLoader worker" in str(e):  # a data worker killed meanwhile (SIGCHLD), not a failed write
            raise
        folder = os.path.dirname(os.path.abspath(path))
        needed = sum(t.nbytes for t in torch.utils._pytree.tree_leaves(checkpoint) if isinstance(t, torch.Tensor))
        free = shutil.disk_usage(folder).free if os.path.isdir(folder) else 0
        raise SystemExit(f"error: could not write {path} ({str(e).splitlines()[0]}); it needs about "
                         f"{needed / 2**30:.2f} GiB, {free / 2**30:.2f} GiB are free there. The last checkpoint is "
                         f"left as it was") from None


def load_model(path):
    """Any model minidetr reads, with its classes (model.classes) and dataset ids (model.category_ids):
    a minidetr checkpoint (train.py's ckpt.pt / best.pt), an official one (a name or a file) or a
    transformers DETR (a folder or a hub id). Returns (model, config): a minidetr checkpoint's training
    config (its dataset, val_scale, max_size), else {"val_scale", "max_size"}: the sizes in a
    transformers folder's preprocessor_config.json, or DETR's own 800 and 1333."""
    folder = None if path in OFFICIAL_CHECKPOINTS else transformers_folder(path)
    if folder is not None:
        val_scale, max_size = transformers_image_size(folder)
        return from_transformers_folder(DETR, folder, path), {"val_scale": val_scale, "max_size": max_size}
    checkpoint = None if path in OFFICIAL_CHECKPOINTS else load_checkpoint_file(path)
    if checkpoint is None or "model_args" not in checkpoint:  # an official checkpoint, read once
        model = DETR.from_pretrained(path) if checkpoint is None else DETR.from_official_checkpoint(checkpoint, path)
        if model.classes is None:
            raise LoadError(f"{path}: an official-format checkpoint with {model.num_classes} classes; only "
                            f"COCO's {len(COCO_CLASSES)} have names here")
        return model, {"val_scale": 800, "max_size": 1333}
    missing = [k for k in ("model", "classes", "config") if k not in checkpoint]
    if missing:
        raise LoadError(f"{path}: not a minidetr checkpoint (no '{missing[0]}')")
    if checkpoint["model_args"].get("num_classes") != len(checkpoint["classes"]):
        raise LoadError(f"{path}: the model has {checkpoint['model_args'].get('num_classes')} classes but the "
                        f"checkpoint names {len(checkpoint['classes'])}")
    return model_from_checkpoint(checkpoint, path), checkpoint["config"]


def load_training_checkpoint(path, classes):
    """train.py's out_dir/ckpt.pt for a resume: every key an exact resume needs, and the dataset's classes."""
    checkpoint = load_checkpoint_file(path)
    missing = [k for k in ("model", "optimizer", "model_args", "iter_num", "best_val", "classes", "rng") if k not in checkpoint]
    if missing:
        raise LoadError(f"{path} is not a minidetr training checkpoint (no '{missing[0]}')")
    if checkpoint["classes"] != classes:
        raise LoadError(f"{path} was trained on classes {checkpoint['classes']}, not {classes}")
    return checkpoint


def check_checkpoint_dir(out_dir):
    """One error line before any training when out_dir cannot be written: a run must be able to save what it learns."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, ".writable"), "w"):
            pass
        os.remove(os.path.join(out_dir, ".writable"))
    except OSError as e:
        raise SystemExit(f"error: out_dir={out_dir!r} is not writable ({e.strerror or e})") from None


def set_classes(model, classes):
    """Give a pretrained model a new class head for these classes (fine-tuning). When every class has
    a name of the pretrained model's classes, each keeps that row and "no object" its own, so that
    the official model evaluates on COCO exactly as published; returns whether it did."""
    class_head = nn.Linear(model.class_head.in_features, len(classes) + 1)
    pretrained_names = [name.lower() for name in model.classes or []]
    kept = all(c.lower() in pretrained_names for c in classes)
    if kept:
        rows = torch.tensor([pretrained_names.index(c.lower()) for c in classes] + [model.num_classes])
        class_head.load_state_dict({"weight": model.class_head.weight[rows], "bias": model.class_head.bias[rows]})
    model.class_head = class_head
    model.num_classes = model.config["num_classes"] = len(classes)
    model.classes, model.category_ids = list(classes), None  # the pretrained model's ids are not the dataset's
    return kept


# -----------------------------------------------------------------------------
# Hugging Face transformers checkpoints: folders and hub ids, in and out
# transformers' DetrForObjectDetection is a port of the official model under other names. Its files
# (save_pretrained, the hub) call the backbone model.backbone.conv_encoder.model.* (timm's ResNet,
# whose names are torchvision's, or transformers' own ResNet: embedder / encoder.stages), the
# feed-forward layers fc1 / fc2, and split each attention's input projection into q_proj, k_proj
# and v_proj. transformers 5's in-memory state dict says backbone.model, mlp.fc1 and o_proj instead.
# Both load; folders are written with the file names, which every transformers version reads.

HF_NEWER_NAMES = [(".backbone.model.", ".backbone.conv_encoder.model."), (".mlp.fc", ".fc"), (".o_proj.", ".out_proj.")]
HF_PREFIXES = [  # transformers' prefix -> ours
    ("model.backbone.conv_encoder.model.", "backbone."),
    ("model.input_projection.", "input_proj."),
    ("model.query_position_embeddings.", "query_embed."),
    ("model.encoder.layers.", "encoder."),
    ("model.decoder.layers.", "decoder."),
    ("model.decoder.layernorm.", "decoder_norm."),
    ("class_labels_classifier.", "class_head."),
    ("bbox_predictor.layers.", "box_head."),
]
HF_LAYER_PARTS = {  # inside our encoder.i / decoder.i: transformers' module name -> ours
    "encoder": {"self_attn_layer_norm": "norm1", "final_layer_norm": "norm2", "fc1": "linear1", "fc2": "linear2"},
    "decoder": {"self_attn_layer_norm": "norm1", "encoder_attn": "cross_attn", "encoder_attn_layer_norm": "norm2",
                "final_layer_norm": "norm3", "fc1": "linear1", "fc2": "linear2"},
}
HF_RESNET_NAMES = [  # transformers' own ResNet -> torchvision's names
    (r"^embedder\.embedder\.convolution\.", "conv1."),
    (r"^embedder\.embedder\.normalization\.", "bn1."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.", lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.0."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.", lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.1."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\.", lambda m: f"layer{int(m[1]) + 1}.{m[2]}.conv{int(m[3]) + 1}."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.normalization\.", lambda m: f"layer{int(m[1]) + 1}.{m[2]}.bn{int(m[3]) + 1}."),
]


def hf_to_minidetr_key(key):
    """A transformers key (either generation) -> ours; q/k/v projections keep their own names here.
    None for a key that is not part of DetrForObjectDetection."""
    for newer, older in HF_NEWER_NAMES:
        key = key.replace(newer, older)
    prefix = next((p for p in HF_PREFIXES if key.startswith(p[0])), None)
    if prefix is None:
        return None
    key = prefix[1] + key[len(prefix[0]):]
    names = key.split(".")
    if names[0] in HF_LAYER_PARTS and len(names) > 2:
        names[2] = HF_LAYER_PARTS[names[0]].get(names[2], names[2])
    if names[0] == "backbone":
        rest = ".".join(names[1:])
        for pattern, ours in HF_RESNET_NAMES:
            rest = re.sub(pattern, ours, rest)
        names = ["backbone", rest]
    return ".".join(names)


def minidetr_to_hf_key(key):
    """Our key -> the name transformers writes to disk (timm's backbone names, as the hub's models)."""
    names = key.split(".")
    if names[0] in HF_LAYER_PARTS and len(names) > 2:
        names[2] = {ours: theirs for theirs, ours in HF_LAYER_PARTS[names[0]].items()}.get(names[2], names[2])
    key = ".".join(names)
    theirs, ours = next(p for p in HF_PREFIXES if key.startswith(p[1]))
    return theirs + key[len(ours):]


def hf_to_minidetr(state_dict, source):
    """A transformers state dict -> {our key: (its key, tensor)}, q/k/v joined into one in_proj."""
    named = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):  # written by plain BatchNorm, unused when frozen
            continue
        ours = hf_to_minidetr_key(key)
        if ours is None:
            raise LoadError(f"{source}: unexpected key '{key}' (not part of transformers' DetrForObjectDetection)")
        named[ours] = (key, value)
    for q in [k for k in named if ".q_proj." in k]:
        attn, kind = q.split(".q_proj.")
        keys = [f"{attn}.{p}_proj.{kind}" for p in "qkv"]
        if not all(k in named for k in keys):
            missing = next(named[q][0].replace(".q_proj.", f".{k.split('.')[-2]}.") for k in keys if k not in named)
            raise LoadError(f"{source}: missing key '{missing}'")
        named[f"{attn}.in_proj_{kind}"] = (named[q][0], torch.cat([named.pop(k)[1] for k in keys]))
    return named


def minidetr_to_hf(state_dict):
    """Our state dict -> transformers' on-disk names, each in_proj split into q_proj, k_proj, v_proj."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        if ".in_proj_" in key:
            attn, kind = key.split(".in_proj_")
            for p, part in zip("qkv", value.chunk(3)):
                out[minidetr_to_hf_key(f"{attn}.{p}_proj.{kind}")] = part.clone()
        else:
            out[minidetr_to_hf_key(key)] = value.clone()
    return out


def hf_model_args(config, source, num_outputs):
    """DETR's arguments, the class names and category_ids from a transformers config.json (DetrConfig's
    defaults where a key is absent), or one line saying what minidetr cannot build. num_outputs: the
    class head's rows in the weights (the class count when config.json names none)."""
    def refuse(what):
        raise LoadError(f"{source}: {what}; minidetr builds transformers' DetrForObjectDetection with a "
                        f"sine position encoding and a ResNet-18/34/50/101 backbone")

    def number(key, default, kind=int):
        value = config.get(key, default)
        if not isinstance(value, kind) or isinstance(value, bool) or value < 0:
            raise LoadError(f"{source}: config.json's {key} is {value!r}, not a number >= 0")
        return value

    if config.get("model_type") != "detr":
        refuse(f"model_type is {config.get('model_type')!r}, not 'detr'")
    architectures = config.get("architectures") or ["DetrForObjectDetection"]
    architecture = architectures if isinstance(architectures, str) else architectures[0]
    if architecture != "DetrForObjectDetection":
        refuse(f"the model is a {architecture}")
    for key, paper in (("position_embedding_type", "sine"), ("activation_function", "relu"), ("num_channels", 3)):
        if config.get(key, paper) != paper:
            refuse(f"{key} is {config[key]!r}, not {paper!r}")
    for a, b, default in (("encoder_attention_heads", "decoder_attention_heads", 8), ("encoder_ffn_dim", "decoder_ffn_dim", 2048)):
        if config.get(a, default) != config.get(b, default):
            refuse(f"{a} ({config.get(a, default)}) and {b} ({config.get(b, default)}) differ")
    args = dict(hidden_dim=number("d_model", 256), num_heads=number("encoder_attention_heads", 8),
                num_encoder_layers=number("encoder_layers", 6), num_decoder_layers=number("decoder_layers", 6),
                dim_feedforward=number("encoder_ffn_dim", 2048), num_queries=number("num_queries", 100),
                dropout=number("dropout", 0.1, (int, float)))  # transformers' attention and activation dropouts are not DETR's
    if args["num_heads"] < 1 or args["hidden_dim"] % args["num_heads"]:
        raise LoadError(f"{source}: config.json's d_model={args['hidden_dim']} is not a multiple of its "
                        f"{args['num_heads']} attention heads")

    # the backbone, as transformers builds it: a backbone_config decides alone, else the top-level keys
    backbone_config = config.get("backbone_config")
    if backbone_config is not None and not isinstance(backbone_config, dict):
        refuse(f"backbone_config is {backbone_config!r}, not a dict")
    if backbone_config:
        kind, stride = backbone_config.get("model_type"), backbone_config.get("output_stride")
    else:  # transformers 4's config.json (the hub's): timm unless use_timm_backbone is false
        kind = "timm_backbone" if config.get("use_timm_backbone", True) else "resnet"
        backbone_kwargs = config.get("backbone_kwargs") if isinstance(config.get("backbone_kwargs"), dict) else {}
        stride = backbone_kwargs.get("output_stride") or (16 if config.get("dilation") else None)
        backbone_config = {}
    if stride not in (None, 32, 16):
        refuse(f"its backbone has output_stride {stride}: DETR's stages end at stride 32, or 16 dilated (DC5)")
    if kind == "timm_backbone":  # a timm model name, e.g. 'resnet50' or 'timm/resnet50.a1_in1k'
        name = (backbone_config.get("backbone") or config.get("backbone") or "resnet50").split("/")[-1].split(".")[0]
        last_stage = (backbone_config.get("out_indices") or [4])[-1]
    elif kind == "resnet":  # transformers' ResNet: read its depth off the blocks
        layer_type, depths = backbone_config.get("layer_type", "bottleneck"), backbone_config.get("depths", [3, 4, 6, 3])
        name = {("basic", (2, 2, 2, 2)): "resnet18", ("basic", (3, 4, 6, 3)): "resnet34", ("bottleneck", (3, 4, 6, 3)): "resnet50",
                ("bottleneck", (3, 4, 23, 3)): "resnet101"}.get((layer_type, tuple(depths)), f"a {layer_type} ResNet of depths {depths}")
        last_stage = int(str((backbone_config.get("out_features") or ["stage4"])[-1]).removeprefix("stage"))
        for key, torchvision_value in (("embedding_size", 64), ("downsample_in_bottleneck", False), ("hidden_act", "relu"),
                                       ("downsample_in_first_stage", False), ("num_channels", 3)):
            if backbone_config.get(key, torchvision_value) != torchvision_value:
                refuse(f"its ResNet has {key}={backbone_config[key]!r}, torchvision's {torchvision_value!r}")
        if stride == 16:
            refuse("dilation with transformers' own ResNet")
    else:
        refuse(f"the backbone is a {kind!r}")
    if name not in BACKBONES:
        refuse(f"the backbone is {name!r}")
    if last_stage != 4:
        refuse(f"its features come from ResNet stage {last_stage}, not the last (4)")
    if stride == 16 and name in ("resnet18", "resnet34"):
        refuse(f"dilation (DC5) with {name}, which torchvision's basic blocks cannot dilate")

    # the classes: id2label's names in output order, else as many as the class head has rows
    id2label = config.get("id2label") or {i: f"LABEL_{i}" for i in range(config.get("num_labels") or num_outputs - 1)}
    try:
        id2label = {int(i): str(name) for i, name in id2label.items()}
    except (AttributeError, TypeError, ValueError):
        raise LoadError(f"{source}: config.json's id2label is not a mapping of class numbers to names") from None
    if sorted(id2label) != list(range(len(id2label))):
        raise LoadError(f"{source}: config.json's id2label does not number its classes 0, 1, 2, ...")
    classes = [id2label[i] for i in range(len(id2label))]
    category_ids = config.get("category_ids")  # written by minidetr: a dataset's own ids of the classes
    if category_ids is not None and not (isinstance(category_ids, list) and len(category_ids) == len(classes)
                                         and all(isinstance(i, int) and not isinstance(i, bool) for i in category_ids)):
        raise LoadError(f"{source}: config.json's category_ids should be {len(classes)} integers, one per class")
    return dict(num_classes=len(classes), backbone=name, dilation=stride == 16, **args), classes, category_ids


def hf_cache_folder():
    """The Hugging Face hub cache, where huggingface_hub would put a download."""
    home = os.environ.get("HF_HOME", os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface"))
    return os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")


def has_transformers_weights(folder):
    return any(os.path.isfile(os.path.join(folder, name)) for name in ("model.safetensors", "pytorch_model.bin"))


def transformers_folder(name_or_path):
    """The local folder of a transformers model: the folder itself, or a hub id's snapshot from the
    local Hugging Face cache (with its config and weights), else downloaded with huggingface_hub
    when it is installed. None when the name is a file (or looks like one): an official checkpoint."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path) or not re.fullmatch(r"[\w.-]+/[\w.-]+", name_or_path) \
            or name_or_path.endswith((".pt", ".pth", ".bin", ".safetensors")):
        return None
    cache = hf_cache_folder()
    repo = os.path.join(cache, "models--" + name_or_path.replace("/", "--"))
    try:
        with open(os.path.join(repo, "refs", "main")) as f:
            snapshot = os.path.join(repo, "snapshots", f.read().strip())
        if os.path.isfile(os.path.join(snapshot, "config.json")) and has_transformers_weights(snapshot):
            return snapshot
    except OSError:
        pass
    try:
        import huggingface_hub
    except ImportError:
        raise LoadError(f"'{name_or_path}' is no local file or folder, nor in the Hugging Face cache ({cache}): "
                        f"pip install huggingface_hub to download it, or give the folder that holds its config.json "
                        f"and model.safetensors") from None
    weights = ["model.safetensors", "pytorch_model.bin"] if importlib.util.find_spec("safetensors") else ["pytorch_model.bin"]
    try:
        for name in weights:  # the first the repository has; older ones hold only pytorch_model.bin
            folder = huggingface_hub.snapshot_download(name_or_path, allow_patterns=["*.json", name])
            if has_transformers_weights(folder):
                return folder
        return folder
    except Exception as e:
        raise LoadError(f"could not download '{name_or_path}' from the Hugging Face hub ({first_line(e)})") from None


def from_transformers_folder(cls, folder, source, **kwargs):
    """DETR.from_pretrained for a transformers folder: config.json gives the architecture and classes."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
    except FileNotFoundError:
        hint = next((f"; for a training run's folder give its {n}" for n in ("best.pt", "ckpt.pt")
                     if os.path.isfile(os.path.join(folder, n))), " (a transformers model folder holds config.json and model.safetensors)")
        raise LoadError(f"{source}: no config.json in {folder}{hint}") from None
    except (OSError, ValueError) as e:
        raise LoadError(f"{source}: config.json is not readable json ({e})") from None
    if not isinstance(config, dict):
        raise LoadError(f"{source}: config.json holds no settings")
    weights = read_transformers_weights(folder, source)
    head = weights.get("class_labels_classifier.bias")
    args, classes, category_ids = hf_model_args(config, source, len(head) if torch.is_tensor(head) else 92)
    try:
        model = cls(**{**args, **kwargs})
    except (TypeError, ValueError) as e:
        raise LoadError(f"{source}: config.json describes no DETR minidetr can build ({e})") from None
    model.load_named_state_dict(hf_to_minidetr(weights, source), source, "transformers' DetrForObjectDetection",
                                minidetr_to_hf_key)
    model.classes, model.category_ids = classes, category_ids
    return model


def transformers_image_size(folder):
    """(shortest side, longest side) from a transformers folder's preprocessor_config.json, else DETR's (800, 1333)."""
    try:
        with open(os.path.join(folder, "preprocessor_config.json")) as f:
            size = json.load(f).get("size") or {}
        if isinstance(size.get("shortest_edge"), int) and isinstance(size.get("longest_edge"), int):
            return size["shortest_edge"], size["longest_edge"]
    except (OSError, ValueError, AttributeError):
        pass
    return 800, 1333


def read_transformers_weights(folder, source):
    """The state dict of model.safetensors (read with the safetensors package), else of pytorch_model.bin."""
    safetensors_file, bin_file = os.path.join(folder, "model.safetensors"), os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(safetensors_file) and (importlib.util.find_spec("safetensors") or not os.path.isfile(bin_file)):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise LoadError(f"{source}: pip install safetensors to read {safetensors_file}") from None
        try:
            return load_file(safetensors_file)
        except Exception as e:
            raise LoadError(f"{safetensors_file}: not a readable safetensors file ({first_line(e)})") from None
    if os.path.isfile(bin_file):
        return load_checkpoint_file(bin_file)
    raise LoadError(f"{source}: no model.safetensors or pytorch_model.bin in {folder}")


def write_transformers_folder(model, folder, val_scale=800, max_size=1333):
    """Write a model with no addition switched on as a transformers folder: config.json (the classes
    as id2label, a dataset's own ids as category_ids), model.safetensors (needs the safetensors
    package) and preprocessor_config.json (the image sizes). DetrForObjectDetection.from_pretrained
    then gives the same outputs."""
    c = model.config
    on = [k for k in ("anchor_queries", "encoder_proposals", "denoising_groups", "conditional_cross_attn") if c[k]]
    on += ["query_groups"] * (c["query_groups"] > 1) + ["feature_stride"] * (c["feature_stride"] != 32)
    if on:
        raise LoadError(f"the model uses {', '.join(on)}, which transformers' DETR does not have: "
                        f"only a model with no addition switched on can be written for it")
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise LoadError("pip install safetensors to write model.safetensors") from None
    classes = model.classes or [f"LABEL_{i}" for i in range(model.num_classes)]
    config = dict(
        model_type="detr", architectures=["DetrForObjectDetection"], id2label=dict(enumerate(classes)),
        label2id={name: i for i, name in enumerate(classes)}, backbone=c["backbone"], use_timm_backbone=True,
        use_pretrained_backbone=False, backbone_config=None, dilation=c["dilation"], num_channels=3,
        d_model=c["hidden_dim"], encoder_layers=c["num_encoder_layers"], decoder_layers=c["num_decoder_layers"],
        encoder_attention_heads=c["num_heads"], decoder_attention_heads=c["num_heads"],
        encoder_ffn_dim=c["dim_feedforward"], decoder_ffn_dim=c["dim_feedforward"], num_queries=c["num_queries"],
        dropout=c["dropout"], attention_dropout=c["dropout"], activation_dropout=c["dropout"],  # all DETR's dropouts
        activation_function="relu", position_embedding_type="sine", auxiliary_loss=False,
    )
    if model.category_ids is not None:
        if len(model.category_ids) != model.num_classes:
            raise LoadError(f"the model has {model.num_classes} classes but {len(model.category_ids)} category_ids")
        config["category_ids"] = list(model.category_ids)
    preprocessor = dict(  # DETR's own: resize the shorter side, ImageNet mean and std, pad
        image_processor_type="DetrImageProcessor", format="coco_detection", do_resize=True,
        size={"shortest_edge": val_scale, "longest_edge": max_size}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], do_pad=True,
    )
    os.makedirs(folder, exist_ok=True)
    save_file(minidetr_to_hf(model.state_dict()), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    for name, content in (("config.json", config), ("preprocessor_config.json", preprocessor)):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f, indent=2)


# -----------------------------------------------------------------------------


def parameters_by_part(model):
    """The model's parameters by part: the paper's seven, then those of each addition switched on.
    `python detr.py` counts them; train.py logs their gradient and weight norms."""
    attributes = {
        "backbone": ["backbone"], "input_proj": ["input_proj"], "encoder": ["encoder"],
        "decoder": ["decoder", "decoder_norm"], "query_embed": ["query_embed"], "class_head": ["class_head"],
        "box_head": ["box_head"], "anchors": ["box_pos_head", "anchor_embed"],
        "proposals": ["proposal_proj", "proposal_norm", "proposal_class_head", "proposal_box_head"],
        "denoising": ["label_embed"],
        "conditional": ["spatial_scale_head", "spatial_size_head", "spatial_query_proj", "spatial_key_proj"],
    }
    params = {name: [p for a in attrs if hasattr(model, a) for p in getattr(model, a).parameters()]
              for name, attrs in attributes.items()}
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
    if args["backbone"] not in BACKBONES or args["num_classes"] < 1:
        sys.exit(f"error: --backbone must be one of {', '.join(BACKBONES)} and --num_classes >= 1")
    model = DETR(**args)
    print(f"DETR with {args['backbone']} backbone, {args['num_classes']} classes")
    print(summary(model))
