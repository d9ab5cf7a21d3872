"""The CvT trainer's yacs config: the upstream tree and defaults, plus MODEL.ISTA2.

update_config applies, in order: the --cfg file (after the files its BASE list names), the
trailing KEY VALUE overrides, TRAIN.SCALE_LR (lr x world size), and the derived values upstream
sets (NAME, RANK, the timm scheduler's epochs, the timm optimizer's lr, MIXUP_PROB). Keys under
the nodes that admit new ones (as upstream) must be keys the trainer reads; MODEL.SPEC is checked
by the model (lib/models/cls_cvt.py).
"""
import os

from yacs.config import CfgNode as CN

from common.errors import ConfigError
from common.yacs_files import check_known, ista2_node, merge_file, merge_overrides, refuse_unread

_C = CN()
_C.BASE = ['']
_C.NAME = ''
_C.DATA_DIR = ''
_C.DIST_BACKEND = 'nccl'
_C.GPUS = (0,)
_C.MULTIPROCESSING_DISTRIBUTED = True
_C.OUTPUT_DIR = ''
_C.PIN_MEMORY = True
_C.PRINT_FREQ = 20
_C.RANK = 0
_C.VERBOSE = True
_C.WORKERS = 4
_C.MODEL_SUMMARY = False

_C.AMP = CN()
_C.AMP.ENABLED = False
_C.AMP.MEMORY_FORMAT = 'nchw'

_C.CUDNN = CN()
_C.CUDNN.BENCHMARK = True
_C.CUDNN.DETERMINISTIC = False
_C.CUDNN.ENABLED = True

_C.MODEL = CN()
_C.MODEL.NAME = 'cls_hrnet'
_C.MODEL.INIT_WEIGHTS = True
_C.MODEL.PRETRAINED = ''
_C.MODEL.PRETRAINED_LAYERS = ['*']
_C.MODEL.NUM_CLASSES = 1000
_C.MODEL.SPEC = CN(new_allowed=True)


def ista2_defaults():
    """MODEL.ISTA2, from the ISTA2 option schema: every option but the token indices, which the model derives from
    the class token."""
    return ista2_node(omit=('cls_tkn_idx', 'bg_tkn_idx'))


_C.MODEL.ISTA2 = ista2_defaults()

_C.LOSS = CN(new_allowed=True)
_C.LOSS.LABEL_SMOOTHING = 0.0
_C.LOSS.LOSS = 'softmax'

_C.DATASET = CN()
_C.DATASET.ROOT = ''
_C.DATASET.DATASET = 'imagenet'
_C.DATASET.TRAIN_SET = 'train'
_C.DATASET.TEST_SET = 'val'
_C.DATASET.IN_MEMORY = False  # added: decode the image folders once into memory (common/data.py)
_C.DATASET.DATA_FORMAT = 'jpg'
_C.DATASET.LABELMAP = ''
_C.DATASET.TRAIN_TSV_LIST = []
_C.DATASET.TEST_TSV_LIST = []
_C.DATASET.SAMPLER = 'default'
_C.DATASET.TARGET_SIZE = -1

_C.INPUT = CN()
_C.INPUT.MEAN = [0.485, 0.456, 0.406]
_C.INPUT.STD = [0.229, 0.224, 0.225]

_C.AUG = CN()
_C.AUG.SCALE = (0.08, 1.0)
_C.AUG.RATIO = (3.0 / 4.0, 4.0 / 3.0)
_C.AUG.COLOR_JITTER = [0.4, 0.4, 0.4, 0.1, 0.0]
_C.AUG.GRAY_SCALE = 0.0
_C.AUG.GAUSSIAN_BLUR = 0.0
_C.AUG.DROPBLOCK_LAYERS = [3, 4]
_C.AUG.DROPBLOCK_KEEP_PROB = 1.0
_C.AUG.DROPBLOCK_BLOCK_SIZE = 7
_C.AUG.MIXUP_PROB = 0.0
_C.AUG.MIXUP = 0.0
_C.AUG.MIXCUT = 0.0
_C.AUG.MIXCUT_MINMAX = []
_C.AUG.MIXUP_SWITCH_PROB = 0.5
_C.AUG.MIXUP_MODE = 'batch'
_C.AUG.MIXCUT_AND_MIXUP = False
_C.AUG.INTERPOLATION = 2
_C.AUG.TIMM_AUG = CN(new_allowed=True)
_C.AUG.TIMM_AUG.USE_LOADER = False
_C.AUG.TIMM_AUG.USE_TRANSFORM = False

