# Your own data: a COCO-format export (CVAT, Label Studio, Roboflow, makesense, ...) fine-tuned from
# the official DETR-R50. Copy this file, set dataset, and check the step counts below.
#   python data/coco/prepare.py --ann=export/train.json --images=export/images --out_dir=data/mine --split=train
#   python data/coco/prepare.py --ann=export/val.json --images=export/images --out_dir=data/mine --split=val
#   python train.py config/custom.py
#   python sample.py --ckpt=out-custom/best.pt --images=export/images
out_dir = "out-custom"
dataset = "mine"  # data/mine/train.json and val.json, as written above
# Fine-tune: from scratch DETR needs hundreds of COCO epochs, and on a few thousand images sits on its plateau
# (facebookresearch/detr #125, #202). Below ~10k images start from the COCO model, which already finds objects.
init_from = "detr-r50"
# Or a model of yours (--init_from=out-shapes/best.pt): this file sets no architecture key, so the
# checkpoint gives them all; fine-tune it at a tenth of its from-scratch rate (EXPERIMENTS.md, "Fine-tuning rates")
# the paper's rates: the transformer at 1e-4, the pretrained backbone at a tenth of it
learning_rate = 1e-4
lr_backbone = 1e-5
# ~50 epochs, the rates dropped by 10 for the last third. Set for 1,000 training images at batch 4
# (250 steps an epoch): scale max_iters, lr_drop and eval_interval with your image count.
batch_size = 4
max_iters = 12_500
lr_drop = 8_500
eval_interval = 1_250  # every 5 epochs; best.pt keeps the best val mAP
log_interval = 50
best_metric = "mAP"  # COCO AP; mAP50 if your boxes are loose or your objects tiny
# smaller images than the paper's (shorter side 480-800, at most 1333) fit a 16 GB GPU at batch 4
train_scales = [480, 512, 544, 576, 608, 640]
max_size = 1000
crop_scales = [400, 500, 600]
crop_size = (384, 600)
val_scale = 640
# The faster-convergence additions (config/shapes.py, additions/model.py) may be
# switched on here too: the official weights then fill the backbone, encoder, decoder and heads, and
# the additions' own modules and the object queries start new (README, "Training and fine-tuning
# options"; not yet measured). Without a download, or for data unlike COCO's photos, train from
# scratch with them on instead: init_from = "scratch",
# pretrained_backbone = True, anchor_queries = True, encoder_proposals = True, denoising_groups = 3,
# query_groups = 3, conditional_cross_attn = True. feature_stride follows the image size: 8 for small objects in
# small images, 16 below ~300 px, 32 (the paper's) above (EXPERIMENTS.md, "The same recipe at other image sizes").
