# PVTv2-B2 + ISTA2: the table study on CIFAR-10 (32 px); the ISTA2 options and recipe of the PVTv2-B0 study.
_base_ = './pvt_v2_b0_ista2.py'
cfg = dict(model='pvt_v2_b2')
