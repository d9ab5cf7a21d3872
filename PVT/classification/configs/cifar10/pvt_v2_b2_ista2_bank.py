# PVTv2-B2 + ISTA2 evaluated against a bank of training representatives (docs/method.md); training is that
# of pvt_v2_b2_ista2.py.
_base_ = './pvt_v2_b0_ista2_bank.py'
cfg = dict(model='pvt_v2_b2')
