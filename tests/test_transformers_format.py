"""Hugging Face transformers DETR folders, without transformers: the names and shapes that a real
save_pretrained wrote (tests/data/transformers_detr_names.json, two tiny models: timm's ResNet-18 and
transformers' own) load into the right places, a model written here has exactly those names, classes
and category_ids survive the round trip, hub ids come from the local cache, and each bad folder is
one line. tests/test_reference.py checks both directions against transformers itself."""

import json
import subprocess
import sys

import pytest
import torch

from lib import weights
from conftest import ROOT
from detr import DETR
from lib.weights import LoadError, load_model
from test_train import make_shapes, run
from additions.model import AdditionsDETR

RECORDED = json.loads((ROOT / "tests" / "data" / "transformers_detr_names.json").read_text())
BACKBONE = {"timm": "model.backbone.conv_encoder.model.", "resnet": "model.backbone.conv_encoder.model."}
# our backbone key -> the file's, per backbone naming (torchvision's and timm's names are the same)
BACKBONE_KEYS = {
    "timm": {"backbone.conv1.weight": "conv1.weight",
             "backbone.layer2.0.downsample.1.running_var": "layer2.0.downsample.1.running_var",
             "backbone.layer3.1.conv2.weight": "layer3.1.conv2.weight",
             "backbone.layer4.0.bn1.bias": "layer4.0.bn1.bias"},
    "resnet": {"backbone.conv1.weight": "embedder.embedder.convolution.weight",
               "backbone.layer2.0.downsample.1.running_var":
                   "encoder.stages.1.layers.0.shortcut.normalization.running_var",
               "backbone.layer3.1.conv2.weight": "encoder.stages.2.layers.1.layer.1.convolution.weight",
               "backbone.layer4.0.bn1.bias": "encoder.stages.3.layers.0.layer.0.normalization.bias"},
}
# our key -> the file's, for the transformer and heads (written out by hand from the recorded folder)
TRANSFORMER_KEYS = {
    "input_proj.weight": "model.input_projection.weight",
    "query_embed.weight": "model.query_position_embeddings.weight",
    "encoder.0.linear1.weight": "model.encoder.layers.0.fc1.weight",
    "encoder.0.norm1.bias": "model.encoder.layers.0.self_attn_layer_norm.bias",
    "encoder.0.norm2.weight": "model.encoder.layers.0.final_layer_norm.weight",
    "decoder.1.cross_attn.out_proj.weight": "model.decoder.layers.1.encoder_attn.out_proj.weight",
    "decoder.0.norm2.weight": "model.decoder.layers.0.encoder_attn_layer_norm.weight",
    "decoder.1.norm3.bias": "model.decoder.layers.1.final_layer_norm.bias",
    "decoder.1.linear2.weight": "model.decoder.layers.1.fc2.weight",
    "decoder_norm.weight": "model.decoder.layernorm.weight", "class_head.bias": "class_labels_classifier.bias",
    "box_head.2.weight": "bbox_predictor.layers.2.weight",
}


