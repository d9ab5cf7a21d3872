"""Model registry: MODEL.NAME -> builder. Both names build CvT with the config's MODEL.ISTA2."""
from common.errors import ConfigError

from .cls_cvt import build_cvt

MODELS = {'cls_cvt': build_cvt, 'cls_cvt_ista2': build_cvt}


def build_model(config):
    if config.MODEL.NAME not in MODELS:
        raise ConfigError(f'MODEL.NAME {config.MODEL.NAME!r} is not a registered model; valid: {", ".join(MODELS)}')
    return MODELS[config.MODEL.NAME](config)
