"""Record the on-disk names and shapes of two tiny transformers DETR folders (save_pretrained) into
transformers_detr_names.json, for tests/test_transformers_format.py: a timm ResNet-18 backbone (the
hub's default) and transformers' own ResNet (the hub's no_timm revision). Needs transformers and timm:
    python tests/data/record_transformers_names.py tests/data/transformers_detr_names.json"""
import json, sys, tempfile
import transformers
from safetensors import safe_open

tiny = dict(d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
            encoder_attention_heads=4, decoder_attention_heads=4, num_queries=8,
            id2label={0: "circle", 1: "square", 2: "triangle", 3: "star"},
            label2id={"circle": 0, "square": 1, "triangle": 2, "star": 3})
variants = {
    "timm": transformers.DetrConfig(backbone="resnet18", use_pretrained_backbone=False, **tiny),
    "resnet": transformers.DetrConfig(use_timm_backbone=False, backbone_config=transformers.ResNetConfig(
        layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], out_features=["stage4"]), **tiny),
}
out = {"transformers_version": transformers.__version__}
for name, config in variants.items():
    model = transformers.DetrForObjectDetection(config)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        with safe_open(f"{d}/model.safetensors", "pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        cfg = json.load(open(f"{d}/config.json"))
    out[name] = {"config": cfg, "weights": shapes, "in_memory": sorted(model.state_dict())}
json.dump(out, open(sys.argv[1], "w"), indent=1, sort_keys=True)
