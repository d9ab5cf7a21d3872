# PVTv2-B0 + ISTA2 whose evaluation aligns against a bank of training representatives, so that an image's
# prediction does not depend on its batch (docs/method.md). Training is that of pvt_v2_b0_ista2.py.
_base_ = './pvt_v2_b0_ista2.py'
cfg = dict(ista2_args=dict(eval_align='bank', bank_size=256))
