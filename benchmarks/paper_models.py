"""The paper's eight models, each built from its config file through its own backbone's config system."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# baseline config name -> ISTA2 config name, in the order of the paper's table
PAIRS = {'pvt_v2_b0': 'pvt_v2_b0_ista2', 'pvt_v2_b2': 'pvt_v2_b2_ista2',
         'swin_tiny_patch4_window7_224': 'swin_tiny_ista2_patch4_window7_224',
         'cvt-13-224x224': 'cvt-13-ista2-224x224'}
TITLES = {'pvt_v2_b0': 'PVTv2-B0', 'pvt_v2_b2': 'PVTv2-B2', 'swin_tiny_patch4_window7_224': 'Swin-T',
          'cvt-13-224x224': 'CvT-13'}


def build(name):
    """The model a config file describes, as its trainer would build it (1000 classes)."""
    if name.startswith('pvt_v2'):
        from mmengine.config import Config
        sys.path.insert(0, os.path.join(ROOT, 'PVT', 'classification'))
        from pvt_v2 import create_model
        cfg = Config.fromfile(os.path.join(ROOT, 'PVT', 'classification', 'configs', 'pvt_v2_ista2', f'{name}.py'))
        cfg = cfg.to_dict()['cfg']
        return create_model(cfg['model'], drop_path_rate=cfg['drop_path'], ista2_args=cfg['ista2_args'])
    if name.startswith('swin'):
        sys.path.insert(0, os.path.join(ROOT, 'SWIN', 'classification'))
        from config import load_config
        from models import build_model
        return build_model(load_config(os.path.join(ROOT, 'SWIN', 'classification', 'configs', 'swin_ista2',
                                                    f'{name}.yaml')))
    if name.startswith('cvt'):
        from argparse import Namespace
        sys.path.insert(0, os.path.join(ROOT, 'CVT', 'classification'))
        from lib.config import config, update_config
        from lib.models import build_model
        path = os.path.join(ROOT, 'CVT', 'classification', 'experiments', 'imagenet', 'cvt_ista2', f'{name}.yaml')
        return build_model(update_config(config.clone(), Namespace(cfg=path, opts=[])))
    raise ValueError(f'unknown model {name!r}; valid: {", ".join(sorted(set(PAIRS) | set(PAIRS.values())))}')
