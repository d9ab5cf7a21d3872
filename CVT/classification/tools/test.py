"""CvT (+ ISTA2) evaluation, launched by run.sh:

    bash run.sh -g N -t test -p 13000 --cfg CFG TEST.MODEL_FILE ckpt.pth DATASET.ROOT /path/to/imagenet

TEST.MODEL_FILE (default: the run folder's model_best.pth) may be a bare state_dict or a training
checkpoint.pth; it must fit the config's model exactly. TEST.PROTOCOL picks the evaluation protocol.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import trainer  # noqa: E402
from common.errors import ConfigError  # noqa: E402

from lib import runner  # noqa: E402
from lib.models import build_model  # noqa: E402


def main():
    config, session = runner.setup(runner.parse_args('Test a CvT classification network'), 'test')
    if config.TEST.MODEL_FILE and not config.TEST.MODEL_FILE.endswith('.pth'):
        raise ConfigError(f'TEST.MODEL_FILE {config.TEST.MODEL_FILE!r} must be a .pth file')
    train_set, val_set = runner.datasets(config)
    return trainer.evaluate(session, build_model(config), runner.recipe(config, session, train_set, val_set, 'test'))


if __name__ == '__main__':
    trainer.run_cli(main)
