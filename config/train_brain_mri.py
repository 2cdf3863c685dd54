# The paper's GSP setting (Sec. IV-A): 256^3 skull-stripped T1 MRI, clipped at the 99.9th percentile.
# python prepare.py --input=/data/gsp --out=data/gsp --img_size=256 --modality=mri
# torchrun --standalone --nproc_per_node=2 train.py config/train_brain_mri.py
out = "out/brain_mri"
data_dir = "data/gsp"
img_size = 256
batch_size = 4
max_iters = 80000
ema_decay = 0.999
log_interval = 20
ckpt_interval = 1000
sample_interval = 2000
