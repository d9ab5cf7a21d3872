"""Weight initialisation shared by the model files."""
from timm.layers import trunc_normal_
from torch import nn


def trunc_normal_linear(module, std=.02):
    """For nn.apply: Linear weights from a truncated normal, biases zero; other modules untouched
    (LayerNorm and RMSNorm keep torch's weight 1, bias 0)."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
