# The paper's COPDGene setting (Sec. III-E, IV-A): 256^3 thorax CT, HU window [-1024, 600].
# python prepare.py --input=/data/copdgene --out=data/copdgene --img_size=256 --modality=ct
# torchrun --standalone --nproc_per_node=2 train.py config/train_lung_ct.py
out = "out/lung_ct"
data_dir = "data/copdgene"
img_size = 256
batch_size = 4
max_iters = 80000
ema_decay = 0.999
log_interval = 20
ckpt_interval = 1000
sample_interval = 2000
