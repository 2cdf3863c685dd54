# The demo at the size that draws the spine and the ribs, for a GPU:
# python data/demo/prepare.py && python train.py config/train_demo_gpu.py
# config/train_demo.py's settings with G and the encoders at half the official widths, D at the full width, G's
# output clipped, and 3,000 iterations at constant rates.
out = "out/gpu"
data_dir = "data/demo"
img_size = 64
width = 0.5
d_width = 1.0
latent_dim = 128
batch_size = 4
max_iters = 3000
lr_G = 4e-4
lr_D = 4e-4
r1_gamma = 1.0
slab_context = True
mbstd_group = 4
g_out = "clipped"  # clipped like the scans: the air outside the body stays air
g_noise = True
g_pad = "replicate"
lambda_div = 1.0
enc_interval = 4
channels_last = True
ema_decay = 0.99
dtype = "float32"
log_interval = 100
ckpt_interval = 1200
sample_interval = 1200
num_samples = 3
