# PVTv2-B0 + ISTA2: the table study on CIFAR-10 (32 px); everything else as the baseline config.
_base_ = './pvt_v2_b0.py'
cfg = dict(ista2_args=dict(qk_norm=True, v_norm=True, ista2_method='v', attn_inter_topk=1, rep_tkn_type='mean'))
