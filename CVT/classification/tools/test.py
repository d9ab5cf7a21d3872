"""CvT (+ ISTA2) evaluation, launched by run.sh:

    bash run.sh -g N -t test -p 13000 --cfg CFG TEST.MODEL_FILE ckpt.pth DATASET.ROOT /path/to/imagenet

TEST.MODEL_FILE (default: the run folder's model_best.pth) may be a bare state_dict or a training
checkpoint.pth; it must fit the config's model exactly. TEST.PROTOCOL picks the evaluation protocol.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import trainer  # noqa: E402

from lib import runner  # noqa: E402

if __name__ == '__main__':
    trainer.run_cli(runner.on_model_file, trainer.evaluate, 'test', 'Test a CvT classification network')
