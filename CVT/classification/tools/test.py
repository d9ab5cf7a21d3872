"""CvT (+ ISTA2) evaluation, launched by run.sh:

    bash run.sh -g N -t test -p 13000 --cfg CFG TEST.MODEL_FILE ckpt.pth DATASET.ROOT /path/to/imagenet

TEST.MODEL_FILE (default: the run folder's model_best.pth) may be a bare state_dict or a training
checkpoint.pth; it must fit the config's model exactly.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import checkpoint, engine  # noqa: E402
from common.runtime import shutdown  # noqa: E402

from lib import runner  # noqa: E402
from lib.models import build_model  # noqa: E402


def main():
    args = runner.parse_args('Test a CvT classification network')
    runtime, config, out, logger = runner.setup(args, 'test')
    _, val_set = runner.datasets(config)
    config.defrost()
    config.MODEL.NUM_CLASSES = len(val_set.classes)
    config.freeze()
    model = build_model(config)
    model_file = config.TEST.MODEL_FILE or os.path.join(out, 'model_best.pth')
    if not model_file.endswith('.pth'):
        raise ValueError(f'TEST.MODEL_FILE {model_file!r} must be a .pth file')
    state = checkpoint.model_state(checkpoint.load(model_file), keys=('state_dict',))
    missing = checkpoint.load_weights(model, state, source=model_file, allowed_missing=('bg_token',))
    if missing:
        logger.warning(f'=> {model_file} has no {missing}: a checkpoint of the reference implementation, whose '
                       f'background token was random and unsaved; using this model\'s fixed, seeded one instead')
    logger.info(f'=> loaded {model_file}')
    model.to(runtime.device)
    stats = engine.evaluate(model, runner.val_loader(config, runtime, val_set), runtime.device, amp=False,
                            sharded=runtime.distributed, print_freq=config.PRINT_FREQ, echo=logger.info)
    runner.log_test(logger, stats)
    logger.info(f"=> evaluated {stats['images']} images")
    shutdown()


if __name__ == '__main__':
    main()
