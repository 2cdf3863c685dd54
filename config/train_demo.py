# The CPU demo on the procedural thorax phantoms: python data/demo/prepare.py && python train.py config/train_demo.py
# A 64^3 model, G at an eighth of the official widths and D at a quarter, 1,200 iterations. About 100 training
# volumes is far below what the paper's recipe needs, so the small-data options beyond the paper are on here
# (README, "Options", says what each does); the paper's configs leave them off.
out = "out"
data_dir = "data/demo"
img_size = 64
width = 0.125
latent_dim = 128
batch_size = 4
max_iters = 1200
lr_G = 4e-4  # the paper's 1e-4 is tuned for 80k iterations; at ~1k the bodies stay too bright
lr_D = 4e-4
r1_gamma = 1.0  # lazy R1 on real volumes: an unregularised D memorises ~100 volumes and G collapses
slab_context = True  # G^H trains on slabs as it renders them at inference
mbstd_group = 4  # D sees how alike the samples of a batch are
d_width = 0.25  # D at twice G's width: nearly free on CPU
g_out = "scaled"  # air (-1) reached unsaturated, where D's gradient still reaches the dark tissue beside it
g_noise = True  # G^H can draw scanner noise
g_pad = "replicate"  # no bright first and last slices from zero padding
lambda_div = 1.0  # spreads G's batch as much as real volumes
lr_decay_start = 600  # every rate falls linearly to 0 over the second half
lr_decay_iters = 1200
enc_interval = 2  # the encoders learn every 2nd iteration: G, D and the samples are unchanged
channels_last = True  # faster on CPU
ema_decay = 0.99
dtype = "float32"
log_interval = 50
ckpt_interval = 400
sample_interval = 400
num_samples = 3
