# A small DETR on the 80 training photos of voc-mini, evaluated on the same photos: a CPU check that
# the VOC path learns from real images (it should overfit them). voc-mini is a VOC2012 devkit cut
# down to 100 photos, 80 listed in VOC2012/ImageSets/Main/train.txt and 20 in val.txt (EXPERIMENTS.md's
# figures used one such cut; any 100 photos of VOC2012's own lists make one):
#   python data/voc/prepare.py --voc_root=/path/to/voc-mini/VOCdevkit --years=2012 \
#       --splits=train:train,val:val --out_dir=data/voc-mini
#   python train.py config/voc_mini.py
out_dir = "out-voc-mini"
dataset = "voc-mini"
train_split = "train"
val_split = "train"  # overfitting is the point: measure on what it trains on
eval_interval = 850
log_interval = 100
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
batch_size = 4
num_workers = 1
# shorter side 160 pixels, and crops wider than any image (so none): nothing stands between the
# model and memorising its 80 photos but the flips
train_scales = [160]
max_size = 256
crop_scales = [160]
crop_size = (1000, 1000)
val_scale = 160
pad_to = 32
# DETR's convergence fixes, as config/shapes.py, at stride 16 (a 10x14 token grid at 160 px): measured
# here, mAP50 on the 80 photos 0.99 after 2,500 steps where vanilla DETR reached 0.52. At lr 1e-3, as
# shapes uses, they stayed on the plateau (0.001 at step 1,500, before conditional_cross_attn): real
# photos at batch 4 need 2e-4. The 20 held-out val photos get ~0.03: 80 photos teach a from-scratch
# backbone nothing general.
feature_stride = 16
anchor_queries = True
encoder_proposals = True
denoising_groups = 3
query_groups = 3
conditional_cross_attn = True
# DINO's contrastive denoising and look-forward-twice stay off here: ahead on shapes, behind on these 80
# photos on two seeds (EXPERIMENTS.md, "The combination, adopted")
learning_rate = 2e-4
lr_backbone = 2e-4
# 1,700 steps, the rates on a cosine after the warm-up: mAP50 0.919 on the 80 photos (0.558 at step
# 850; mAP 0.722) in 10.5 min. Against the paper's step drop (at 1,400), on seeds 1337 and 7 (issue 25's
# code): mAP 0.634 / 0.723 against 0.561 / 0.660, mAP50 0.877 / 0.915 against 0.861 / 0.922 (EXPERIMENTS.md).
# The longer 2,500 steps (a drop at 2,250, earlier code) reach 0.988 but pass 0.8 only at step 2,000.
max_iters = 1700  # 10.5 minutes alone on 2 CPU cores
lr_schedule = "cosine"
warmup_iters = 100
