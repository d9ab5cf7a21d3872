# PVTv2-B2 baseline (ISTA2 off). Keys are main.py flag names; a flag given on the command line wins.
cfg = dict(
    model='pvt_v2_b2',
    drop_path=0.1,
    clip_grad=None,
    ista2_args=dict(),
)
