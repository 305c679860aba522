"""What a GPU step needs, checked without a GPU: the forward never waits on the host, and the loss
moves its matching costs to the host once per step."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lib import inference
import train
import additions.model
from additions.loss import AdditionsCriterion, AdditionsMatcher
from additions.model import AdditionsDETR

aten = torch.ops.aten


class HostAccess(TorchDispatchMode):
    """Records every op that would stall a GPU: reading a value on the host (.item(), .tolist(),
    .cpu(), bool()), data-dependent shapes (nonzero, boolean indexing), and any op that touches a
    CPU tensor while the model runs on another device (a tensor made on the CPU and copied over)."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [a for a in tree_leaves((args, kwargs or {})) if isinstance(a, torch.Tensor)]
        if func in (aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default):
            self.found.append(func.overloadpacket.__name__)
        elif func is aten.index.Tensor and any(t.dtype == torch.bool for t in tensors[1:]):
            self.found.append("boolean indexing")
        elif any(t.device.type == "cpu" for t in tensors):
            self.found.append(f"{func.overloadpacket.__name__} on a CPU tensor")
        return func(*args, **(kwargs or {}))


def meta_model_and_batch(**additions):
    """A small DETR and a batch on the meta device: shapes without data, so any read of a value fails
    or shows up, and any tensor made on the CPU is a second device."""
    torch.manual_seed(0)
    model = AdditionsDETR(3, backbone="resnet18", hidden_dim=32, num_heads=4, num_encoder_layers=1,
                          num_decoder_layers=2, dim_feedforward=64, num_queries=5, dropout=0.0, feature_stride=8,
                          **additions).to("meta").train()
    images, mask = torch.zeros(2, 3, 64, 96, device="meta"), torch.zeros(2, 64, 96, dtype=torch.bool, device="meta")
    targets = [{"labels": torch.zeros(n, dtype=torch.int64, device="meta"), "boxes": torch.zeros(n, 4, device="meta")}
               for n in (3, 1)]
    return model, images, mask, targets


ALL_ADDITIONS = dict(anchor_queries=True, encoder_proposals=True, denoising_groups=2, query_groups=2,
                     conditional_cross_attn=True)


@pytest.mark.parametrize("additions", [{}, ALL_ADDITIONS], ids=["paper", "all additions"])
def test_forward_never_waits_on_the_host(additions):
    model, images, mask, targets = meta_model_and_batch(**additions)
    with HostAccess() as host:
        out = model(images, mask, targets)
    assert out["pred_boxes"].shape[:2] == (2, 5 * model.query_groups) and host.found == []


def test_host_access_is_caught():
    """The check itself: an .item() in the forward, or an index made on the CPU, is found."""
    model, images, mask, targets = meta_model_and_batch(**ALL_ADDITIONS)
    head = model.class_head.forward
    model.class_head.forward = lambda x: head(x) * (1 + 0 * x.mean().item())
    with HostAccess() as host, pytest.raises(Exception):  # meta tensors have no value to read
        model(images, mask, targets)
    assert host.found == ["_local_scalar_dense"]
    with HostAccess() as host:
        images[:, :, torch.arange(2)]
    assert host.found == ["index on a CPU tensor"]


def test_the_loss_moves_its_costs_to_the_host_once_per_step(monkeypatch):
    """Decoder layers, query groups and encoder proposals are matched from one copy of their costs."""
    torch.manual_seed(0)
    model = AdditionsDETR(3, backbone="resnet18", hidden_dim=32, num_heads=4, num_encoder_layers=1,
                          num_decoder_layers=3,
                          dim_feedforward=64, num_queries=5, dropout=0.0, feature_stride=8, **ALL_ADDITIONS).train()
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    outputs = model(torch.randn(2, 3, 64, 64), None, targets)
    criterion = AdditionsCriterion(train.SetCriterion(train.HungarianMatcher()), query_groups=2)
    reads = []
    numpy = torch.Tensor.numpy
    monkeypatch.setattr(torch.Tensor, "numpy", lambda self, *a, **k: reads.append(self.numel()) or numpy(self, *a, **k))
    losses = criterion(outputs, targets)
    monkeypatch.undo()
    hw = outputs["enc_outputs"]["pred_logits"].shape[1]
    # (layers, images, 2 groups of 5, targets) + (images, tokens, targets)
    assert reads == [3 * 2 * 10 * 3 + 2 * hw * 3]
    assert torch.isfinite(losses["loss"]) and "loss_ce_enc" in losses


