# A small DETR on the 80 training photos of ../shared/data/voc-mini, evaluated on the same photos:
# a CPU check that the VOC path learns from real images (it should overfit them).
#   python data/voc/prepare.py --voc_root=../shared/data/voc-mini/VOCdevkit --years=2012 \
#       --splits=train:train,val:val --out_dir=data/voc-mini
#   python train.py config/voc_mini.py
out_dir = "out-voc-mini"
dataset = "voc-mini"
train_split = "train"
val_split = "train"  # overfitting is the point: measure on what it trains on
eval_interval = 250
log_interval = 25
backbone = "resnet18"
pretrained_backbone = False
frozen_bn = False
trainable_layers = 5
hidden_dim = 128
num_heads = 4
num_encoder_layers = 2
num_decoder_layers = 2
dim_feedforward = 512
dropout = 0.0
num_queries = 20
batch_size = 8
num_workers = 1
train_scales = [224]
max_size = 320
crop_scales = [224]
crop_size = (192, 224)
val_scale = 224
pad_to = 32
learning_rate = 2e-4
lr_backbone = 2e-4
max_iters = 1000
lr_drop = 900
warmup_iters = 50
