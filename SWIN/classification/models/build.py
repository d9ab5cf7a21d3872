"""Build the model a Swin config describes."""
from .swin_transformer import SwinTransformer


def ista2_args(ista2, num_stages):
    """MODEL.ISTA2 -> one dict of ISTA2 keywords per stage; REP_TKN_RATIO, when set, lists one ratio per stage."""
    ratios = ista2.REP_TKN_RATIO
    if ratios is not None and (not isinstance(ratios, (list, tuple)) or len(ratios) != num_stages):
        raise ValueError(f'MODEL.ISTA2.REP_TKN_RATIO={ratios!r}: give one ratio per stage ({num_stages})')
    common = dict(qk_norm=ista2.QK_NORM, v_norm=ista2.V_NORM, norm_type=ista2.NORM_TYPE,
                  ista2_method=ista2.ISTA2_METHOD, attn_inter_topk=ista2.ATTN_INTER_TOPK,
                  rep_tkn_type=ista2.REP_TKN_TYPE, cls_tkn_idx=ista2.CLS_TKN_IDX, bg_tkn_idx=ista2.BG_TKN_IDX,
                  bs_ratio=ista2.BS_RATIO, across_gpus=ista2.ACROSS_GPUS)
    return [dict(common, rep_tkn_ratio=None if ratios is None else ratios[i]) for i in range(num_stages)]


def build_model(config):
    if config.MODEL.TYPE != 'swin':
        raise ValueError(f'MODEL.TYPE {config.MODEL.TYPE!r} is not supported here; valid: swin')
    s = config.MODEL.SWIN
    return SwinTransformer(
        img_size=config.DATA.IMG_SIZE, patch_size=s.PATCH_SIZE, in_chans=s.IN_CHANS,
        num_classes=config.MODEL.NUM_CLASSES, embed_dim=s.EMBED_DIM, depths=s.DEPTHS, num_heads=s.NUM_HEADS,
        window_size=s.WINDOW_SIZE, mlp_ratio=s.MLP_RATIO, qkv_bias=s.QKV_BIAS, qk_scale=s.QK_SCALE,
        drop_rate=config.MODEL.DROP_RATE, drop_path_rate=config.MODEL.DROP_PATH_RATE, ape=s.APE,
        patch_norm=s.PATCH_NORM, use_checkpoint=config.TRAIN.USE_CHECKPOINT,
        fused_window_process=config.FUSED_WINDOW_PROCESS, ista2_args=ista2_args(config.MODEL.ISTA2, len(s.DEPTHS)))