def batch(generator, height, width, counts, padded=True):
    """Images (B, 3, H, W) with the second one's bottom quarter padded (or none), and random targets."""
    images, mask = (torch.randn(len(counts), 3, height, width, generator=generator),
                    torch.zeros(len(counts), height, width, dtype=torch.bool))
    if padded:
        mask[1, height * 3 // 4 :] = True
    targets = [{"labels": torch.randint(0, 3, (n,), generator=generator),
                "boxes": torch.rand(n, 4, generator=generator) * 0.4 + 0.1} for n in counts]
    return images, mask, targets


def test_compiled_training_and_evaluation_compile_in_their_first_steps_only(monkeypatch):
    """inference.compile_model with dynamo's eager backend (graph capture only): batches of other image
    sizes and object counts (0 to 12, so 8 and 16 denoising slots) reuse the graphs of the first
    steps, and dynamo's recompile limit is never reached."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    torch.manual_seed(0)
    model = AdditionsDETR(3, backbone="resnet18", hidden_dim=32, num_heads=4, num_encoder_layers=2,
                          num_decoder_layers=2,
                          dim_feedforward=64, num_queries=5, dropout=0.1, feature_stride=8, **ALL_ADDITIONS).train()
    inference.compile_model(model, backend="eager")
    criterion = AdditionsCriterion(train.SetCriterion(train.HungarianMatcher()), query_groups=2)
    g = torch.Generator().manual_seed(0)
    first = [(64, 64, (2, 1)), (96, 64, (0, 5)), (64, 128, (12, 3))]  # square, not, more objects than 8
    later = [(int(h), int(w), tuple(c.tolist())) for h, w, c in zip(torch.randint(2, 6, (8,), generator=g) * 32,
             torch.randint(2, 6, (8,), generator=g) * 32, torch.randint(0, 13, (8, 2), generator=g))]
    graphs = []
    for height, width, counts in first + later:
        images, mask, targets = batch(g, height, width, counts)
        criterion(model(images, mask, targets), targets)["loss"].backward()
        graphs.append(counters["stats"]["unique_graphs"])
    model.eval()
    with torch.no_grad():
        for height, width, padded in [(64, 96, True), (64, 64, False), (128, 96, True), (96, 160, False),
                                      (64, 64, True)]:
            images, mask, _ = batch(g, height, width, (1, 1), padded)
            model(images, mask if padded else None)
            graphs.append(counters["stats"]["unique_graphs"])
    assert 0 < graphs[2] == graphs[-6]  # training: nothing new after the first three steps
    assert graphs[-6] < graphs[-4] == graphs[-1]  # evaluation: new graphs for the first masked and unmasked batch only


def test_denoising_slots_take_a_few_sizes_and_padding_is_marked():
    def slots(*counts):
        targets = [{"labels": torch.zeros(n, dtype=torch.int64), "boxes": torch.full((n, 4), 0.3)} for n in counts]
        labels, boxes, real = additions.model.padded_targets(targets, torch.float32)
        assert real.sum(1).tolist() == list(counts) and (boxes[~real] == 0.5).all()
        return labels.shape[1]

    assert [slots(0, 0), slots(1, 3), slots(8, 2), slots(9, 0), slots(16), slots(17, 1)] == [8, 8, 8, 16, 16, 32]


def test_matching_several_sets_at_once_equals_matching_each():
    torch.manual_seed(0)
    matcher = AdditionsMatcher(train.HungarianMatcher())
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2]])},
               {"labels": torch.tensor([], dtype=torch.int64), "boxes": torch.zeros(0, 4)},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    decoder = {"pred_logits": torch.randn(3, 3, 8, 4), "pred_boxes": torch.rand(3, 3, 8, 4)}  # 3 layers, 2 groups of 4
    encoder = {"pred_logits": torch.randn(3, 12, 4), "pred_boxes": torch.rand(3, 12, 4),
               "valid": torch.rand(3, 12) > 0.3}
    together = matcher.match_sets([(decoder, 2), (encoder, 1)], targets)
    alone = [matcher(decoder, targets, 2), matcher(encoder, targets)]
    flat = lambda x: [t.tolist() for pair in x for t in pair]  # noqa: E731
    assert [flat(layer) for layer in together[0]] == [flat(layer) for layer in alone[0]]
    assert flat(together[1]) == flat(alone[1]) and len(together[0][0][0][0]) == 2 * 2  # both groups matched
    assert all(encoder["valid"][b, i] for b, (i, _) in enumerate(together[1]) for i in i.tolist())


def test_compile_model_compiles_the_additions_decoder_layers_too():
    """The additions' decoder runs each layer through additions.model.decoder_layer: compile_model compiles it,
    so that an anchor-query model captures graphs for its decoder layers as well as the backbone and encoder."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = AdditionsDETR(3, backbone="resnet18", hidden_dim=32, num_heads=4, num_encoder_layers=1,
                          num_decoder_layers=2, dim_feedforward=64, num_queries=5, anchor_queries=True).eval()
    inference.compile_model(model, backend="eager")
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert counters["stats"]["unique_graphs"] >= 4  # the backbone, the encoder layer, the decoder's layers