def random_weights(shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weights = {k: torch.randn(s, generator=generator) * 0.1 for k, s in shapes.items()}
    for k in weights:
        if k.endswith("running_var"):
            weights[k] = weights[k].abs() + 0.5
    return weights


def write_folder(folder, config, weights, fmt="bin"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(weights, str(folder / "model.safetensors"))
    else:
        torch.save(weights, folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize("variant", ["timm", "resnet"])
def test_a_save_pretrained_folder_loads_every_tensor_into_its_place(tmp_path, variant):
    recorded = RECORDED[variant]
    weights = random_weights(recorded["weights"])
    model = load_model(str(write_folder(tmp_path / variant, recorded["config"], weights)))[0]
    assert model.classes == ["circle", "square", "triangle", "star"] and model.category_ids is None
    assert {k: model.config[k] for k in ("num_classes", "backbone", "hidden_dim", "num_heads", "num_encoder_layers",
                                         "num_decoder_layers", "dim_feedforward", "num_queries", "dilation")} == dict(
        num_classes=4, backbone="resnet18", hidden_dim=32, num_heads=4, num_encoder_layers=1, num_decoder_layers=2,
        dim_feedforward=64, num_queries=8, dilation=False)
    ours = model.state_dict()
    for our_key, their_key in TRANSFORMER_KEYS.items():
        assert torch.equal(ours[our_key], weights[their_key]), our_key
    for our_key, their_key in BACKBONE_KEYS[variant].items():
        assert torch.equal(ours[our_key], weights[BACKBONE[variant] + their_key]), our_key
    for stack, attn, theirs in (("encoder.0", "self_attn", "self_attn"), ("decoder.1", "cross_attn", "encoder_attn")):
        for kind in ("weight", "bias"):  # q, k, v joined in that order, as nn.MultiheadAttention's in_proj
            layer = f"model.{stack.split('.')[0]}.layers.{stack.split('.')[1]}.{theirs}"
            joined = torch.cat([weights[f"{layer}.{p}_proj.{kind}"] for p in "qkv"])
            assert torch.equal(ours[f"{stack}.{attn}.in_proj_{kind}"], joined)
    assert sum(v.numel() for v in ours.values()) == sum(v.numel() for v in weights.values())  # each used once


def test_transformers_5_in_memory_names_load_the_same(tmp_path):
    """transformers 5's state_dict() says backbone.model, mlp.fc1 and o_proj where files say otherwise."""
    recorded = RECORDED["timm"]
    renames = [(".backbone.conv_encoder.model.", ".backbone.model."), (".fc1.", ".mlp.fc1."), (".fc2.", ".mlp.fc2."),
               (".out_proj.", ".o_proj.")]
    weights = random_weights(recorded["weights"])
    in_memory = {}
    for key, value in weights.items():
        for old, new in renames:
            key = key.replace(old, new)
        in_memory[key] = value
    assert sorted(in_memory) == recorded["in_memory"]  # the renames above are transformers' own
    a = load_model(str(write_folder(tmp_path / "disk", recorded["config"], weights)))[0]
    b = load_model(str(write_folder(tmp_path / "memory", recorded["config"], in_memory)))[0]
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


def test_a_written_folder_has_the_recorded_names_and_round_trips(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    recorded = RECORDED["timm"]
    model = load_model(str(write_folder(tmp_path / "in", recorded["config"], random_weights(recorded["weights"]))))[0]
    model.category_ids = [11, 22, 33, 44]
    weights.write_transformers_folder(model, str(tmp_path / "out"), val_scale=512, max_size=853)
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert {k: list(v.shape) for k, v in written.items()} == recorded["weights"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["id2label"] == {"0": "circle", "1": "square", "2": "triangle", "3": "star"}
    assert config["category_ids"] == [11, 22, 33, 44]
    size = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())["size"]
    assert size == {"shortest_edge": 512, "longest_edge": 853}
    again, sizes = weights.load_model(str(tmp_path / "out"))
    again.eval()
    assert again.classes == model.classes and again.category_ids == [11, 22, 33, 44]
    assert sizes == {"val_scale": 512, "max_size": 853}  # read back from preprocessor_config.json
    images, mask = torch.randn(2, 3, 64, 96), torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, :, 64:] = True
    with torch.no_grad():
        a, b = model.eval()(images, mask), again(images, mask)
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_boxes"], b["pred_boxes"])


def test_the_older_hub_config_and_a_dc5_model_build_the_same_architecture(tmp_path):
    """The hub's facebook/detr-resnet-50 config.json (transformers 4): backbone named at the top level."""
    recorded = RECORDED["timm"]
    older = {k: v for k, v in recorded["config"].items() if k != "backbone_config"}
    older.update(backbone="resnet18", use_timm_backbone=True, dilation=False, backbone_config=None)
    args, classes, _ = weights.hf_model_args(older, "older", 5)
    assert args == weights.hf_model_args(recorded["config"], "newer", 5)[0] and classes[3] == "star"
    older.update(backbone="resnet50", dilation=True)
    assert weights.hf_model_args(older, "dc5", 5)[0]["dilation"] is True
    older.update(dilation=False, backbone_kwargs={"output_stride": 16, "out_indices": [1, 2, 3, 4]})
    assert weights.hf_model_args(older, "dc5 by backbone_kwargs", 5)[0]["dilation"] is True
    newer_dc5 = json.loads(json.dumps(recorded["config"]))
    newer_dc5["backbone_config"].update(backbone="resnet101", output_stride=16)
    args = weights.hf_model_args(newer_dc5, "dc5", 5)[0]
    assert args["backbone"] == "resnet101" and args["dilation"] is True
    # a backbone_config decides alone, as in transformers: the top-level dilation does not dilate it
    newer = json.loads(json.dumps(recorded["config"]))
    newer["dilation"] = True
    assert weights.hf_model_args(newer, "newer", 5)[0]["dilation"] is False
    # no id2label and no num_labels: as many classes as the class head has rows, less "no object"
    assert (weights.hf_model_args({**recorded["config"], "id2label": None}, "unnamed", 7)[1]
            == [f"LABEL_{i}" for i in range(6)])


def one_line_error(call):
    with pytest.raises(LoadError) as e:
        call()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_each_bad_folder_is_one_line(tmp_path):
    recorded = RECORDED["timm"]
    weights = random_weights(recorded["weights"])
    pytest.importorskip("safetensors")
    folder = write_folder(tmp_path / "cut", recorded["config"], weights, fmt="safetensors")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "not a readable safetensors file" in one_line_error(lambda: load_model(str(folder))[0])
    (tmp_path / "empty").mkdir()
    assert "no config.json" in one_line_error(lambda: load_model(str(tmp_path / "empty"))[0])
    for change, message in (
        ({"model_type": "conditional_detr"}, "model_type is 'conditional_detr'"),
        ({"architectures": ["DetrForSegmentation"]}, "the model is a DetrForSegmentation"),
        ({"position_embedding_type": "learned"}, "position_embedding_type is 'learned'"),
        ({"backbone_config": {**recorded["config"]["backbone_config"], "backbone": "resnet50d"}},
         "the backbone is 'resnet50d'"),
        ({"backbone_config": {"model_type": "swin"}}, "the backbone is a 'swin'"),
        ({"backbone_config": {**recorded["config"]["backbone_config"], "output_stride": 8}}, "output_stride 8"),
        ({"backbone_config": "resnet18"}, "backbone_config is 'resnet18', not a dict"),
        ({"id2label": ["circle", "square"]}, "id2label is not a mapping"),
        ({"d_model": "32"}, "d_model is '32', not a number"),
        ({"encoder_attention_heads": 5, "decoder_attention_heads": 5},
         "hidden_dim=32 must be a multiple of num_heads=5"),
    ):
        folder = write_folder(tmp_path / message.split()[-1].strip("'"), {**recorded["config"], **change}, weights)
        assert message in one_line_error(lambda: load_model(str(folder))[0])
    resnet = RECORDED["resnet"]
    stride_2_first = {**resnet["config"],
                      "backbone_config": {**resnet["config"]["backbone_config"], "downsample_in_first_stage": True}}
    folder = write_folder(tmp_path / "first_stage", stride_2_first, random_weights(resnet["weights"]))
    assert "downsample_in_first_stage=True" in one_line_error(lambda: load_model(str(folder))[0])
    del weights["model.decoder.layers.1.self_attn.v_proj.bias"]
    folder = write_folder(tmp_path / "missing", recorded["config"], weights)
    assert ("missing key 'model.decoder.layers.1.self_attn.v_proj.bias'"
            in one_line_error(lambda: load_model(str(folder))[0]))


def test_a_hub_id_comes_from_the_local_cache_or_says_what_to_install(tmp_path, monkeypatch):
    recorded = RECORDED["timm"]
    repo = tmp_path / "hub" / "models--someone--tiny-detr"
    write_folder(repo / "snapshots" / "abc123", recorded["config"], random_weights(recorded["weights"]))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    assert load_model("someone/tiny-detr")[0].classes[0] == "circle"
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    message = one_line_error(lambda: load_model("someone/other-detr")[0])
    assert "pip install huggingface_hub" in message and str(tmp_path / "hub") in message
    only_config = tmp_path / "hub" / "models--someone--config-only"  # e.g. cached by AutoConfig alone
    (only_config / "snapshots" / "def456").mkdir(parents=True)
    (only_config / "snapshots" / "def456" / "config.json").write_text(json.dumps(recorded["config"]))
    (only_config / "refs").mkdir()
    (only_config / "refs" / "main").write_text("def456")
    assert "pip install huggingface_hub" in one_line_error(lambda: load_model("someone/config-only")[0])


def test_fine_tuning_keeps_the_rows_of_same_named_classes_and_the_writer_checks_category_ids(tmp_path):
    """weights.transfer_weights (train.py's init_from) from a transformers folder: every tensor loaded, the
    class head's rows picked by name (in the dataset's order), "no object" kept, no pretrained ids."""
    recorded = RECORDED["timm"]
    pretrained = load_model(str(write_folder(tmp_path / "in", recorded["config"],
                                             random_weights(recorded["weights"]))))[0]
    pretrained.category_ids = [1, 2, 3, 4]
    model = DETR(**{**pretrained.config, "num_classes": 2})
    model.classes = ["square", "circle"]
    done = weights.transfer_weights(pretrained, model, "folder")
    rows = [pretrained.classes.index("square"), pretrained.classes.index("circle"), pretrained.num_classes]
    assert torch.equal(model.class_head.weight, pretrained.class_head.weight[rows]) and done["new"] == []
    assert (done["new_classes"] == [] and "backbone" in done["loaded"]
            and torch.equal(model.box_head[0].weight, pretrained.box_head[0].weight))
    assert model.category_ids is None
    model.category_ids = [7, 8, 9]
    assert "2 classes but 3 category_ids" in one_line_error(
        lambda: weights.write_transformers_folder(model, str(tmp_path / "x")))


def test_a_model_with_additions_is_not_written(tmp_path):
    model = AdditionsDETR(num_classes=2, backbone="resnet18", hidden_dim=32, num_heads=4, num_encoder_layers=1,
                          num_decoder_layers=1, dim_feedforward=64, num_queries=4, anchor_queries=True,
                          denoising_groups=2)
    message = one_line_error(lambda: weights.write_transformers_folder(model, str(tmp_path / "out")))
    assert "anchor_queries, denoising_groups" in message and not (tmp_path / "out").exists()


def test_fine_tune_a_folder_then_hand_it_back_with_its_category_ids(tmp_path, capsys):
    """train.py --init_from=FOLDER keeps the rows of classes of the same name; tools/export.py --hf writes the
    trained model; sample.py --json reads that folder and gives the dataset's own category ids."""
    pytest.importorskip("safetensors")
    recorded = RECORDED["timm"]
    pretrained = write_folder(tmp_path / "pretrained", recorded["config"], random_weights(recorded["weights"]))
    make_shapes(tmp_path / "data", 4, 2)
    for split in ("train", "val"):  # the dataset's own category ids, as a COCO json would give them
        path = tmp_path / "data" / f"{split}.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "category_ids": [3, 5, 7, 9]}))
    run(tmp_path / "out", tmp_path / "data", init_from=str(pretrained), max_iters=1, eval_interval=1)
    assert "the class rows of 4 of the 4 classes" in capsys.readouterr().out
    result = subprocess.run([sys.executable, "tools/export.py", f"--ckpt={tmp_path / 'out' / 'best.pt'}",
                             f"--hf={tmp_path / 'handed'}"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((tmp_path / "handed" / "config.json").read_text())
    assert config["category_ids"] == [3, 5, 7, 9] and config["id2label"]["3"] == "star"
    result = subprocess.run([sys.executable, "sample.py", f"--ckpt={tmp_path / 'handed'}",
                             f"--images={tmp_path / 'data' / 'images' / 'val'}", f"--json={tmp_path / 'd.json'}",
                             "--top_k=3"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    records = json.loads((tmp_path / "d.json").read_text())
    assert len(records) == 2 * 3 and {r["category_id"] for r in records} <= {3, 5, 7, 9}


def test_a_sigmoid_class_head_is_not_written(tmp_path):
    model = AdditionsDETR(num_classes=2, backbone="resnet18", hidden_dim=32, num_heads=4, num_encoder_layers=1,
                          num_decoder_layers=1, dim_feedforward=64, num_queries=4, cls_loss="focal")
    message = one_line_error(lambda: weights.write_transformers_folder(model, str(tmp_path / "out")))
    assert "cls_loss='focal'" in message and not (tmp_path / "out").exists()