_C.TRAIN = CN()
_C.TRAIN.AUTO_RESUME = True
_C.TRAIN.CHECKPOINT = ''
_C.TRAIN.LR_SCHEDULER = CN(new_allowed=True)
_C.TRAIN.SCALE_LR = True
_C.TRAIN.LR = 0.001
_C.TRAIN.OPTIMIZER = 'sgd'
_C.TRAIN.OPTIMIZER_ARGS = CN(new_allowed=True)
_C.TRAIN.MOMENTUM = 0.9
_C.TRAIN.WD = 0.0001
_C.TRAIN.WITHOUT_WD_LIST = []
_C.TRAIN.NESTEROV = True
_C.TRAIN.GAMMA1 = 0.99
_C.TRAIN.GAMMA2 = 0.0
_C.TRAIN.BEGIN_EPOCH = 0
_C.TRAIN.END_EPOCH = 100
_C.TRAIN.IMAGE_SIZE = [224, 224]  # width, height
_C.TRAIN.BATCH_SIZE_PER_GPU = 32
_C.TRAIN.SHUFFLE = True
_C.TRAIN.EVAL_BEGIN_EPOCH = 0
_C.TRAIN.DETECT_ANOMALY = False
_C.TRAIN.CLIP_GRAD_NORM = 0.0
_C.TRAIN.SAVE_ALL_MODELS = False

_C.TEST = CN()
_C.TEST.BATCH_SIZE_PER_GPU = 32
_C.TEST.CENTER_CROP = True
_C.TEST.IMAGE_SIZE = [224, 224]
_C.TEST.INTERPOLATION = 2
_C.TEST.MODEL_FILE = ''
_C.TEST.REAL_LABELS = False
_C.TEST.VALID_LABELS = ''
_C.TEST.SHUFFLE = False  # added: the same as TEST.PROTOCOL shuffled
_C.TEST.PROTOCOL = 'class-order'  # added: class-order, shuffled or batch-1 (common/trainer.py)

_C.FINETUNE = CN()
_C.FINETUNE.FINETUNE = False
_C.FINETUNE.USE_TRAIN_AUG = False
_C.FINETUNE.BASE_LR = 0.003
_C.FINETUNE.BATCH_SIZE = 512
_C.FINETUNE.EVAL_EVERY = 3000
_C.FINETUNE.TRAIN_MODE = True
_C.FINETUNE.FROZEN_LAYERS = []
_C.FINETUNE.LR_SCHEDULER = CN(new_allowed=True)
_C.FINETUNE.LR_SCHEDULER.DECAY_TYPE = 'step'

_C.SWA = CN()  # read at the end of upstream's training; missing there, which crashed it
_C.SWA.ENABLED = False

_C.SEED = 0  # added: upstream set no seed

_C.DEBUG = CN()
_C.DEBUG.DEBUG = False

config = _C

# Keys of upstream's tree that nothing here reads: a file or override may set them only to their
# defaults (refuse_unread). Key or node -> what upstream did with it, and what happens here.
_UNUSED = 'upstream never read it either'
_TV_AUG = ('upstream: its torchvision training transforms, used only with timm augmentation off; this trainer always '
           "uses timm's (AUG.TIMM_AUG)")
UNREAD = {
    'DATA_DIR': f'{_UNUSED}; images come from DATASET.ROOT',
    'DIST_BACKEND': f'{_UNUSED}; processes talk over NCCL on GPUs and gloo on CPUs',
    'GPUS': f'{_UNUSED}; run.sh -g (torchrun) sets the number of processes',
    'MULTIPROCESSING_DISTRIBUTED': f'{_UNUSED}; torchrun starts one process per GPU',
    'RANK': "upstream: the process's rank, which the launcher sets over any config value, as here",
    'VERBOSE': "upstream: printing each parameter's weight-decay choice and the pretrained layers loaded; the log "
               'here is fixed',
    'MODEL_SUMMARY': 'upstream: tensorwatch model statistics in the log, which are not supported here',
    'AMP.MEMORY_FORMAT': "upstream: 'nhwc' put the model in channels_last memory under AMP; not supported here",
    'DATASET.DATA_FORMAT': "upstream: 'tsv' enabled ImageNet-ReaL labels in testing; image folders are read here, "
                           'whatever the image files are',
    'DATASET.LABELMAP': _UNUSED,
    'DATASET.TRAIN_TSV_LIST': f'{_UNUSED}; tsv datasets are not supported',
    'DATASET.TEST_TSV_LIST': f'{_UNUSED}; tsv datasets are not supported',
    'DATASET.TARGET_SIZE': _UNUSED,
    'AUG.COLOR_JITTER': f'{_TV_AUG}; AUG.TIMM_AUG.COLOR_JITTER is read instead',
    'AUG.GRAY_SCALE': _TV_AUG,
    'AUG.GAUSSIAN_BLUR': _TV_AUG,
    'AUG.INTERPOLATION': f'{_TV_AUG}; AUG.TIMM_AUG.INTERPOLATION is read instead',
    'AUG.DROPBLOCK_LAYERS': f'{_UNUSED}; there is no DropBlock',
    'AUG.DROPBLOCK_KEEP_PROB': f'{_UNUSED}; there is no DropBlock',
    'AUG.DROPBLOCK_BLOCK_SIZE': f'{_UNUSED}; there is no DropBlock',
    'AUG.MIXCUT_AND_MIXUP': f'{_UNUSED}; AUG.MIXUP_SWITCH_PROB chooses between mixup and cutmix',
    'TRAIN.GAMMA1': f'{_UNUSED} (meant for Adam, never passed to it)',
    'TRAIN.GAMMA2': f'{_UNUSED} (meant for Adam, never passed to it)',
    'TRAIN.SHUFFLE': 'training data are always shuffled, as upstream, which never read the key',
    'FINETUNE.FINETUNE': f'{_TV_AUG} (a resize and random crop for fine-tuning)',
    'FINETUNE.USE_TRAIN_AUG': f'{_TV_AUG} (a resize and random crop for fine-tuning)',
    'FINETUNE.BASE_LR': f'{_UNUSED}; fine-tune with MODEL.PRETRAINED and the TRAIN keys',
    'FINETUNE.BATCH_SIZE': f'{_UNUSED}; fine-tune with MODEL.PRETRAINED and the TRAIN keys',
    'FINETUNE.EVAL_EVERY': f'{_UNUSED}; fine-tune with MODEL.PRETRAINED and the TRAIN keys',
    'FINETUNE.TRAIN_MODE': f'{_UNUSED}; fine-tune with MODEL.PRETRAINED and the TRAIN keys',
    'FINETUNE.FROZEN_LAYERS': f'{_UNUSED}; fine-tune with MODEL.PRETRAINED and the TRAIN keys',
    'FINETUNE.LR_SCHEDULER': f'{_UNUSED}; fine-tune with MODEL.PRETRAINED and the TRAIN keys',
    'DEBUG.DEBUG': _UNUSED,
}

