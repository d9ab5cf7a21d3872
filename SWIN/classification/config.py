"""The Swin trainer's yacs config: the upstream tree and defaults, plus MODEL.ISTA2.

Precedence: defaults < the --cfg file (after the files its BASE list names) < --opts KEY VALUE
pairs < the dedicated command-line flags. The run's folder is OUTPUT/MODEL.NAME/TAG.
"""
import os

from yacs.config import CfgNode as CN

from common.yacs_files import ista2_node, merge_file, merge_overrides, refuse_unread

_C = CN()
_C.BASE = ['']

_C.DATA = CN()
_C.DATA.BATCH_SIZE = 128  # per process
_C.DATA.DATA_PATH = ''
_C.DATA.DATASET = 'imagenet'
_C.DATA.IMG_SIZE = 224
_C.DATA.INTERPOLATION = 'bicubic'
_C.DATA.ZIP_MODE = False
_C.DATA.CACHE_MODE = 'part'
_C.DATA.PIN_MEMORY = True
_C.DATA.IN_MEMORY = False  # added: decode the image folders once into memory (common/data.py)
_C.DATA.NUM_WORKERS = 8
_C.DATA.MASK_PATCH_SIZE = 32
_C.DATA.MASK_RATIO = 0.6

_C.MODEL = CN()
_C.MODEL.TYPE = 'swin'
_C.MODEL.NAME = 'swin_tiny_patch4_window7_224'
_C.MODEL.PRETRAINED = ''
_C.MODEL.RESUME = ''
_C.MODEL.NUM_CLASSES = 1000  # replaced by the number of class folders in the training set
_C.MODEL.DROP_RATE = 0.0
_C.MODEL.DROP_PATH_RATE = 0.1
_C.MODEL.LABEL_SMOOTHING = 0.1


def ista2_defaults():
    """MODEL.ISTA2, from the ISTA2 option schema: every option (REP_TKN_RATIO, with 'random': one ratio per stage)."""
    return ista2_node()


_C.MODEL.ISTA2 = ista2_defaults()


def _backbone(qkv_bias=True, qk_scale=True):
    """The keys upstream's model types share, with Swin-T's values."""
    node = CN()
    node.PATCH_SIZE = 4
    node.IN_CHANS = 3
    node.EMBED_DIM = 96
    node.DEPTHS = [2, 2, 6, 2]
    node.NUM_HEADS = [3, 6, 12, 24]
    node.WINDOW_SIZE = 7
    node.MLP_RATIO = 4.
    if qkv_bias:
        node.QKV_BIAS = True
    if qk_scale:
        node.QK_SCALE = None
    node.APE = False
    node.PATCH_NORM = True
    return node


_C.MODEL.SWIN = _backbone()
# The nodes of upstream's other model types, kept so that their config files still parse;
# only MODEL.TYPE 'swin' can be built here.
_C.MODEL.SWINV2 = _backbone(qk_scale=False)
_C.MODEL.SWINV2.PRETRAINED_WINDOW_SIZES = [0, 0, 0, 0]
_C.MODEL.SWIN_MOE = _backbone()
_C.MODEL.SWIN_MOE.MLP_FC2_BIAS = True
_C.MODEL.SWIN_MOE.INIT_STD = 0.02
_C.MODEL.SWIN_MOE.PRETRAINED_WINDOW_SIZES = [0, 0, 0, 0]
_C.MODEL.SWIN_MOE.MOE_BLOCKS = [[-1], [-1], [-1], [-1]]
_C.MODEL.SWIN_MOE.NUM_LOCAL_EXPERTS = 1
_C.MODEL.SWIN_MOE.TOP_VALUE = 1
_C.MODEL.SWIN_MOE.CAPACITY_FACTOR = 1.25
_C.MODEL.SWIN_MOE.COSINE_ROUTER = False
_C.MODEL.SWIN_MOE.NORMALIZE_GATE = False
_C.MODEL.SWIN_MOE.USE_BPR = True
_C.MODEL.SWIN_MOE.IS_GSHARD_LOSS = False
_C.MODEL.SWIN_MOE.GATE_NOISE = 1.0
_C.MODEL.SWIN_MOE.COSINE_ROUTER_DIM = 256
_C.MODEL.SWIN_MOE.COSINE_ROUTER_INIT_T = 0.5
_C.MODEL.SWIN_MOE.MOE_DROP = 0.0
_C.MODEL.SWIN_MOE.AUX_LOSS_WEIGHT = 0.01

