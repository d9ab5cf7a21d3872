"""Reading yacs config files the way the upstream Swin and CvT trainers do, with clearer errors."""
import difflib
import os

import yaml
from yacs.config import CfgNode

from common.errors import ConfigError, ConfigKeyError, MissingPathError
from common.ista2_options import config_defaults


def merge_file(config, path):
    """Merge the yaml file at `path` into `config`, after the files its BASE list names (relative
    to it, recursively). Unknown keys and wrong types raise, naming the file."""
    if not os.path.isfile(path):
        raise MissingPathError(f'config file {path!r} does not exist')
    with open(path) as f:
        content = yaml.safe_load(f) or {}
    for base in content.get('BASE', ['']):
        if base:
            merge_file(config, os.path.join(os.path.dirname(path), base))
    config.defrost()
    try:
        config.merge_from_file(path)
    except KeyError as e:
        raise ConfigKeyError(f'{path}: {e.args[0]}') from None
    except ValueError as e:
        raise ConfigError(f'{path}: {e}') from None


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
            raise ConfigKeyError(f'{source}: unknown config key {dotted!r}: no {name!r} under {where}'
                           + _hint(name, node) + files_only)
        node = node[name]


def check_known(node, where, known):
    """KeyError for a key of `node` (a node that admits new keys, at `where`) outside `known`: the
    code reads only those, so a mistyped one would otherwise be ignored without a word."""
    for name in node:
        if name not in known:
            raise ConfigKeyError(f'unknown config key {where}.{name}{_hint(name, known)}; the keys read there: '
                           f'{", ".join(sorted(known))}')


def merge_overrides(config, opts, source='override'):
    """Apply KEY VALUE pairs after checking every key exists."""
    opts = list(opts or [])
    if len(opts) % 2:
        raise ConfigError(f'{source}: needs KEY VALUE pairs, got {len(opts)} items: {opts}')
    for key in opts[0::2]:
        check_key(config, key, source)
    try:
        config.merge_from_list(opts)
    except ValueError as e:  # yacs: a value of the wrong type
        raise ConfigError(f'{source}: {e}') from None


_ABSENT = object()


def _at(node, dotted):
    for name in dotted.split('.'):
        if not isinstance(node, CfgNode) or name not in node:
            return _ABSENT
        node = node[name]
    return node


def _leaves(node, prefix):
    for name, value in node.items():
        if isinstance(value, CfgNode):
            yield from _leaves(value, f'{prefix}.{name}')
        else:
            yield f'{prefix}.{name}', value


def unread_leaves(defaults, unread):
    """(full key, default) for each key that `unread` names; a node stands for each key under it."""
    for dotted in unread:
        default = _at(defaults, dotted)
        if default is _ABSENT:
            raise KeyError(f'unread-key list names {dotted!r}, which the defaults lack')
        yield from _leaves(default, dotted) if isinstance(default, CfgNode) else [(dotted, default)]


def refuse_unread(config, defaults, unread):
    """ValueError naming every key of `unread` whose value in `config` differs from `defaults`.

    `unread` maps a dotted key (or node: every key under it, including keys a file added to a node
    that admits new ones) to what upstream did with it and what this trainer does instead. The
    trainer never reads these keys; they stay in the tree so that upstream's config files parse, and
    a file may set them to their defaults, but any other value would be ignored without a word."""
    problems = []
    for dotted, reason in unread.items():
        value, default = _at(config, dotted), _at(defaults, dotted)
        pairs = [(dotted, value)] if not isinstance(value, CfgNode) else _leaves(value, dotted)
        for key, leaf in pairs:
            expected = default if key == dotted else _at(defaults, key)
            if expected is _ABSENT:
                problems.append(f'{key} = {leaf!r}: {reason}. Nothing here reads it: remove it')
            elif leaf != expected:
                problems.append(f'{key} = {leaf!r}: {reason}. Nothing here reads it: remove it or set it back to '
                                f'{expected!r}')
    if problems:
        raise ConfigError('config keys this trainer does not read are set to values other than their defaults:\n  '
                         + '\n  '.join(problems))


def ista2_node(omit=()):
    """MODEL.ISTA2: every ISTA2 option (common/ista2_options.py) but those named in `omit`, as an
    UPPER_CASE key with the option's default (ISTA2 off); the reference's keys and defaults."""
    return CfgNode(config_defaults(omit))
