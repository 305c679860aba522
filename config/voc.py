# DETR-R50 on Pascal VOC (train: VOC2007 + VOC2012 trainval, 16,551 images; val: VOC2007 test, 4,952)
# on one 80 GB GPU: the paper's optimizer and augmentation (§4), with the five convergence fixes below on.
#   python data/voc/prepare.py --voc_root=/path/to/VOCdevkit && python train.py config/voc.py
# Or fine-tune the official COCO model: its weights fill the backbone, encoder, decoder and heads
# (class rows by name); the object queries and the additions' own modules start new (how many steps
# that needs is not yet measured; the paper's DETR alone fine-tunes in far fewer than from ImageNet):
#   python train.py config/voc.py --init_from=detr-r50 --max_iters=13000 --lr_drop=9000
out_dir = "out-voc"
# DETR's convergence fixes (additions/model.py), measured on CPU only: EXPERIMENTS.md, "Notes moved
# from config/voc.py (issue 45)"; feature_stride stays the paper's 32, the coarsest ResNet has
anchor_queries = True
encoder_proposals = True
denoising_groups = 3
query_groups = 3
conditional_cross_attn = True
# and two of DINO's: negatives in each denoising group, and a layer's box loss reaching the layer before;
# better on two seeds in val mAP50 and COCO mAP (EXPERIMENTS.md, "The successors' recipe")
dn_contrastive = True
look_forward_twice = True
dataset = "voc"
backbone = "resnet50"
pretrained_backbone = True  # ImageNet weights, as the paper
# the paper's batch of 64 as 32 images x 2 steps accumulated, half what the CPU's estimate fits in 80 GB;
# 24 GB: 8 x 8, 40 GB: 16 x 4 (EXPERIMENTS.md, "Speed": memory of a training step)
batch_size = 32
gradient_accumulation_steps = 2
num_workers = 8
# 150 epochs of 16,551 images (259 steps each), the rates / 10 after 100: half the paper's COCO schedule, to fit
# a few days of one GPU; not yet measured (check the mAP curve in out-voc/log.jsonl before trusting it)
max_iters = 38850
lr_drop = 25900
eval_interval = 2590  # every 10 epochs
checkpoint_minutes = 20  # and ckpt.pt every 20 minutes: a killed run loses at most that (a write: ~0.5 s, 491 MB)
log_interval = 50
best_metric = "mAP50"  # VOC's metric (mAP50_07, the 11-point VOC2007 one, is logged too)
pad_to = 64  # fewer distinct shapes: kinder to cuDNN autotuning and to torch.compile
dtype = "bfloat16"
compile = False  # compiles (train.compile_model); its gain on a GPU is unmeasured: tools/bench.py --what=gpu_check
