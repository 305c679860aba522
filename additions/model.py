"""
Additions beyond the paper: the model. Vanilla DETR learns slowly: 500 epochs for 42.0 AP on COCO (paper
Table 1), and from scratch on a small set it sits for thousands of steps where every query predicts the
same thing. Each section below is one follow-up paper's fix, switched on by one argument (one config key
in train.py) and off by default. AdditionsDETR extends detr.DETR: the same encoder, and a decoder whose
queries may be boxes, proposals, denoising copies or groups. With every addition off, build_model gives
detr.DETR itself. Their losses extend train.py's in additions/loss.py, under the same titles.

    from additions.model import build_model
    model = build_model(num_classes=20, backbone="resnet18", anchor_queries=True, denoising_groups=3)
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from detr import DETR, Backbone, argument_problem as paper_argument_problem, mlp, mlp_layers, sine_encode

# every addition's argument, off: then build_model gives the paper's DETR
ADDITIONS_OFF = dict(
    feature_stride=32,  # 16 or 8: features from layer3 or layer2, a finer token grid for small images
    anchor_queries=False,  # DAB-DETR: each query is a box, refined by every decoder layer
    encoder_proposals=False,  # two-stage: the boxes start as the encoder's best tokens (needs anchor_queries)
    denoising_groups=0,  # DN-DETR: noised copies of the ground truth as extra queries (needs anchor_queries)
    query_groups=1,  # Group DETR: this many groups of queries in training, each matched on its own
    conditional_cross_attn=False,  # Conditional DETR / DAB-DETR: a box-made spatial query (needs anchor_queries)
    cls_loss="ce",  # 'ce' (the paper's softmax), 'focal' or 'iou_aware' (sigmoid scores)
    look_forward_twice=False,  # DINO: a layer's box loss reaches the layer before (needs anchor_queries)
    dn_contrastive=False,  # DINO: far-noised denoising copies that say "no object" (needs denoising_groups)
)


def additions_on(args):
    """The additions that args (a config, a checkpoint's model_args) switch on, with their values."""
    return {k: v for k, v in args.items() if k in ADDITIONS_OFF and v != ADDITIONS_OFF[k]}


def build_model(**args):
    """detr.DETR when every addition in args is off (or absent), else AdditionsDETR: what a config or a
    checkpoint's model_args build."""
    paper, on = {k: v for k, v in args.items() if k not in ADDITIONS_OFF}, additions_on(args)
    return AdditionsDETR(**paper, **on) if on else DETR(**paper)


def model_args(model):
    """Every argument that rebuilds the model, the additions' too (off for detr.DETR): a checkpoint's model_args."""
    return {**model.config, **{k: v for k, v in ADDITIONS_OFF.items() if k not in model.config}}


def argument_problem(args):
    """detr.argument_problem, then the additions' rules: the first argument out of its range as (name, what
    it must be), or None."""
    a = {**ADDITIONS_OFF, **args}
    needs_anchors = any(a[k] for k in ("encoder_proposals", "denoising_groups", "conditional_cross_attn",
                                        "look_forward_twice"))
    rules = [
        ("dilation", not a["dilation"] or a["feature_stride"] == 32, "False with feature_stride < 32"),
        ("query_groups", a["query_groups"] >= 1, ">= 1"),
        ("denoising_groups", a["denoising_groups"] >= 0, ">= 0"),
        ("feature_stride", a["feature_stride"] in (8, 16, 32), "8, 16 or 32"),
        ("anchor_queries", a["anchor_queries"] or not needs_anchors,
         "True for encoder_proposals, denoising_groups, conditional_cross_attn or look_forward_twice "
         "(their queries are boxes)"),
        ("cls_loss", a["cls_loss"] in CLS_LOSSES, ", ".join(map(repr, CLS_LOSSES))),
        ("dn_contrastive", not a["dn_contrastive"] or a["denoising_groups"] > 0,
         "False without denoising_groups (its negatives are denoising queries)"),
    ]
    return paper_argument_problem(a) or next(((key, want) for key, ok, want in rules if not ok), None)


class AdditionsDETR(DETR):
    """detr.DETR with the additions switched on: their modules (each explained in its section below), a
    decoder whose queries they change, and their outputs beside the paper's (enc_outputs: the encoder
    proposals', dn_outputs: the denoising queries', start_boxes)."""

    PARTS = {**DETR.PARTS, "anchors": ["box_pos_head", "anchor_embed"],
             "proposals": ["proposal_proj", "proposal_norm", "proposal_class_head", "proposal_box_head"],
             "denoising": ["label_embed"],
             "conditional": ["spatial_scale_head", "spatial_size_head", "spatial_query_proj", "spatial_key_proj"]}

    def __init__(self, num_classes, backbone="resnet50", dilation=False, trainable_layers=3, frozen_bn=True,
                 hidden_dim=256, num_heads=8, num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=2048,
                 dropout=0.1, num_queries=100, **additions):
        paper = dict(num_classes=num_classes, backbone=backbone, dilation=dilation, trainable_layers=trainable_layers,
                     frozen_bn=frozen_bn, hidden_dim=hidden_dim, num_heads=num_heads,
                     num_encoder_layers=num_encoder_layers, num_decoder_layers=num_decoder_layers,
                     dim_feedforward=dim_feedforward, dropout=dropout, num_queries=num_queries)
        unknown = set(additions) - set(ADDITIONS_OFF)
        if unknown:
            raise TypeError(f"AdditionsDETR got unexpected arguments {sorted(unknown)}")
        c = {**paper, **ADDITIONS_OFF, **additions}
        problem = argument_problem(c)
        if problem:
            raise ValueError(f"{problem[0]}={c[problem[0]]!r} must be {problem[1]}")
        if c["feature_stride"] < 32:
            backbone = finer_backbone(backbone, trainable_layers, frozen_bn, c["feature_stride"])
        # the embedding table holds every query group's queries (addition 4); num_queries stays one group's
        super().__init__(**{**paper, "backbone": backbone, "num_queries": num_queries * c["query_groups"]})
        self.config, self.num_queries = c, num_queries
        self.anchor_queries, self.encoder_proposals = c["anchor_queries"], c["encoder_proposals"]
        self.denoising_groups, self.query_groups = c["denoising_groups"], c["query_groups"]
        self.conditional_cross_attn, self.sigmoid_classes = c["conditional_cross_attn"], c["cls_loss"] != "ce"
        self.look_forward_twice, self.dn_contrastive = c["look_forward_twice"], c["dn_contrastive"]
        self.decoder_layer = decoder_layer  # how this decoder runs a layer (inference.compile_model compiles it)
        dim, queries = hidden_dim, num_queries * c["query_groups"]
        if self.anchor_queries:  # a query's position is an MLP of its box's sine encoding (DAB-DETR Eq. 2)
            self.box_pos_head = mlp_layers(2 * dim, dim, dim, 2)
            if not self.encoder_proposals:  # learned boxes (before the sigmoid), one per query
                self.anchor_embed = nn.Embedding(queries, 4)
                init_anchors(self.anchor_embed.weight)
        if self.sigmoid_classes:  # K outputs, no "no object", each starting at the prior probability (addition 6)
            self.class_head = sigmoid_class_head(dim, num_classes)
        if self.encoder_proposals:  # every encoder token proposes a box (Deformable DETR §4.2, two-stage)
            self.proposal_proj = nn.Linear(dim, dim)
            self.proposal_norm = nn.LayerNorm(dim)
            self.proposal_class_head = (sigmoid_class_head(dim, num_classes) if self.sigmoid_classes
                                        else nn.Linear(dim, num_classes + 1))
            self.proposal_box_head = mlp_layers(dim, dim, 4, 3)
            self.proposal_size = 0.05 * c["feature_stride"] / 8  # the tokens' anchor side (Deformable DETR: 0.05 at 8)
        if self.denoising_groups:  # a noised ground-truth label enters the decoder as its embedding
            self.label_embed = nn.Embedding(num_classes, dim)
        if self.conditional_cross_attn:  # a spatial query made from each box, a spatial key from each position
            self.spatial_scale_head = mlp_layers(dim, dim, dim, 2)
            self.spatial_size_head = mlp_layers(dim, dim, 2, 2)
            self.spatial_query_proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_decoder_layers))
            self.spatial_key_proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_decoder_layers))
            for part in (self.spatial_scale_head, self.spatial_size_head, self.spatial_query_proj,
                         self.spatial_key_proj):
                for p in part.parameters():
                    if p.dim() > 1:  # Xavier, as Conditional DETR's and DAB-DETR's code give every transformer matrix
                        nn.init.xavier_uniform_(p)

    def forward(self, images, mask=None, targets=None, *, need_weights=False):
        """detr.DETR.forward, and targets: the training batch's (train.py's), which the denoising queries copy."""
        if not (self.anchor_queries or self.query_groups > 1):  # the paper's decoder
            return super().forward(images, mask, need_weights=need_weights)
        memory, pos, feature_mask, token_mask, enc_weights = self.encode(images, mask, need_weights)
        return decode_with_additions(self, memory, pos, feature_mask, token_mask, targets, need_weights, enc_weights)

    def class_probabilities(self, logits):
        """A sigmoid class head (addition 6) gives each class its own probability, with no "no object"."""
        return logits.sigmoid() if self.sigmoid_classes else super().class_probabilities(logits)


