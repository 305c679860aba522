# COCO 2017 detection with DETR-R50, the paper's setup: train2017 (118,287 images), val2017 (5,000).
# Download from https://cocodataset.org/#download "2017 Train images", "2017 Val images" and
# "2017 Train/Val annotations", and unzip them into one folder: coco/train2017, coco/val2017,
# coco/annotations. Then:
#   python data/coco/prepare.py --ann=coco/annotations/instances_val2017.json --images=coco/val2017 \
#       --out_dir=data/coco --split=val
#   python train.py config/coco.py --init_from=detr-r50 --eval_only     # published: 42.0 AP
#   python sample.py --ckpt=detr-r50 --dataset=coco --split=val --json=detections.json --threshold=0   # for loadRes
# Training needs the train split as well (--ann=coco/annotations/instances_train2017.json
# --images=coco/train2017 --split=train).
out_dir = "out-coco"
dataset = "coco"
best_metric = "mAP"  # COCO's metric: AP at IoU 0.50:0.95
# the paper's evaluation size (§4): shorter side 800, longer side at most 1333 (train.py's defaults)
val_scale = 800
max_size = 1333
# the paper's schedule: 300 epochs at batch 64, the learning rates dropped by 10 after 200 (16 V100s,
# 3 days); here 4 images x 16 accumulated steps make the same batch on one GPU, for weeks
batch_size = 4
gradient_accumulation_steps = 16
max_iters = 554_500  # 300 epochs of 118,287 images at batch 64 (1,848.2 steps each), rounded
lr_drop = 369_700
eval_interval = 18_480  # every 10 epochs
log_interval = 100
