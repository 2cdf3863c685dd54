# Class-conditional HA-GAN (paper IV-C: GOLD stage 0-4 at 128^3, AC-GAN heads on D^H and D^L).
# python prepare.py --input=/data/copdgene --labels=gold.csv --out=data/copd128 --img_size=128 --modality=ct
# torchrun --standalone --nproc_per_node=2 train.py config/train_conditional.py
out = "out/conditional"
data_dir = "data/copd128"
img_size = 128
num_classes = 5
lambda_class = 0.1
batch_size = 4
max_iters = 80000
ema_decay = 0.999
log_interval = 20
ckpt_interval = 1000
sample_interval = 2000
