# The embedded default: a small DETR on the synthetic shapes set, trained on a 2-core CPU in ~10 minutes.
#   python data/shapes/prepare.py && python train.py config/shapes.py
out_dir = "out-shapes"
dataset = "shapes"
eval_interval = 500
log_interval = 50
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
# images are 128x128: the paper's augmentation scaled down to them, batches padded to 32
batch_size = 8
num_workers = 1
train_scales = [96, 112, 128]
max_size = 160
crop_scales = [96, 112, 128]
crop_size = (64, 112)
val_scale = 128
pad_to = 32
learning_rate = 2e-4
lr_backbone = 2e-4  # a backbone learning from scratch needs the full rate
max_iters = 2000
lr_drop = 1700
warmup_iters = 100
