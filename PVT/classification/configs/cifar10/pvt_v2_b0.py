# PVTv2-B0 (baseline): the table study on CIFAR-10 (32 px). The paper's recipe, with a 30-epoch
# schedule, 3 warm-up epochs and a base lr of 2e-3 (5e-4 at batch 128 in one process).
cfg = dict(
    model='pvt_v2_b0',
    input_size=32,
    drop_path=0.1,
    clip_grad=None,
    epochs=30,
    warmup_epochs=3,
    lr=2e-3,
    ista2_args=dict(),
)