_C.MODEL.SWIN_MLP = _backbone(qkv_bias=False, qk_scale=False)

_C.MODEL.SIMMIM = CN()
_C.MODEL.SIMMIM.NORM_TARGET = CN()
_C.MODEL.SIMMIM.NORM_TARGET.ENABLE = False
_C.MODEL.SIMMIM.NORM_TARGET.PATCH_SIZE = 47

_C.TRAIN = CN()
_C.TRAIN.START_EPOCH = 0
_C.TRAIN.EPOCHS = 300
_C.TRAIN.WARMUP_EPOCHS = 20
_C.TRAIN.WEIGHT_DECAY = 0.05
_C.TRAIN.BASE_LR = 5e-4  # for a total batch of 512; scaled linearly
_C.TRAIN.WARMUP_LR = 5e-7
_C.TRAIN.MIN_LR = 5e-6
_C.TRAIN.CLIP_GRAD = 5.0
_C.TRAIN.AUTO_RESUME = True
_C.TRAIN.ACCUMULATION_STEPS = 1
_C.TRAIN.USE_CHECKPOINT = False
_C.TRAIN.LAYER_DECAY = 1.0
_C.TRAIN.LR_SCHEDULER = CN()
_C.TRAIN.LR_SCHEDULER.NAME = 'cosine'
_C.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 30
_C.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.1
_C.TRAIN.LR_SCHEDULER.WARMUP_PREFIX = True
_C.TRAIN.LR_SCHEDULER.GAMMA = 0.1
_C.TRAIN.LR_SCHEDULER.MULTISTEPS = []
_C.TRAIN.OPTIMIZER = CN()
_C.TRAIN.OPTIMIZER.NAME = 'adamw'
_C.TRAIN.OPTIMIZER.EPS = 1e-8
_C.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)
_C.TRAIN.OPTIMIZER.MOMENTUM = 0.9
_C.TRAIN.MOE = CN()
_C.TRAIN.MOE.SAVE_MASTER = False

_C.AUG = CN()
_C.AUG.COLOR_JITTER = 0.4
_C.AUG.AUTO_AUGMENT = 'rand-m9-mstd0.5-inc1'  # 'none' turns it off
_C.AUG.REPROB = 0.25
_C.AUG.REMODE = 'pixel'
_C.AUG.RECOUNT = 1
_C.AUG.MIXUP = 0.8
_C.AUG.CUTMIX = 1.0
_C.AUG.CUTMIX_MINMAX = None
_C.AUG.MIXUP_PROB = 1.0
_C.AUG.MIXUP_SWITCH_PROB = 0.5
_C.AUG.MIXUP_MODE = 'batch'

_C.TEST = CN()
_C.TEST.CROP = True
_C.TEST.SEQUENTIAL = False
_C.TEST.SHUFFLE = False  # upstream's switch; True is the same as TEST.PROTOCOL shuffled
_C.TEST.PROTOCOL = 'class-order'  # added: class-order, shuffled or batch-1 (common/trainer.py)

_C.ENABLE_AMP = False
_C.AMP_ENABLE = True
_C.AMP_OPT_LEVEL = ''
_C.OUTPUT = ''
_C.TAG = 'default'
_C.SAVE_FREQ = 1
_C.PRINT_FREQ = 10
_C.SEED = 0
_C.EVAL_MODE = False
_C.THROUGHPUT_MODE = False
_C.LOCAL_RANK = 0
_C.FUSED_WINDOW_PROCESS = False
_C.FUSED_LAYERNORM = False

