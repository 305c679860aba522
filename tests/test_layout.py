"""The reader's path: imports flow one way, and with every addition off the forward pass reads as the paper."""

import ast
import inspect
import re
import sys

import torch

import detr
from conftest import ROOT
from detr import DETR, postprocess


def repository_imports():
    """{module: the repository's modules it imports}, imports inside functions included."""
    files = [p for p in ROOT.rglob("*.py") if not {"tests", ".venv"} & set(p.relative_to(ROOT).parts)]
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts): p for p in files}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_imports_flow_one_way():
    graph = repository_imports()
    assert graph["detr"] <= {"configurator"} and graph["metrics"] == set()  # the model (its command line aside), the metrics
    assert "eval" not in graph["train"] and "sample" not in graph["train"] and "sample" not in graph["eval"]
    done, path = set(), []

    def visit(module):  # depth first: a module met again on the current path closes a circle
        assert module not in path, " -> ".join(path[path.index(module):] + [module])
        if module in done:
            return
        path.append(module)
        for other in sorted(graph[module]):
            visit(other)
        path.pop()
        done.add(module)

    for module in graph:
        visit(module)


ADDITION_WORDS = ("anchor_queries", "encoder_proposals", "denoising", "query_groups", "conditional", "addition",
                  "spatial", "self_attn_mask", "start_boxes", "layer_boxes")


def test_the_papers_forward_mentions_the_additions_once():
    """The lines of detr.py that a forward pass (training and inference, padded or not) and postprocess run
    with every addition off name an addition at most 3 times: one marked dispatch."""
    model = DETR(num_classes=3, backbone="resnet18", hidden_dim=32, num_heads=4, num_encoder_layers=1,
                 num_decoder_layers=2, dim_feedforward=64, num_queries=5)
    images, mask = torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[1, :, 40:] = True
    lines = set()

    def trace(frame, event, arg):
        if frame.f_code.co_filename == detr.__file__:
            lines.add(frame.f_lineno)
        return trace

    sys.settrace(trace)
    try:
        model(images, mask, need_weights=True)
        model.eval()
        postprocess(model(images[:1]), [(64, 64)])
    finally:
        sys.settrace(None)
    source = inspect.getsource(detr).splitlines()
    run = [source[n - 1] for n in sorted(lines)]
    mentions = sum(len(re.findall("|".join(ADDITION_WORDS), line.lower())) for line in run)
    assert 20 < len(run) and mentions <= 3, [line for line in run if re.search("|".join(ADDITION_WORDS), line.lower())]
    for layer in (detr.Attention, detr.EncoderLayer, detr.DecoderLayer):  # the paper's layers take no addition argument
        assert not set(inspect.signature(layer.forward).parameters) & {"attn_mask", "spatial", "self_attn_mask"}