# -----------------------------------------------------------------------------
# A finer feature map (feature_stride=16 or 8; not in the paper)
# The backbone stops after layer3 or layer2: a 64-pixel image then gives a 4x4 or 8x8 token grid
# instead of the paper's 2x2, and the dropped stages cost nothing.


def finer_backbone(name, trainable_layers, frozen_bn, feature_stride):
    """detr.Backbone without its last stages; trainable_layers counts over the stages that remain."""
    backbone = Backbone(name, False, trainable_layers, frozen_bn)
    num_stages = {8: 2, 16: 3}[feature_stride]
    for stage in backbone.stages[num_stages:]:
        delattr(backbone, stage)
    backbone.stages = backbone.stages[:num_stages]
    backbone.num_channels = (64 if name in ("resnet18", "resnet34") else 256) * 2 ** (num_stages - 1)
    backbone.freeze(trainable_layers)
    return backbone


# -----------------------------------------------------------------------------
# Where the additions enter DETR: the decoder layer with masks and a spatial part, and the decoder's
# loop with anchor boxes, proposals, denoising queries and groups


def decoder_layer(layer, content, query_pos, memory, pos, mask, need_weights=False, self_attn_mask=None,
                  spatial=None):
    """detr.DecoderLayer.forward, line for line (keep the two in step), with what the additions add: a
    self-attention mask (which queries see which: query groups, denoising) and, for conditional_cross_attn
    (addition 5), the cross-attention's spatial query and key with whether the positions are added to its
    content part too (its first layer only)."""
    q = k = content + query_pos
    attn, _ = masked_attention(layer.self_attn, q, k, content, self_attn_mask)
    content = layer.norm1(content + F.dropout(attn, layer.dropout, layer.training))
    query, key = content + query_pos, memory + pos
    if spatial is not None and not spatial[2]:  # addition 5 after its first layer: position in the spatial part alone
        query, key = content, memory
    allowed = None if mask is None else ~mask[:, None, None, :]
    attn, weights = masked_attention(layer.cross_attn, query, key, memory, allowed, need_weights, spatial)
    content = layer.norm2(content + F.dropout(attn, layer.dropout, layer.training))
    ffn = layer.linear2(F.dropout(F.relu(layer.linear1(content)), layer.dropout, layer.training))
    content = layer.norm3(content + F.dropout(ffn, layer.dropout, layer.training))
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
    queries = initial_queries(model, Q, memory, feature_mask, targets)
    content, query_pos, boxes, self_attn_mask, additions["enc_outputs"] = queries
    hs, dec_weights, layer_boxes, spatial = [], [], [], None
    start_boxes = boxes  # None with query groups alone
    for i, layer in enumerate(model.decoder):
        if boxes is not None:  # addition 1 (and 5): each layer's positions come from the current boxes
            query_pos, spatial = box_positions(model, i, content, boxes, pos)
        content, weights = model.decoder_layer(layer, content, query_pos, memory, pos, token_mask, need_weights,
                                               self_attn_mask, spatial)
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
                  "start_boxes": start_boxes[:, Q:], "groups": model.denoising_groups,
                  "contrastive": model.dn_contrastive}
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
# loss: additions/loss.py, "Addition 2's loss"). The top-scoring tokens' boxes start the decoder's queries;
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
    labels, gt_boxes, real = labels.repeat(1, copies), gt_boxes.repeat(1, copies, 1), real.repeat(1, copies)  # (B, D)
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
    allowed[Q:, Q:] = group_attention_mask(D, D // groups, device)  # a denoising group sees itself and the real queries
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
# losses and the focal matching cost are in additions/loss.py, "Addition 6's loss".
CLS_LOSSES = ("ce", "focal", "iou_aware")  # cls_loss: the paper's softmax cross-entropy, or a sigmoid loss
PRIOR_PROBABILITY = 0.01  # every class starts at this probability (focal loss §4.1: else background swamps early steps)


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
# it (lambda_2), and must say "no object" (additions/loss.py, "Addition 3's loss"). DN-DETR's queries learn only
# to reconstruct; the negatives teach a query near an object to reject a box that is not its
# object's, the duplicates and near misses that the one-to-one matching otherwise leaves to chance.


def negatives_noise(noise, n):
    """noise (B, D, 4) in (-1, 1), for groups of n positives then n negatives: the negatives' noise
    pushed out to [1, 2) of the bound, with its sign (the positives' stays as it was)."""
    negative = (torch.arange(noise.shape[1], device=noise.device) // n) % 2 == 1  # (D,)
    return torch.where(negative[:, None], noise + noise.sign(), noise)


