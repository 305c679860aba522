"""
Additions beyond the paper: their matching costs and loss terms, one section per addition under the title
of its model in additions/model.py. AdditionsCriterion extends train.py's SetCriterion, which it is given
(train.new_criterion builds it): it takes the paper's pieces (the matcher's costs and assignment, the layers'
summed cross-entropy, L1 and GIoU, the weighted sum) and adds what the additions change: query groups
matched each on its own, the encoder proposals' and the denoising queries' terms, and sigmoid class losses.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert

from lib.metrics import paired_iou


class AdditionsMatcher(nn.Module):
    """train.HungarianMatcher (given) with the additions' matching: the focal class cost (addition 6), padding
    tokens never matched (addition 2), query groups each matched on its own (addition 4), and several sets
    of outputs (the decoder's, the proposals') copied to the host at once."""

    def __init__(self, matcher, sigmoid=False):
        super().__init__()
        self.matcher, self.sigmoid = matcher, sigmoid

    @torch.no_grad()
    def forward(self, outputs, targets, groups=1):
        """HungarianMatcher.forward; groups > 1: the queries are that many equal groups, each matched on its
        own, an image's pairs of every group together."""
        return self.match_sets([(outputs, groups)], targets)[0]

    @torch.no_grad()
    def match_sets(self, sets, targets):
        """forward for several (outputs, groups) at once: their costs reach the host in one copy."""
        results = []
        for (outputs, groups), cost in zip(sets, self.matcher.to_host([self.cost(o, targets) for o, _ in sets])):
            L, B, Q, T = cost.shape
            n = Q // groups  # addition 4: the groups are matched as if they were more layers
            per_group = self.matcher.assign(cost.reshape(L, B, groups, n, T).swapaxes(1, 2).reshape(-1, B, n, T),
                                            targets)
            indices = [[tuple(torch.cat([per_group[layer * groups + g][b][i] + (g * n if i == 0 else 0)
                                         for g in range(groups)]) for i in (0, 1)) for b in range(B)]
                       for layer in range(L)]
            results.append(indices if outputs["pred_logits"].dim() == 4 else indices[0])
        return results

    def cost(self, outputs, targets, parts=False):
        """HungarianMatcher.cost, its class term the focal cost for sigmoid scores, padding's cost 1e6."""
        terms = self.matcher.cost(outputs, targets, parts=True)
        if self.sigmoid:  # addition 6: the focal loss's class cost replaces the probability's
            logits = outputs["pred_logits"].flatten(0, -2).float()  # (L*B*Q, K)
            tgt_labels = torch.cat([t["labels"] for t in targets])
            terms[0] = (self.matcher.cost_class * focal_matching_cost(logits, tgt_labels)).view(terms[0].shape)
        if parts:
            return terms
        cost = terms[0] + terms[1] + terms[2]
        if "valid" in outputs:  # addition 2: the proposals of padding tokens are never matched
            cost = cost.masked_fill(~outputs["valid"][None, :, :, None], 1e6)
        return cost


