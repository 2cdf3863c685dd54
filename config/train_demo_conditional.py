# The class-conditional demo (paper IV-C) on the demo phantoms, whose emphysema class 0-4 sets the share of lung
# below -950 HU: python data/demo/prepare.py && python train.py config/train_demo_conditional.py
# config/train_demo.py's small-data settings without the diversity hinge, plus the class options beyond the paper.
out = "out/conditional"
data_dir = "data/demo"
img_size = 64
width = 0.125
latent_dim = 128
num_classes = 5
lambda_class = 0.5  # five times the paper's
batch_size = 4
max_iters = 2400
lr_G = 4e-4
lr_D = 4e-4
r1_gamma = 1.0
slab_context = True
mbstd_group = 4
d_width = 0.25
g_out = "scaled"
g_noise = True
g_pad = "replicate"
g_class = True  # G^H gets the class directly: the class is a texture that G^H draws
d_stretch = 1.5  # D^H sees the lungs' level against air
class_window = "-1000,-800,-500"  # the class term from a classifier of real slabs in a lung window, over the
# enclosed voxels below -500 HU, not from D's AC-GAN heads
class_twin = True  # G's class term is C's minus its twin's, so that the classes do not overshoot the real ones
lr_decay_start = 1200
lr_decay_iters = 2400
enc_interval = 2
channels_last = True
ema_decay = 0.99
dtype = "float32"
log_interval = 50
ckpt_interval = 400
sample_interval = 400
num_samples = 3
