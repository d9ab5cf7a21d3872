"""Rebuild the ISTA2 representative banks of a CvT checkpoint (not upstream), launched by run.sh:

    bash run.sh -g N -t rebuild_bank --cfg CFG TEST.MODEL_FILE ckpt.pth DATASET.ROOT /path/to/imagenet

The config's MODEL.ISTA2.EVAL_ALIGN must be bank. Training images (evaluation transform) run through the
frozen model until every bank is full; the checkpoint with its new banks is written as <name>_bank.pth in
the run folder, and TEST.MODEL_FILE is left as it was.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import trainer  # noqa: E402

from lib import runner  # noqa: E402

if __name__ == '__main__':
    trainer.run_cli(runner.on_model_file, trainer.rebuild_bank, 'rebuild_bank',
                    'Rebuild the ISTA2 banks of a CvT checkpoint')
