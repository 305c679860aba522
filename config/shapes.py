# The embedded default: a small DETR on the synthetic shapes set, 10.1 minutes on a 2-core CPU (EXPERIMENTS.md).
#   python data/shapes/prepare.py && python train.py config/shapes.py
out_dir = "out-shapes"
dataset = "shapes"
eval_interval = 700
log_interval = 100
# a small model: ResNet-18 trained from scratch (no ImageNet weights offline), so all of it learns,
# BatchNorm included; 2 + 2 transformer layers of width 128; 10 queries for at most 6 objects an image
backbone = "resnet18"
pretrained_backbone = False
frozen_bn = False
trainable_layers = 5  # a random stem must learn too
hidden_dim = 128
num_heads = 4
num_encoder_layers = 2
num_decoder_layers = 2
dim_feedforward = 512
dropout = 0.0  # nothing to regularise in a few minutes
num_queries = 10
# the 128-pixel images trained at 64 pixels (1.6x the images a second of 128): with the backbone
# stopped after layer2 (stride 8) that is an 8x8 token grid, where the paper's stride 32 leaves 2x2
batch_size = 8
num_workers = 1
train_scales = [64]
max_size = 96
crop_scales = [64]
crop_size = (48, 64)
val_scale = 64
pad_to = 32
feature_stride = 8
# DETR's convergence fixes (additions/model.py): val mAP50 at ten CPU minutes ~0.0 without them,
# ~0.9 with; conditional_cross_attn lets the decoder move its boxes (EXPERIMENTS.md, "Why vanilla DETR is slow here")
anchor_queries = True
encoder_proposals = True
denoising_groups = 3
query_groups = 3
conditional_cross_attn = True
# and two of DINO's: negatives in each denoising group, and a layer's box loss reaching the layer before;
# better on two seeds in val mAP50 and COCO mAP (EXPERIMENTS.md, "The successors' recipe")
dn_contrastive = True
look_forward_twice = True
# with the dense supervision above a from-scratch backbone takes 5x the paper's rate (2e-3 diverged)
learning_rate = 1e-3
lr_backbone = 1e-3
max_iters = 2800  # 10.1 minutes alone on 2 CPU cores (val mAP50 0.929)
lr_drop = 2400
warmup_iters = 100
