"""The demo: a small SRNO trained on scikit-image's photographs in minutes on a CPU.

It stops after `max_train_minutes`, then reports PSNR on held-out photographs at x2, x3
and x4 against bicubic interpolation (benchmark protocol).
"""

import ml_collections

from configs import default


def get_config():
    c = default.get_config()
    c.batch_size = 8
    c.model.encoder_args = ml_collections.ConfigDict(dict(n_resblocks=4, n_feats=64, res_scale=1.0))
    c.model.width = 64
    c.model.heads = 4
    c.data.train = "demo"
    c.data.val = "demo"
    c.data.repeat = 100
    c.data.worker_processes = False  # two cores: threads start faster
    c.data.inp_size = 32
    c.data.sample_q = 32 * 32
    c.optim.lr = 2e-4
    c.optim.warmup_mult = 1.0
    c.optim.warmup_epochs = 0
    c.optim.epochs = 40
    c.max_train_minutes = 9.0
    c.log_every_steps = 100
    c.checkpoint.every_steps = 500
    c.checkpoint.keep_every_epochs = 0
    c.eval.every_steps = 250  # a PSNR curve in TensorBoard; two photographs, a few seconds each
    c.eval.scales = (2.0, 3.0, 4.0)
    c.eval.protocol = "benchmark"
    return c