# Keys of upstream's tree that nothing here reads: a file or --opts may set them only to their
# defaults (refuse_unread). Key or node -> what upstream did with it, and what happens here.
_ONLY_SWIN = 'only MODEL.TYPE swin is built here'
UNREAD = {
    'DATA.CACHE_MODE': 'upstream: how zipped ImageNet (--zip) was cached in memory; zip mode is not supported here',
    'DATA.MASK_PATCH_SIZE': 'upstream: the mask patch size of SimMIM pre-training, which is not supported here',
    'DATA.MASK_RATIO': 'upstream: the masked fraction of SimMIM pre-training, which is not supported here',
    'MODEL.SWINV2': f'upstream: the Swin V2 model (MODEL.TYPE swinv2); {_ONLY_SWIN}',
    'MODEL.SWIN_MOE': f'upstream: the Swin mixture-of-experts model (MODEL.TYPE swin_moe); {_ONLY_SWIN}',
    'MODEL.SWIN_MLP': f'upstream: the Swin MLP model (MODEL.TYPE swin_mlp); {_ONLY_SWIN}',
    'MODEL.SIMMIM': 'upstream: target normalisation in SimMIM pre-training, which is not supported here',
    'TRAIN.MOE.SAVE_MASTER': f'upstream: how the Swin mixture-of-experts trainer saved experts; {_ONLY_SWIN}',
    'AMP_OPT_LEVEL': 'upstream: the Apex AMP level, which only printed that Apex is deprecated; AMP_ENABLE (or '
                     '--disable_amp) chooses mixed precision',
    'LOCAL_RANK': "upstream: the process's GPU, which the launcher sets (LOCAL_RANK, --local_rank) over any config "
                  'value, as here',
}


def load_config(path, opts=()):
    """Defaults merged with the yaml file at `path` and the KEY VALUE list `opts` (not frozen)."""
    config = _C.clone()
    merge_file(config, path)
    merge_overrides(config, opts, '--opts')
    refuse_unread(config, _C, UNREAD)
    return config


def get_config(args):
    """The frozen config for parsed command-line `args` (see main.parse_option)."""
    config = load_config(args.cfg, args.opts or ())
    flags = {'batch_size': 'DATA.BATCH_SIZE', 'data_path': 'DATA.DATA_PATH', 'pretrained': 'MODEL.PRETRAINED',
             'resume': 'MODEL.RESUME', 'accumulation_steps': 'TRAIN.ACCUMULATION_STEPS', 'output': 'OUTPUT',
             'tag': 'TAG', 'optim': 'TRAIN.OPTIMIZER.NAME'}
    for flag, key in flags.items():
        value = getattr(args, flag, None)
        if value is not None:
            node, leaf = _node(config, key)
            setattr(node, leaf, value)
    if args.zip:
        config.DATA.ZIP_MODE = True
    if args.use_checkpoint:
        config.TRAIN.USE_CHECKPOINT = True
    if args.disable_amp or args.amp_opt_level == 'O0':
        config.AMP_ENABLE = False
    config.EVAL_MODE = config.EVAL_MODE or args.eval
    config.THROUGHPUT_MODE = config.THROUGHPUT_MODE or args.throughput
    config.FUSED_WINDOW_PROCESS = config.FUSED_WINDOW_PROCESS or args.fused_window_process
    config.FUSED_LAYERNORM = config.FUSED_LAYERNORM or args.fused_layernorm
    config.LOCAL_RANK = int(os.environ.get('LOCAL_RANK', args.local_rank or 0))
    config.OUTPUT = os.path.join(config.OUTPUT, config.MODEL.NAME, config.TAG)
    config.freeze()
    return config


def _node(config, dotted):
    *path, leaf = dotted.split('.')
    for name in path:
        config = getattr(config, name)
    return config, leaf
