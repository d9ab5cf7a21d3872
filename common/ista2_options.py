"""The ISTA2 options, defined once: name, default, one-line doc, valid values and the rules between them.

Nothing else lists them. Their readers:

- ``common.ista2.ISTA2(dim, num_heads, ..., **options)`` checks its keyword options with `validate` and keeps
  each as an attribute of the same name. PVT passes its config's ``ista2_args`` dict there as it is.
- Swin and CvT build their yacs node MODEL.ISTA2 from `config_defaults` (UPPER_CASE keys, the same defaults;
  CvT omits CLS_TKN_IDX and BG_TKN_IDX, which its model derives from the class token) and turn it back into
  ISTA2 keywords with `stage_options`.

Per-stage values: a backbone names the options its node holds as a list with one value per stage (Swin:
REP_TKN_RATIO, as in the reference); every other option holds one value for all stages. This is not offered
for every option because yacs refuses a list in place of a default that is not None.
"""
import dataclasses
import difflib
from collections.abc import Callable
from typing import Any

from common.errors import ConfigError, UserError


class UnknownOptionError(UserError, TypeError):
    """An option name ISTA2 does not have."""


NORM_TYPES = ('rmsnorm', 'layernorm')
METHODS = (None, 'v')
REP_TOKEN_TYPES = (None, 'cls', 'cls+bg', 'mean', 'random')
EVAL_ALIGNS = ('batch', 'bank', 'off')


def require(ok, option, value, valid):
    """ValueError naming `option`, its `value` and the `valid` values, unless `ok`."""
    if not ok:
        raise ConfigError(f'ISTA2: invalid {option}={value!r}; valid: {valid}')


@dataclasses.dataclass(frozen=True)
class Option:
    """One option. ``check(name, value, earlier)`` returns the value to use, or raises through `require`;
    ``earlier`` maps the options before this one in OPTIONS to their checked values."""
    default: Any
    doc: str
    check: Callable[[str, Any, dict], Any]


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _ratio(name, value):
    ok = isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 1
    require(ok, name, value, 'a number in (0, 1]')
    return float(value)


def _index(name, value, rep_tkn_type):
    require(_is_int(value) and value >= 0, name, value,
            f'a token index (int >= 0), required by rep_tkn_type={rep_tkn_type!r}')
    return value


def _flag(name, value, earlier):
    require(isinstance(value, bool), name, value, 'True or False')
    return value


def _one_of(choices):
    def check(name, value, earlier):
        require(value in choices, name, value, choices)
        return value
    return check


def _topk(name, value, earlier):
    require(_is_int(value) and value >= 0, name, value, 'an int >= 0')
    require((earlier['ista2_method'] is None) == (value == 0), name, value,
            "0 when ista2_method is None, >= 1 when ista2_method='v'")
    return value


def _rep_tkn_ratio(name, value, earlier):
    if earlier['rep_tkn_type'] == 'random':
        return _ratio(name, value)
    require(value is None, name, value, "None unless rep_tkn_type='random'")
    return value


def _cls_tkn_idx(name, value, earlier):
    if earlier['rep_tkn_type'] in ('cls', 'cls+bg'):
        return _index(name, value, earlier['rep_tkn_type'])
    require(value is None, name, value, "None unless rep_tkn_type is 'cls' or 'cls+bg'")
    return value


def _bg_tkn_idx(name, value, earlier):
    if earlier['rep_tkn_type'] != 'cls+bg':
        require(value is None, name, value, "None unless rep_tkn_type='cls+bg'")
        return value
    value = _index(name, value, 'cls+bg')
    require(value != earlier['cls_tkn_idx'], name, value, f'an index other than cls_tkn_idx={earlier["cls_tkn_idx"]}')
    return value


def _optional_ratio(name, value, earlier):
    return None if value is None else _ratio(name, value)


