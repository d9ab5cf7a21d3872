"""Reading yacs config files the way the upstream Swin and CvT trainers do, with clearer errors."""
import difflib
import os

import yaml
from yacs.config import CfgNode


def merge_file(config, path):
    """Merge the yaml file at `path` into `config`, after the files its BASE list names (relative
    to it, recursively). Unknown keys and wrong types raise, naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'config file {path!r} does not exist')
    with open(path) as f:
        content = yaml.safe_load(f) or {}
    for base in content.get('BASE', ['']):
        if base:
            merge_file(config, os.path.join(os.path.dirname(path), base))
    config.defrost()
    try:
        config.merge_from_file(path)
    except KeyError as e:
        raise KeyError(f'{path}: {e.args[0]}') from None
    except ValueError as e:
        raise ValueError(f'{path}: {e}') from None


def _hint(name, known):
    close = difflib.get_close_matches(name, list(known), n=1)
    return f' (did you mean {close[0]!r}?)' if close else ''


def check_key(config, dotted, source='override'):
    """KeyError naming `dotted` and the closest existing key, unless the config has it. yacs adds
    no key from a KEY VALUE list, not even under a node that admits new keys from files."""
    node, parts = config, dotted.split('.')
    for i, name in enumerate(parts):
        if not isinstance(node, CfgNode):
            return
        if name not in node:
            where = '.'.join(parts[:i]) or 'the top level'
            files_only = '; new keys here can only come from a config file' if node.is_new_allowed() else ''
            raise KeyError(f'{source}: unknown config key {dotted!r}: no {name!r} under {where}'
                           + _hint(name, node) + files_only)
        node = node[name]


def check_known(node, where, known):
    """KeyError for a key of `node` (a node that admits new keys, at `where`) outside `known`: the
    code reads only those, so a mistyped one would otherwise be ignored without a word."""
    for name in node:
        if name not in known:
            raise KeyError(f'unknown config key {where}.{name}{_hint(name, known)}; the keys read there: '
                           f'{", ".join(sorted(known))}')


def merge_overrides(config, opts, source='override'):
    """Apply KEY VALUE pairs after checking every key exists."""
    opts = list(opts or [])
    if len(opts) % 2:
        raise ValueError(f'{source}: needs KEY VALUE pairs, got {len(opts)} items: {opts}')
    for key in opts[0::2]:
        check_key(config, key, source)
    config.merge_from_list(opts)


def ista2_node(token_indices):
    """MODEL.ISTA2 with the reference's keys and defaults (ISTA2 off). Swin's tree also has
    CLS_TKN_IDX and BG_TKN_IDX (token_indices=True); CvT derives them from its class token."""
    node = CfgNode()
    node.QK_NORM = False
    node.V_NORM = False
    node.NORM_TYPE = 'rmsnorm'
    node.ISTA2_METHOD = None
    node.ATTN_INTER_TOPK = 0
    node.REP_TKN_TYPE = None
    node.REP_TKN_RATIO = None
    if token_indices:
        node.CLS_TKN_IDX = None
        node.BG_TKN_IDX = None
    node.BS_RATIO = None
    node.ACROSS_GPUS = False
    return node
