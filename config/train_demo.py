# CPU-sized demo on the procedural thorax phantoms: python data/demo/prepare.py && python train.py config/train_demo.py
# A 64^3 model at a quarter of the official widths; finishes on 2 CPU cores in minutes.
out = "out"
data_dir = "data/demo"
img_size = 64
width = 0.25
latent_dim = 128
batch_size = 4
max_iters = 1500
lr_D = 4e-4
ema_decay = 0.99
dtype = "float32"
log_interval = 50
ckpt_interval = 250
sample_interval = 500
num_samples = 3
