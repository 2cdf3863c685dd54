# Class-conditional demo (paper IV-C, its class term from a slab classifier: class_window) on the demo phantoms,
# whose emphysema class 0-4 sets the share of lung below -950 HU:
# python data/demo/prepare.py && python train.py config/train_demo_conditional.py
# The same small-data settings as config/train_demo.py (see its comments) but the diversity hinge (lambda_div),
# which came after the conditional runs in the README and did not help this config there, plus the class.
out = "out/conditional"
data_dir = "data/demo"
img_size = 64
width = 0.125
latent_dim = 128
num_classes = 5
lambda_class = 0.5  # five times the paper's; at 1.0 the low classes lost lungs, and with the twin a high class
# lost its lungs on one seed of six (README: the twenty-second and twenty-third passes)
batch_size = 4
max_iters = 2400  # twice the unconditional demo's (about 8 min on 2 cores): README, the twenty-second pass
lr_G = 4e-4
lr_D = 4e-4
r1_gamma = 1.0
slab_context = True
mbstd_group = 4
d_width = 0.25
out_scale = 1.1
g_noise = True
g_pad = "replicate"
g_class = True  # G^H gets the class too, a gain and bias per class in its norm: the class is a texture G^H draws
d_stretch = 1.5  # D^H sees the lungs' level against air (README: the lungs come out as air otherwise)
class_window = "-1000,-800,-500"  # the class term from a classifier of real slabs in a lung window, not D's AC
# heads, which G fooled with a code of its own; over the enclosed voxels below -500 HU (the lung band's top), so that
# lungs brightened past -800 stay in its view
class_twin = True  # G's class term is C's minus a twin's trained on G's slabs (TAC-GAN): with C's alone class 4
# overshot on six runs of seven (41-50% of its lung below -950 HU against 26%; README: the twenty-third pass)
lr_decay_start = 1200  # every rate falls linearly to 0 over the second half, as in config/train_demo.py: FID 4-11
lr_decay_iters = 2400  # on three seeds of five; two of them gave 72 and 213 without it (README: the twentieth pass)
enc_interval = 2  # as in config/train_demo.py: the samples are unchanged
channels_last = True
ema_decay = 0.99
dtype = "float32"
log_interval = 50
ckpt_interval = 400
sample_interval = 400
num_samples = 3