def _eval_align(name, value, earlier):
    require(value in EVAL_ALIGNS, name, value, EVAL_ALIGNS)
    require(value != 'bank' or earlier['ista2_method'] == 'v', name, value,
            f"{EVAL_ALIGNS} ('bank' needs ista2_method='v')")
    return value


def _bank_size(name, value, earlier):
    require(_is_int(value) and value >= 1, name, value, 'an int >= 1 (representative tokens kept per layer)')
    return value


# In checking order: a rule between options sits with the later one.
OPTIONS = {
    'qk_norm': Option(False, 'normalise q and k (norm_type) over the full width, before the head split', _flag),
    'v_norm': Option(False, 'normalise v (norm_type) over the full width, before alignment and attention', _flag),
    'norm_type': Option('rmsnorm', f'the norm of qk_norm and v_norm, one of {NORM_TYPES}', _one_of(NORM_TYPES)),
    'ista2_method': Option(None, "None: plain attention; 'v': align each value token across images",
                           _one_of(METHODS)),
    'attn_inter_topk': Option(0, 'candidates each value token mixes with: 0 without a method, >= 1 with one', _topk),
    'rep_tkn_type': Option(None, f"an image's representative value tokens, one of {REP_TOKEN_TYPES} (None: all)",
                           _one_of(REP_TOKEN_TYPES)),
    'rep_tkn_ratio': Option(None, "with rep_tkn_type='random': the share of token positions drawn, in (0, 1]",
                            _rep_tkn_ratio),
    'cls_tkn_idx': Option(None, "with rep_tkn_type 'cls' or 'cls+bg': the class token's index", _cls_tkn_idx),
    'bg_tkn_idx': Option(None, "with rep_tkn_type='cls+bg': the background token's index (it attends where the "
                               'class token does not)', _bg_tkn_idx),
    'bs_ratio': Option(None, 'the share in (0, 1] of the other images (first in pool order) that offer candidates; '
                             'None: all', _optional_ratio),
    'across_gpus': Option(False, "take candidates from every rank's batch (equal local batches needed)", _flag),
    'eval_align': Option('batch', "what evaluation aligns against: 'batch' (the other images of the batch), 'bank' "
                                  "(the layer's saved bank of training representatives) or 'off' (no alignment)",
                         _eval_align),
    'bank_size': Option(256, "with eval_align='bank': the representative tokens the bank keeps (a FIFO queue of "
                             "the latest training batches', all ranks')", _bank_size),
}


def validate(options):
    """The keyword options given to ISTA2 (name -> value) -> every option's checked value, the defaults filling
    in, in OPTIONS order. An unknown name is a TypeError listing the valid ones."""
    unknown = [name for name in options if name not in OPTIONS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(OPTIONS), n=1)
        hint = f' (did you mean {close[0]!r}?)' if close else ''
        raise UnknownOptionError(f'ISTA2: unknown option {", ".join(map(repr, unknown))}{hint}; '
                                 f'valid: {", ".join(OPTIONS)}')
    checked = {}
    for name, option in OPTIONS.items():
        checked[name] = option.check(name, options.get(name, option.default), checked)
    return checked


def config_defaults(omit=()):
    """{UPPER_CASE name: default} for every option but those named in `omit`: the keys of MODEL.ISTA2."""
    return {name.upper(): option.default for name, option in OPTIONS.items() if name not in omit}


def stage_options(node, num_stages, per_stage=()):
    """MODEL.ISTA2 (a mapping with `config_defaults`' keys) -> ISTA2 keywords, one dict per stage.

    The options named in `per_stage` hold a list with one value per stage, or None for every stage. The
    names are checked where the keywords reach ISTA2."""
    options = {key.lower(): value for key, value in node.items()}
    for name in per_stage:
        values = options[name]
        if values is not None and (not isinstance(values, list | tuple) or len(values) != num_stages):
            raise ConfigError(f'MODEL.ISTA2.{name.upper()}={values!r}: give one value per stage ({num_stages})')
    return [{name: value[i] if name in per_stage and value is not None else value for name, value in options.items()}
            for i in range(num_stages)]