# What the trainer reads under the nodes that admit new keys
TIMM_AUG_KEYS = ('USE_LOADER', 'USE_TRANSFORM', 'COLOR_JITTER', 'AUTO_AUGMENT', 'INTERPOLATION', 'RE_PROB', 'RE_MODE',
                 'RE_COUNT', 'RE_SPLIT', 'HFLIP', 'VFLIP')
# the arguments timm's create_scheduler reads (timm.scheduler.scheduler_factory.scheduler_kwargs), less
# sched_on_updates: this trainer steps the scheduler once per epoch
TIMM_SCHEDULER_ARGS = ('sched', 'epochs', 'decay_epochs', 'decay_milestones', 'warmup_epochs', 'cooldown_epochs',
                       'patience_epochs', 'decay_rate', 'min_lr', 'warmup_lr', 'warmup_prefix', 'lr_noise',
                       'lr_noise_pct', 'lr_noise_std', 'seed', 'lr_cycle_mul', 'lr_cycle_decay', 'lr_cycle_limit',
                       'lr_k_decay', 'eval_metric')


def check_open_nodes(cfg):
    """Refuse unread keys and unsupported values under LOSS, AUG.TIMM_AUG and TRAIN.LR_SCHEDULER."""
    check_known(cfg.LOSS, 'LOSS', ('LABEL_SMOOTHING', 'LOSS'))
    if cfg.LOSS.LOSS != 'softmax':
        raise ConfigError(f'LOSS.LOSS {cfg.LOSS.LOSS!r} is not supported; valid: softmax (cross-entropy)')
    check_known(cfg.AUG.TIMM_AUG, 'AUG.TIMM_AUG', TIMM_AUG_KEYS)
    if cfg.AUG.TIMM_AUG.get('RE_SPLIT'):
        raise ConfigError('AUG.TIMM_AUG.RE_SPLIT true is not supported (it only acts with augmentation splits, '
                         'which neither upstream nor this trainer uses); set it to false')
    if cfg.TRAIN.LR_SCHEDULER.get('METHOD') == 'timm':  # other methods are refused by tools/train.py
        check_known(cfg.TRAIN.LR_SCHEDULER, 'TRAIN.LR_SCHEDULER', ('METHOD', 'ARGS'))
        check_known(cfg.TRAIN.LR_SCHEDULER.ARGS, 'TRAIN.LR_SCHEDULER.ARGS', TIMM_SCHEDULER_ARGS)


def update_config(cfg, args, world_size=1, rank=0):
    """Fill the (cloned, unfrozen) default `cfg` from parsed `args` (cfg, opts) and freeze it."""
    merge_file(cfg, args.cfg)
    merge_overrides(cfg, args.opts, 'override')
    check_open_nodes(cfg)
    refuse_unread(cfg, _C, UNREAD)
    if cfg.TRAIN.SCALE_LR:
        cfg.TRAIN.LR *= world_size
    cfg.NAME = os.path.splitext(os.path.basename(args.cfg))[0] + cfg.NAME
    cfg.RANK = rank
    if cfg.TRAIN.LR_SCHEDULER.get('METHOD') == 'timm':
        cfg.TRAIN.LR_SCHEDULER.ARGS.epochs = cfg.TRAIN.END_EPOCH
    if cfg.TRAIN.OPTIMIZER == 'timm':
        cfg.TRAIN.OPTIMIZER_ARGS.lr = cfg.TRAIN.LR
    if cfg.AUG.MIXUP > 0.0 or cfg.AUG.MIXCUT > 0.0 or cfg.AUG.MIXCUT_MINMAX:
        cfg.AUG.MIXUP_PROB = 1.0
    cfg.freeze()
    return cfg