class AdditionsCriterion(nn.Module):
    """train.SetCriterion (given) with the additions' terms: loss_*_enc (the encoder proposals', addition 2),
    loss_*_dn (the denoising queries', addition 3), query groups matched each on its own and their losses
    averaged (addition 4), and a sigmoid cls_loss in the cross-entropy's place, over num_boxes (addition 6)."""

    def __init__(self, criterion, query_groups=1, cls_loss="ce"):
        super().__init__()
        self.criterion, self.matcher = criterion, AdditionsMatcher(criterion.matcher, cls_loss != "ce")
        self.query_groups, self.cls_loss, self.sigmoid = query_groups, cls_loss, cls_loss != "ce"

    def forward(self, outputs, targets, num_boxes=None, class_weight_sum=None):
        paper, groups = self.criterion, self.query_groups
        logits, boxes = paper.stack_layers(outputs)
        num_boxes = paper.mean_num_boxes(targets, num_boxes, logits.device)
        if class_weight_sum is None:
            class_weight_sum = paper.cross_entropy_normaliser(targets, logits.shape[2] // groups, paper.eos_coef)
        sets = [({"pred_logits": logits, "pred_boxes": boxes}, groups)]
        if "enc_outputs" in outputs:  # addition 2: the proposals are matched too, in the same copy to the host
            sets.append((proposal_set(outputs["enc_outputs"]), 1))
        indices = self.matcher.match_sets(sets, targets)
        ce, l1, giou = self.summed_losses(logits, boxes, targets, indices[0], 1.0 if self.sigmoid else paper.eos_coef)
        class_weight_sum = num_boxes if self.sigmoid else class_weight_sum  # addition 6: every sigmoid weighs 1
        terms = {"": (ce / (groups * class_weight_sum), l1 / (groups * num_boxes), giou / (groups * num_boxes))}
        if "enc_outputs" in outputs:
            terms["_enc"] = proposal_losses(self, sets[1][0], targets, indices[1], num_boxes)
        if "dn_outputs" in outputs:
            terms["_dn"] = denoising_losses(self, outputs["dn_outputs"], targets, num_boxes)
        return paper.weigh(terms)

    def summed_losses(self, logits, boxes, targets, indices, no_object_weight):
        """SetCriterion.summed_losses, or with a sigmoid cls_loss (addition 6) the sigmoid class loss in the
        cross-entropy's place: logits (L, B, Q, K)."""
        if not self.sigmoid:
            return self.criterion.summed_losses(logits, boxes, targets, indices, no_object_weight)
        L, B, Q, K = logits.shape
        pairs = self.criterion.matched_pairs(targets, indices, logits.device)
        target_classes = torch.full((L, B, Q), K, dtype=torch.int64, device=logits.device)
        target_classes[pairs[:3]] = pairs[3]
        iou = None  # iou_aware's target: each matched query's IoU with its object (one per pair, not all pairs)
        if self.cls_loss == "iou_aware":
            src_xyxy = box_convert(boxes[pairs[:3]], "cxcywh", "xyxy")
            tgt_xyxy = box_convert(pairs[4].float(), "cxcywh", "xyxy")
            iou = torch.zeros(L, B, Q, device=logits.device).index_put(pairs[:3], paired_iou(src_xyxy, tgt_xyxy))
        ce = sigmoid_class_loss(logits, target_classes, iou, self.cls_loss)
        ce = ce * torch.where(target_classes == K, no_object_weight, 1.0)
        return (ce.view(L, -1).sum(1), *self.criterion.box_losses(boxes, pairs, L))

    def diagnostic_matching(self, outputs, targets):
        """SetCriterion.diagnostic_matching on the first query group, with the denoising queries' pairs."""
        Q = outputs["pred_logits"].shape[1] // self.query_groups
        first = {"pred_logits": outputs["pred_logits"][:, :Q], "pred_boxes": outputs["pred_boxes"][:, :Q]}
        dn = outputs.get("dn_outputs")
        dn_pairs = dn and denoising_pairs(targets, dn["groups"], dn["pred_boxes"].shape[2] // dn["groups"])
        return {"num_queries": Q, "matched": self.matcher(first, targets), "dn_pairs": dn_pairs,
                "sigmoid": self.sigmoid}


# -----------------------------------------------------------------------------
# Addition 2's loss: encoder proposals (additions/model.py, "Addition 2")
# Each term is a sum divided by num_boxes, as the set loss's boxes are, so that gradient
# accumulation stays exact and no term grows with the image. Every token that no object is matched
# to is trained to say "no object". Summed over the tokens that background would grow with the
# image (64 tokens at 64 px and stride 8, ~850 at 800 px and stride 32) and drown the objects;
# Deformable DETR and DINO tame it with the sigmoid focal loss. Here an image's background tokens
# together weigh a fixed multiple of its objects at any size, and padding weighs nothing: measured
# against the focal loss (EXPERIMENTS.md), this keeps the dense signal that lets a backbone trained
# from scratch leave DETR's plateau.
PROPOSAL_BACKGROUND_WEIGHT = 2.0  # an image's background tokens weigh as this many objects (2 to 8 alike)


def proposal_background_weight(targets, valid):
    """(B, hw) the weight of each token's "no object" cross-entropy: an image's background tokens
    together weigh PROPOSAL_BACKGROUND_WEIGHT times its objects (at least one), padding nothing."""
    objects = torch.tensor([len(t["labels"]) for t in targets], device=valid.device)
    background = (valid.sum(1) - objects).clamp(min=1)  # the tokens that no object is matched to
    return valid * (PROPOSAL_BACKGROUND_WEIGHT * objects.clamp(min=1) / background)[:, None]


def proposal_set(enc_outputs):
    """The encoder proposals as the matcher takes them: every valid token is a query, one layer."""
    return {"pred_logits": enc_outputs["pred_logits"][None].float(),
            "pred_boxes": enc_outputs["pred_boxes"][None].float(),
            "valid": enc_outputs["valid"]}


def proposal_losses(criterion, proposals, targets, indices, num_boxes):
    """Every token matched to an object learns its class and box; the others say "no object", an
    image's background tokens together weighing a fixed multiple of its objects, padding nothing (a sigmoid
    cls_loss: every real token weighs 1, as in Deformable DETR; EXPERIMENTS.md). proposals: proposal_set's."""
    valid = proposals["valid"]
    weight = valid.float() if criterion.sigmoid else proposal_background_weight(targets, valid)
    sums = criterion.summed_losses(proposals["pred_logits"], proposals["pred_boxes"], targets, indices, weight)
    return tuple(s / num_boxes for s in sums)


# -----------------------------------------------------------------------------
# Addition 3's loss: denoising queries (additions/model.py, "Addition 3")


def denoising_pairs(targets, groups, n):
    """Per image, (query_idx, tgt_idx): denoising query g * n + j is the noised copy of target j."""
    return [(torch.cat([torch.arange(len(t["labels"])) + g * n for g in range(groups)]),
             torch.arange(len(t["labels"])).repeat(groups)) for t in targets]


def denoising_losses(criterion, dn_outputs, targets, num_boxes):
    """Denoising query g * n + j reconstructs target j at every decoder layer, with no matching;
    padded queries are in no loss. Averaged over the groups. With dn_contrastive (addition 8) a group's
    second half are its negatives: each real one says "no object", weighing as a positive, with no box loss."""
    logits, boxes = dn_outputs["pred_logits"].float(), dn_outputs["pred_boxes"].float()  # (L, B, groups * n, ...)
    L, B, D = logits.shape[:3]
    groups = dn_outputs["groups"]
    no_object_weight = torch.zeros(B, D, device=logits.device)  # every real positive is matched; padding weighs 0
    pairs = denoising_pairs(targets, groups, D // groups)
    for b, (query_idx, _) in enumerate(pairs if dn_outputs["contrastive"] else []):  # addition 8: the real negatives
        no_object_weight[b, (query_idx + D // groups // 2).to(logits.device)] = 1.0
    sums = criterion.summed_losses(logits, boxes, targets, [pairs] * L, no_object_weight)
    return tuple(s / (groups * num_boxes) for s in sums)


# -----------------------------------------------------------------------------
# Addition 6's loss: sigmoid class losses (cls_loss; additions/model.py, "Addition 6")
# Each of a query's K classes is its own binary target; summed over queries and classes and divided
# by num_boxes (Deformable DETR), with no eos_coef: the focal weight keeps background from drowning objects.
# - 'focal' (Lin et al. 2017; Deformable DETR, DINO): a matched query's class targets 1, the rest 0,
#   each term weighed by how wrong it is, |p - t|^gamma.
# - 'iou_aware' (DEIM's matchability-aware loss, Huang et al. 2025, §3.2): the matched class targets the
#   box's IoU^gamma with its object, so the score ranks boxes by quality; negatives weigh p^gamma.
# Both match with Deformable DETR's focal cost.
FOCAL_ALPHA = 0.25  # the positives' share of the focal loss (focal loss §3.2; Deformable DETR, DINO)
FOCAL_GAMMA = 2.0  # the focal loss's exponent (and the focal matching cost's)
IOU_AWARE_GAMMA = 1.5  # iou_aware: the target IoU^gamma and the negatives' weight p^gamma (DEIM: 1.5)


def sigmoid_class_loss(logits, target_classes, iou, cls_loss):
    """(L, B, Q) the sigmoid class loss of each query, summed over its K classes. logits (L, B, Q, K);
    target_classes (L, B, Q): a class, or K for "no object"; iou (L, B, Q): the matched queries' box IoU."""
    logits = logits.float()
    onehot = F.one_hot(target_classes, logits.shape[-1] + 1)[..., :-1].to(logits.dtype)  # (L, B, Q, K); no object: 0
    prob = logits.sigmoid()
    if cls_loss == "focal":
        target = onehot
        weight = (FOCAL_ALPHA * target + (1 - FOCAL_ALPHA) * (1 - target)) * (prob - target).abs().pow(FOCAL_GAMMA)
    else:  # iou_aware
        target = onehot * iou.detach()[..., None].pow(IOU_AWARE_GAMMA)
        weight = onehot + (1 - onehot) * prob.detach().pow(IOU_AWARE_GAMMA)
    return (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight).sum(-1)


def focal_matching_cost(logits, tgt_labels):
    """(N, T) the focal loss's class cost (Deformable DETR's matcher): for each prediction's sigmoid
    score of each target's class, the positive focal term less the negative one. logits (N, K)."""
    prob = logits.sigmoid()[:, tgt_labels]  # (N, T)
    positive = FOCAL_ALPHA * (1 - prob).pow(FOCAL_GAMMA) * -(prob + 1e-8).log()
    negative = (1 - FOCAL_ALPHA) * prob.pow(FOCAL_GAMMA) * -(1 - prob + 1e-8).log()
    return positive - negative
