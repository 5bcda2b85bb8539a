"""The paper's recipe: EDSR-baseline-SRNO on DIV2K (reference train_edsr-sronet.yaml).

Patch 128 (LR), scale U(1, 4) per sample, 128 x 128 query points, batch 64, L1, Adam
4e-5 with a x10 linear warm-up over 50 epochs and cosine to 0 at epoch 1050; DIV2K's
800 training images repeated 20 times = 16,000 samples (250 steps) an epoch.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 64

    c.model = ml_collections.ConfigDict()
    c.model.encoder = "edsr-baseline"
    c.model.encoder_args = ml_collections.ConfigDict(
        dict(n_resblocks=16, n_feats=64, res_scale=1.0)
    )
    c.model.width = 256
    c.model.heads = 16
    # Fine-tuning: a checkpoint whose parameters start a new run (a reference .pth, a
    # workdir, step folder or export; Adam and the schedule start afresh). A resumed run
    # continues from its own checkpoint.
    c.init_from = ""
    c.compute_dtype = "float32"  # 'bfloat16' on GPU/TPU: bf16 compute, float32 parameters
    c.fused_kernels = True  # on GPUs, the kernel integrals' LayerNorms and k^T v in Pallas

    c.data = ml_collections.ConfigDict()
    c.data.train = "div2k"  # 'div2k' (TFDS), 'demo', or a folder such as DIV2K_train_HR
    c.data.val = "div2k"
    c.data.data_dir = ""  # TFDS data_dir, where data.train or data.val is "div2k"
    c.data.repeat = 20
    c.data.inp_size = 128
    c.data.scale_min = 1.0
    c.data.scale_max = 4.0
    c.data.sample_q = 128 * 128
    c.data.augment = True
    c.data.workers = 0  # 0: one per core
    c.data.worker_processes = True  # processes, not threads: scales past a few cores
    c.data.prefetch = 2

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 4e-5
    c.optim.warmup_mult = 10.0
    c.optim.warmup_epochs = 50
    c.optim.epochs = 1050
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8

    c.steps_per_epoch = 0  # 0: images * repeat / batch_size
    c.total_steps = 0  # 0: optim.epochs * steps_per_epoch
    c.max_train_minutes = 0.0  # 0: no limit; otherwise save and stop after this long
    c.max_nonfinite_steps = 20

    c.log_every_steps = 50
    # The newest `keep` (+ 1), and every `keep_every_epochs` epochs for good: the reference
    # saves epochs 250, 500, 750 and 1000, whose last is the paper's published model.
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=2500, keep=3, keep_every_epochs=250))
    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 50 * 250  # the reference validates every 50 epochs
    c.eval.scales = (2.0,)
    c.eval.protocol = "div2k"
    c.eval.max_images = 100
    return c
