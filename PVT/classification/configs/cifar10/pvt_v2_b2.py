# PVTv2-B2 (baseline): the table study on CIFAR-10 (32 px); the recipe of the PVTv2-B0 study.
_base_ = './pvt_v2_b0.py'
cfg = dict(model='pvt_v2_b2')
