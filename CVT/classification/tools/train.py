"""CvT (+ ISTA2) training, launched by run.sh:

    bash run.sh -g N -t train -p 13000 --cfg experiments/imagenet/cvt_ista2/cvt-13-ista2-224x224.yaml \
        DATASET.ROOT /path/to/imagenet [OUTPUT_DIR D TRAIN.BATCH_SIZE_PER_GPU B]

Rerunning the same command continues from OUTPUT_DIR/<dataset>/<cfg name>/checkpoint.pth.
"""
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import checkpoint, trainer  # noqa: E402
from common.errors import ConfigError  # noqa: E402

from lib import runner  # noqa: E402
from lib.models import build_model, cls_cvt  # noqa: E402


def main():
    config, session = runner.setup(runner.parse_args('Train a CvT classification network'), 'train')
    if config.SWA.ENABLED:
        raise ConfigError('SWA.ENABLED: stochastic weight averaging is not supported')
    if session.runtime.is_main:
        with open(os.path.join(session.output, 'config.yaml'), 'w') as f:
            f.write(config.dump())
        shutil.copy2(cls_cvt.__file__, session.output)  # as upstream: the model's source beside its results
    train_set, val_set = runner.datasets(config)
    model = build_model(config)
    session.log(str(model))
    session.log(f'Trainable Model Total Parameter: \t{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M')
    if config.MODEL.INIT_WEIGHTS and config.MODEL.PRETRAINED:
        state = checkpoint.model_state(checkpoint.load(config.MODEL.PRETRAINED))
        layers = config.MODEL.PRETRAINED_LAYERS
        state = {k: v for k, v in state.items() if layers[0] == '*' or k.split('.')[0] in layers}
        missing = checkpoint.load_weights(model, state, strict=False, source=config.MODEL.PRETRAINED)
        session.log(f'=> initialised from {config.MODEL.PRETRAINED}; not in it: {missing}')
    return trainer.train(session, model, runner.recipe(config, session, train_set, val_set, 'train'))


if __name__ == '__main__':
    trainer.run_cli(main)
