# The demo at the size that draws the spine and the ribs, for a GPU:
# python data/demo/prepare.py && python train.py config/train_demo_gpu.py
# config/train_demo.py's settings (see its comments) with G and the encoders at half the official widths, D at the
# full width, out_clip, and 3,000 iterations at constant rates (as measured: lr_decay came after). The 10-minute CPU
# demo's G (width 1/8) cannot draw bone at its budget (README, "What reaches the targets"). Cost: about 2 min 40 s
# alone on one H200 (52 ms per iteration); on 2 CPU cores about 6.6x the CPU demo's time per iteration, some 2.6 hours.
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
out_scale = 1.1
g_noise = True
g_pad = "replicate"
out_clip = True  # clipped like the scans: the air outside the body stays air, and the lung band comes within 25%
lambda_div = 1.0
enc_interval = 4  # the encoders every 4th iteration, as measured: G, D and the samples do not depend on it
channels_last = True
ema_decay = 0.99
dtype = "float32"  # as measured; 'auto' (bf16 on GPUs that have it) is faster and was not measured here
log_interval = 100
ckpt_interval = 1200
sample_interval = 1200
num_samples = 3
