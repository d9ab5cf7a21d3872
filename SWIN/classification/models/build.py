"""Build the model a Swin config describes."""
from common.errors import ConfigError
from common.ista2_options import stage_options

from .swin_transformer import SwinTransformer


def build_model(config):
    if config.MODEL.TYPE != 'swin':
        raise ConfigError(f'MODEL.TYPE {config.MODEL.TYPE!r} is not supported here; valid: swin')
    s = config.MODEL.SWIN
    # REP_TKN_RATIO, with rep_tkn_type 'random', lists one ratio per stage
    ista2_args = stage_options(config.MODEL.ISTA2, len(s.DEPTHS), per_stage=('rep_tkn_ratio',))
    return SwinTransformer(
        img_size=config.DATA.IMG_SIZE, patch_size=s.PATCH_SIZE, in_chans=s.IN_CHANS,
        num_classes=config.MODEL.NUM_CLASSES, embed_dim=s.EMBED_DIM, depths=s.DEPTHS, num_heads=s.NUM_HEADS,
        window_size=s.WINDOW_SIZE, mlp_ratio=s.MLP_RATIO, qkv_bias=s.QKV_BIAS, qk_scale=s.QK_SCALE,
        drop_rate=config.MODEL.DROP_RATE, drop_path_rate=config.MODEL.DROP_PATH_RATE, ape=s.APE,
        patch_norm=s.PATCH_NORM, use_checkpoint=config.TRAIN.USE_CHECKPOINT,
        fused_window_process=config.FUSED_WINDOW_PROCESS, ista2_args=ista2_args)
