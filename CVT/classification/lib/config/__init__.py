from .default import config, update_config

__all__ = ['config', 'update_config']
