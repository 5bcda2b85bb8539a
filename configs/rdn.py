"""RDN-SRNO: the paper's recipe with the RDN encoder (config B: 16 blocks x 8 convs, growth 64)."""

import ml_collections

from configs import default


def get_config():
    c = default.get_config()
    c.model.encoder = "rdn"
    c.model.encoder_args = ml_collections.ConfigDict(dict(G0=64, RDNkSize=3, RDNconfig="B"))
    return c
