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
    assert graph["detr"] <= {"configurator"} and graph["lib.metrics"] == set()  # the model (its command line aside), the metrics
    assert "tools.eval" not in graph["train"] and "sample" not in graph["train"] and "sample" not in graph["tools.eval"]
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


def test_the_readmes_reading_order_points_at_the_right_lines():
    """The README's "How to read this code" gives line spans: they must still frame what it names."""
    readme = (ROOT / "README.md").read_text()
    detr_lines = (ROOT / "detr.py").read_text().splitlines()
    train_lines = (ROOT / "train.py").read_text().splitlines()

    def span(text):
        a, b = re.search(re.escape(text) + r" \(?(\d+)-(\d+)", readme).groups()
        return int(a), int(b)

    end = span("`detr.py`, lines")[1]
    assert detr_lines[end].startswith("# =====") and "Additions beyond the paper" in detr_lines[end + 1]
    a, b = span("then `train()`")
    assert train_lines[a - 1].startswith("def train(") and train_lines[b + 1].startswith('if __name__ == "__main__":')
    a, b = span("whose step is one\n   flat block")
    assert "# one optimizer step" in train_lines[a - 1] and "images_since_log +=" in train_lines[b - 1]
    a, b = span("skip the\n   additions' losses")
    assert train_lines[a - 1].startswith("# ----") and "Addition 2's loss" in train_lines[a]
    assert "config, model, evaluation" in train_lines[b + 2]


def test_the_readme_commands_run_for_a_newcomer():
    """After the set-up line: the venv is activated before the first `python`, the CPU-only build and the
    threads are said, the first hour comes before VOC and COCO, every script a command names exists and
    every train.py flag is a config key; report/ is ignored."""
    import train

    readme = (ROOT / "README.md").read_text()
    usage = readme.index("## Usage")
    assert usage < readme.index("source .venv/bin/activate") < readme.index("python train.py config/shapes.py  ", usage)
    assert re.search(r"--index-url\s+https://download.pytorch.org/whl/cpu", readme) and "OMP_NUM_THREADS=1" in readme
    assert readme.index("The first hour") < readme.index("### Your own data") < readme.index("### Pascal VOC and COCO")
    blocks = re.findall(r"```\n(.*?)```", readme, re.S)
    commands = [line for block in blocks for line in block.splitlines() if re.match(r"(python|torchrun)\b", line)]
    assert len(commands) > 20
    for command in commands:
        for script in re.findall(r"\b([\w/]+\.py)\b", command.split("#")[0]):
            assert (ROOT / script).exists(), command
        if " train.py " in f" {command} ":
            for key in re.findall(r"--(\w+)", command.split("#")[0].split("train.py", 1)[1]):
                assert key in train.CONFIG_KEYS, command
    assert "report/" in (ROOT / ".gitignore").read_text().split()
