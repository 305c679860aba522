# The paper's DETR: every addition beyond the paper but feature_stride switched off (additions/model.py),
# to compose after any config, e.g. the README's first run without its convergence fixes:
#   python train.py config/shapes.py config/vanilla.py
# feature_stride stays the first config's: it follows the image size (a 64-pixel image at the
# paper's stride 32 is a 2x2 token grid); add --feature_stride=32 for the paper's backbone exactly.
anchor_queries = False
encoder_proposals = False
denoising_groups = 0
query_groups = 1
conditional_cross_attn = False
dn_contrastive = False
look_forward_twice = False
cls_loss = "ce"
mosaic_prob = 0.0
