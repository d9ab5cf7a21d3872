"""ISTA2 in timm's vision transformers: `patch_timm` and the registered ``<name>_ista2`` models.

    from common.timm_ista2 import patch_timm
    model = patch_timm(timm.create_model('deit_tiny_patch16_224'), qk_norm=True, v_norm=True,
                       ista2_method='v', attn_inter_topk=1, rep_tkn_type='mean')

`patch_timm` turns the attention module of every block into ISTA2 attention, in place: each module keeps
its parameters, buffers, attribute values and state_dict keys, gains a child ``ista2`` (so the new norm
weights are ``<block>.attn.ista2.{q,k,v}_norm_layer.weight``, as in our PVT, Swin and CvT backbones) and
computes q, k and v with its own projections before handing them to `common.ista2.ISTA2`. Its class
becomes a subclass of the timm class (defined here) whose ``forward`` does that. With the options off
(the defaults: no norms, ``ista2_method=None``) the patched model computes what the timm model computes.

Importing this module also registers ``<name>_ista2`` in timm's model registry for every name in
`REGISTERED`, with the published options as defaults, so that ``timm.create_model``, timm's ``train.py``
and ``validate.py`` build ISTA2 models by name (options through ``--model-kwargs``); timm's scripts see the
registration when started through this module:

    python -m common.timm_ista2 path/to/timm/train.py <data> --model deit_tiny_patch16_224_ista2 ...

See docs/method.md, "ISTA2 in your own model".
"""
import inspect
import os
import re
import runpy
import sys
from collections import deque

import timm
import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from timm.models import (
    DefaultCfg,
    beit,
    deit,
    eva,
    get_arch_pretrained_cfgs,
    pvt_v2,
    register_model,
    split_model_name_tag,
    swin_transformer,
    twins,
    vision_transformer,
)
from torch import nn

from common.errors import ConfigError, UserError
from common.ista2 import ISTA2
from common.ista2_options import OPTIONS

__all__ = ['PUBLISHED', 'REGISTERED', 'SUPPORTED', 'UnsupportedModelError', 'create_ista2_model', 'patch_timm']

# the paper's settings: the defaults of the registered `<name>_ista2` models
PUBLISHED = dict(qk_norm=True, v_norm=True, ista2_method='v', attn_inter_topk=1, rep_tkn_type='mean')
# seeds the 'cls+bg' background token, as CvT's BG_TOKEN_SEED does for its stages
BG_TOKEN_SEED = 0


class UnsupportedModelError(UserError, TypeError):
    """A model (or one of its blocks) whose attention patch_timm has no adapter for."""


def _pad_prefix(bias, offset: int):
    """A (.., h, N, N) logit bias -> (h, N+offset, N+offset), zero for `offset` leading (background) tokens."""
    bias = bias.reshape(bias.shape[-3:])
    return F.pad(bias, (offset, 0, offset, 0)) if offset else bias


class _Patched:
    """Marks a patched attention module. Attributes set by patch_timm: ``ista2`` (the ISTA2 module) and
    ``ista2_prefix`` (tokens put before the model's own, 1 with the 'cls+bg' background token, else 0).

    The adapters' code is TorchScript (timm's tests script models): a timm attribute that one configuration sets
    to None is tested with ``is None`` (or ``hasattr`` where a timm release lacks it), which TorchScript decides
    while it compiles, and sizes are read from tensors by index, which torch.fx can also trace."""

    def _fused_qkv(self, x):
        """q, k, v (B, N, h*d) each, from a BEiT/EVA-style fused qkv projection with its separate q/v biases."""
        if self.q_bias is None:
            qkv = self.qkv(x)
        else:
            bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
            qkv = self.qkv(x) + bias if self.qkv_bias_separate else F.linear(x, self.qkv.weight, bias)
        return qkv.chunk(3, dim=-1)

    def _reduced(self, x, size: list[int]):
        """PVTv2 / Twins spatial reduction: x (B, H*W, C) -> the tokens keys and values come from."""
        if hasattr(self, 'pool'):  # PVTv2
            if self.pool is not None:  # 'linear': pool to 7x7, 1x1 conv, norm, GELU
                grid = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], size[0], size[1])
                return self.act(self.norm(self.sr(self.pool(grid)).flatten(2).transpose(1, 2)))
        if self.sr is not None:
            grid = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], size[0], size[1])
            return self.norm(self.sr(grid).flatten(2).transpose(1, 2))
        return x


def _refuse_masking(attention: str, attn_mask: torch.Tensor | None, is_causal: bool):
    """timm 1.0.11 calls ViT attention with x alone; later releases (1.0.31 here) pass attn_mask and is_causal to
    ViT and EVA attention, set only for NaFlex token padding and causal models. The mean representative token
    would average over the padding, and ISTA2 aligns whole images, so both stay at their defaults. attention:
    the class name. A call in torch.fx graphs (where the mask is an input of the graph): the check runs then."""
    if attn_mask is not None or is_causal:
        given = 'attn_mask' if attn_mask is not None else 'is_causal=True'
        raise UnsupportedModelError(f'patch_timm: {attention} called with {given} (token padding or causal '
                                    f'attention), which ISTA2 does not support')


torch.fx.wrap('_refuse_masking')


class ViTAttention(_Patched, vision_transformer.Attention):
    """timm.models.vision_transformer.Attention (ViT, DeiT, DeiT-III, ...): fused qkv, timm's optional per-head
    q_norm/k_norm (applied before ISTA2's own norms) and, from timm 1.0.31 on, its optional norm and sigmoid
    gate of the attention output (scale_norm, gated)."""

    def forward(self, x, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        _refuse_masking('ViTAttention', attn_mask, is_causal)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        B, N, h = x.shape[0], x.shape[1], self.num_heads
        q, k = self.q_norm(q.view(B, N, h, -1)).flatten(-2), self.k_norm(k.view(B, N, h, -1)).flatten(-2)
        out = self.ista2(q, k, v)
        if hasattr(self, 'norm'):
            out = self.norm(out)
        if hasattr(self, 'gate'):
            if self.gate is not None:
                out = out * self.gate(x).sigmoid()
        return self.proj_drop(self.proj(out))


class PvtV2Attention(_Patched, pvt_v2.Attention):
    """timm.models.pvt_v2.Attention: keys and values from the spatially reduced tokens (conv or pooling)."""

    def forward(self, x, feat_size: list[int]):
        k, v = self.kv(self._reduced(x, feat_size)).chunk(2, dim=-1)
        return self.proj_drop(self.proj(self.ista2(self.q(x), k, v)))


class SwinWindowAttention(_Patched, swin_transformer.WindowAttention):
    """timm.models.swin_transformer.WindowAttention: rows are windows; each image is aligned over all of
    its windows (``ista2_images``: the images in the batch, recorded by a pre-hook on the block)."""
    ista2_images: int | None  # for TorchScript: None between calls

    def forward(self, x, mask: torch.Tensor | None = None):
        images = self.ista2_images
        self.ista2_images = None
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        bias = self._get_rel_pos_bias()[0]
        return self.proj_drop(self.proj(self.ista2(q, k, v, real_b=images, relative_position_bias=bias, mask=mask)))


def _record_images(block, args: tuple[torch.Tensor]) -> None:
    """Forward pre-hook on a Swin block (called with its input (B, H, W, C) alone): the attention needs B."""
    block.attn.ista2_images = args[0].shape[0]


class EvaAttention(_Patched, eva.EvaAttention):
    """timm.models.eva.EvaAttention (EVA, EVA-02): fused or separate q/k/v projections, rotary position
    embedding on q and k of the patch tokens, optional norm before the output projection."""

    def forward(self, x, rope: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False):
        _refuse_masking('EvaAttention', attn_mask, is_causal)
        if self.qkv is not None:
            q, k, v = self._fused_qkv(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if rope is not None:
            q, k = self._rotate(q, rope).type_as(v), self._rotate(k, rope).type_as(v)
        return self.proj_drop(self.proj(self.norm(self.ista2(q, k, v))))

    def _rotate(self, t, rope):
        """The rotary embedding on the tokens after the prefix ones (class, register, background)."""
        prefix = self.num_prefix_tokens + self.ista2_prefix
        patches = t[:, prefix:]
        # sizes read from the tensor, not unflatten: a TorchScript-based ONNX export then keeps the batch size
        # dynamic (docs/design.md)
        heads = patches.view(patches.shape[0], patches.shape[1], self.num_heads, -1).transpose(1, 2)  # (B, h, N', d)
        rotated = apply_rot_embed_cat(heads, rope).transpose(1, 2).flatten(-2)
        return torch.cat([t[:, :prefix], rotated], dim=1)


class BeitAttention(_Patched, beit.Attention):
    """timm.models.beit.Attention (BEiT, BEiT v2): fused qkv, relative position bias (own and/or shared)."""

    def forward(self, x, shared_rel_pos_bias: torch.Tensor | None = None):
        q, k, v = self._fused_qkv(x)
        bias: torch.Tensor | None = None
        if self.relative_position_bias_table is not None:
            bias = self._get_rel_pos_bias()
        if shared_rel_pos_bias is not None:
            bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
        if bias is not None:
            bias = _pad_prefix(bias, self.ista2_prefix)
        return self.proj_drop(self.proj(self.ista2(q, k, v, relative_position_bias=bias)))


class TwinsLocallyGroupedAttn(_Patched, twins.LocallyGroupedAttn):
    """timm.models.twins.LocallyGroupedAttn: attention inside ws x ws windows of the (zero-padded) map; each
    image is aligned over all of its windows."""

    def forward(self, x, size: tuple[int, int]):
        B, N, C = x.shape
        H, W = size
        ws = self.ws
        pad_r, pad_b = (ws - W % ws) % ws, (ws - H % ws) % ws
        grid = F.pad(x.view(B, H, W, C), (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = grid.shape[1], grid.shape[2]
        windows = grid.view(B, Hp // ws, ws, Wp // ws, ws, C).transpose(2, 3).reshape(-1, ws * ws, C)
        q, k, v = self.qkv(windows).chunk(3, dim=-1)
        out = self.ista2(q, k, v, real_b=B)  # (B * windows, ws*ws, C), image-major
        out = out.view(B, Hp // ws, Wp // ws, ws, ws, C).transpose(2, 3).reshape(B, Hp, Wp, C)
        return self.proj_drop(self.proj(out[:, :H, :W].reshape(B, N, C)))


class TwinsGlobalSubSampleAttn(_Patched, twins.GlobalSubSampleAttn):
    """timm.models.twins.GlobalSubSampleAttn: keys and values from the spatially reduced tokens."""

    def forward(self, x, size: tuple[int, int]):
        k, v = self.kv(self._reduced(x, list(size))).chunk(2, dim=-1)
        return self.proj_drop(self.proj(self.ista2(self.q(x), k, v)))


# timm attention class -> (its ISTA2 subclass, the families that use it)
ADAPTERS = {
    vision_transformer.Attention: (ViTAttention, 'ViT, DeiT, DeiT-III and other VisionTransformer models'),
    pvt_v2.Attention: (PvtV2Attention, 'PVTv2 (pvt_v2_b0 ... b5, b2_li)'),
    swin_transformer.WindowAttention: (SwinWindowAttention, 'Swin Transformer v1'),
    eva.EvaAttention: (EvaAttention, 'EVA, EVA-02'),
    beit.Attention: (BeitAttention, 'BEiT, BEiT v2'),
    twins.LocallyGroupedAttn: (TwinsLocallyGroupedAttn, 'Twins-SVT local blocks'),
    twins.GlobalSubSampleAttn: (TwinsGlobalSubSampleAttn, 'Twins-PCPVT, Twins-SVT global blocks'),
}
SUPPORTED = {f'{cls.__module__}.{cls.__qualname__}': families for cls, (_, families) in ADAPTERS.items()}


def _check_signature(adapter):
    """Refuse, at patch time, a timm release whose attention forward takes a parameter the adapter's does not:
    its blocks would pass it at the first forward (as timm's later releases did with ViT's attn_mask)."""
    timm_cls = adapter.__bases__[1]
    ours = inspect.signature(adapter.forward).parameters
    unknown = [name for name in inspect.signature(timm_cls.forward).parameters if name not in ours]
    if unknown:
        raise UnsupportedModelError(
            f'patch_timm: timm {timm.__version__} has {timm_cls.__module__}.{timm_cls.__name__}.forward take '
            f'{", ".join(unknown)}, which this ISTA2 adapter does not know; it was written for the timm releases '
            f'this project supports (pyproject.toml)')

# why some attention classes cannot be expressed as ISTA2(q, k, v) (shown in the error)
_WHY_NOT = {
    'GPSA': "ConViT's gated positional attention mixes two attention maps, not one softmax(q k^T)",
    'MHSA': 'ConViT is supported only as a whole; its GPSA blocks are not',
    'FactorAttnConvRelPosEnc': "CoaT's factorized attention has no softmax(q k^T) over tokens",
    'TalkingHeadAttn': "CaiT's talking-heads attention mixes the heads before and after the softmax",
    'ClassAttn': "CaiT's class attention has a single query token",
}
# attention pooling heads are not blocks: left as they are
_POOLING = ('AttentionPoolLatent', 'AttentionPool2d', 'RotAttentionPool2d')
_LOOKS_LIKE_ATTENTION = re.compile(r'attn|attention|gpsa|mhsa', re.IGNORECASE)


def _supported():
    return 'Supported attention classes: ' + '; '.join(f'{cls} ({families})' for cls, families in SUPPORTED.items())


def _attention_modules(model):
    """[(name, module, parent name, parent)] for every block attention in `model`, supported or not; raises
    UnsupportedModelError naming the block and attention classes of the first unsupported one."""
    found = []
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if isinstance(module, _Patched):
            raise UnsupportedModelError(f'patch_timm: {type(model).__name__} is already patched ({name!r})')
        cls = type(module)
        child = name.rpartition('.')[2]
        attention_like = cls in ADAPTERS or _LOOKS_LIKE_ATTENTION.search(cls.__name__) or child in ('attn', 'attention')
        if not attention_like or cls.__name__ in _POOLING or not name:
            continue
        if any(name.startswith(f'{outer}.') for outer, *_ in found):  # inside an attention already found
            continue
        parent_name = name.rpartition('.')[0]
        parent = modules[parent_name]
        if cls not in ADAPTERS:
            why = _WHY_NOT.get(cls.__name__)
            raise UnsupportedModelError(
                f'patch_timm: block {parent_name or "<model>"!r} ({type(parent).__module__}.{type(parent).__name__}) '
                f'of {type(model).__name__} uses attention {cls.__module__}.{cls.__name__}, which patch_timm does '
                f'not support{f" ({why})" if why else ""}. {_supported()}')
        found.append((name, module, parent_name, parent))
    if not found:
        raise UnsupportedModelError(
            f'patch_timm: {type(model).__module__}.{type(model).__name__} has no attention block patch_timm knows. '
            f'{_supported()}')
    return found


def _class_token_options(model, options, attentions):
    """The token indices of 'cls' / 'cls+bg' from the model's layout (class token first, as in timm's ViT, EVA
    and BEiT), and whether a background token is needed."""
    kind = options.get('rep_tkn_type')
    if kind not in ('cls', 'cls+bg'):
        return options, False
    given = [name for name in ('cls_tkn_idx', 'bg_tkn_idx') if options.get(name) is not None]
    if given:
        raise ConfigError(f'patch_timm: {", ".join(given)} is set from the model\'s token layout; leave it out')
    if getattr(model, 'cls_token', None) is None or not isinstance(model.cls_token, nn.Parameter):
        raise ConfigError(f"patch_timm: rep_tkn_type={kind!r} needs a model with a class token; "
                          f"{type(model).__name__} has none (use 'mean')")
    blocks = getattr(model, 'blocks', None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList) or not all(
            name.startswith('blocks.') for name, *_ in attentions):
        raise ConfigError(f'patch_timm: rep_tkn_type={kind!r} needs every attention inside model.blocks, '
                          f'which {type(model).__name__} does not have')
    if kind == 'cls':
        return dict(options, cls_tkn_idx=0), False
    if type(model) not in _BG_MODELS:
        raise ConfigError(f"patch_timm: rep_tkn_type='cls+bg' is supported for "
                          f"{', '.join(cls.__name__ for cls in _BG_MODELS)}, not {type(model).__name__}")
    return dict(options, bg_tkn_idx=0, cls_tkn_idx=1), True


def _prepend_bg_token(block, args, kwargs):
    """Forward pre-hook on the first block: the background token goes before the class token."""
    x = args[0]
    x = torch.cat([block.bg_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
    return (x, *args[1:]), kwargs


def _strip_bg_token(block, args, output):
    """Forward hook on the last block: the model goes on with its own tokens."""
    return output[:, 1:]


class _WithBackgroundToken:
    """The class of a 'cls+bg' model: its blocks between the first and the last see one extra leading token."""

    def forward_intermediates(self, *args, **kwargs):
        raise UnsupportedModelError("patch_timm: forward_intermediates (and features_only) of a model patched with "
                                  "rep_tkn_type='cls+bg' would return the background token as a patch token; "
                                  "use 'mean' or 'cls' for feature extraction")

    def __prepare_scriptable__(self):
        """torch.jit.script calls this first: the background token's hooks take keyword arguments (timm's EVA and
        BEiT blocks are called with them), which TorchScript cannot compile."""
        raise UnsupportedModelError("patch_timm: torch.jit.script of a model patched with rep_tkn_type='cls+bg' is "
                                    "not supported (its background token is added by hooks TorchScript cannot "
                                    "compile); use torch.jit.trace, or 'mean' or 'cls'")


class _BgVisionTransformer(_WithBackgroundToken, vision_transformer.VisionTransformer):
    pass


class _BgVisionTransformerDistilled(_WithBackgroundToken, deit.VisionTransformerDistilled):
    pass


class _BgEva(_WithBackgroundToken, eva.Eva):
    pass


class _BgBeit(_WithBackgroundToken, beit.Beit):
    pass


# model class -> its class with a background token
_BG_MODELS = {base: bg for bg in (_BgVisionTransformer, _BgVisionTransformerDistilled, _BgEva, _BgBeit)
              for base in bg.__bases__[1:]}


def _install_bg_token(model, dim):
    """A fixed, seeded background token (a saved buffer ``blocks.0.bg_token``, as CvT's stage buffer), before
    the class token from the first block to the last."""
    generator = torch.Generator().manual_seed(BG_TOKEN_SEED)
    token = nn.init.trunc_normal_(torch.empty(1, 1, dim), std=.02, a=-2., b=2., generator=generator)
    first, last = model.blocks[0], model.blocks[-1]
    first.register_buffer('bg_token', token.to(model.cls_token.device, model.cls_token.dtype))
    first.register_forward_pre_hook(_prepend_bg_token, with_kwargs=True)
    last.register_forward_hook(_strip_bg_token)
    model.__class__ = _BG_MODELS[type(model)]


def patch_timm(model, **options):
    """Replace the attention of every block of timm `model` with ISTA2 attention, in place; returns `model`.

    options: the keywords of `common.ista2_options.OPTIONS` (the ISTA2 defaults, everything off, where not
    given). With rep_tkn_type 'cls' or 'cls+bg' the token indices come from the model (leave cls_tkn_idx and
    bg_tkn_idx out); 'cls+bg' adds the background token (buffer ``blocks.0.bg_token``). Every parameter and
    state_dict key is kept; the new norms are ``<attention>.ista2.{q,k,v}_norm_layer.weight``. Raises
    UnsupportedModelError, naming the block and attention class, for a model with an attention class that has
    no adapter (`SUPPORTED` lists those that have one).
    """
    attentions = _attention_modules(model)
    options, with_bg = _class_token_options(model, options, attentions)
    built = []
    for _, attn, _, parent in attentions:  # build everything first: a bad option changes nothing
        adapter = ADAPTERS[type(attn)][0]
        _check_signature(adapter)
        ista2 = ISTA2(attn.proj.in_features, attn.num_heads, qk_scale=attn.scale, v_scale=attn.scale,
                      attn_drop_layer=attn.attn_drop, is_swin=adapter is SwinWindowAttention, **options)
        reference = next(attn.parameters())
        built.append((attn, adapter, parent, ista2.to(reference.device, reference.dtype)))
    for attn, adapter, parent, ista2 in built:
        attn.__class__ = adapter
        attn.ista2, attn.ista2_prefix = ista2, int(with_bg)
        if adapter is SwinWindowAttention:
            attn.ista2_images = None
            parent.register_forward_pre_hook(_record_images)
    if with_bg:
        _install_bg_token(model, model.cls_token.shape[-1])
    return model


def _registered_options(given):
    """The options of a registered `<name>_ista2` model: PUBLISHED, overridden by those given. timm's
    create_model drops keywords whose value is None, so the string 'none' stands for None; without a
    method, attn_inter_topk defaults to 0."""
    given = {name: None if isinstance(value, str) and value.lower() == 'none' else value
             for name, value in given.items()}
    options = dict(PUBLISHED, **given)
    if options['ista2_method'] is None and 'attn_inter_topk' not in given:
        options['attn_inter_topk'] = 0
    return options


def create_ista2_model(base, pretrained=False, **kwargs):
    """timm.create_model(base, pretrained, **model kwargs), patched with the ISTA2 options among `kwargs`
    (PUBLISHED where not given): what every registered `<base>_ista2` name calls."""
    options = {name: kwargs.pop(name) for name in list(kwargs) if name in OPTIONS}
    model = timm.create_model(base, pretrained=pretrained, **kwargs)
    return patch_timm(model, **_registered_options(options))


# the timm names registered as `<name>_ista2`
REGISTERED = (
    'vit_tiny_patch16_224', 'vit_small_patch16_224', 'vit_base_patch16_224',
    'deit_tiny_patch16_224', 'deit_small_patch16_224', 'deit_base_patch16_224',
    'pvt_v2_b0', 'pvt_v2_b1', 'pvt_v2_b2', 'pvt_v2_b2_li', 'pvt_v2_b3', 'pvt_v2_b4', 'pvt_v2_b5',
    'swin_tiny_patch4_window7_224', 'swin_small_patch4_window7_224', 'swin_base_patch4_window7_224',
    'eva02_tiny_patch14_224', 'eva02_small_patch14_224',
    'beit_base_patch16_224', 'beitv2_base_patch16_224',
    'twins_pcpvt_small', 'twins_pcpvt_base', 'twins_pcpvt_large',
    'twins_svt_small', 'twins_svt_base', 'twins_svt_large',
)


# `<name>_ista2` -> the pretrained cfgs of `<name>` (tags, input size, weights), which timm's register_model reads
# from the module: timm.get_pretrained_cfg, list_models(name_matches_cfg=True) and the `<name>_ista2.<tag>` names
# work as for the base, and pretrained=True loads the base's weights
default_cfgs = {}


def _register(base):
    def entrypoint(pretrained=False, **kwargs):
        return create_ista2_model(base, pretrained=pretrained, **kwargs)

    cfgs = {split_model_name_tag(name)[1]: cfg for name, cfg in get_arch_pretrained_cfgs(base).items()}
    default_cfgs[f'{base}_ista2'] = DefaultCfg(deque(cfgs), cfgs, any(cfg.has_weights for cfg in cfgs.values()))
    entrypoint.__name__ = entrypoint.__qualname__ = f'{base}_ista2'
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = (f"timm's {base} with ISTA2 in every attention block (options: PUBLISHED, overridden by "
                          f"the ISTA2 keywords given; the other keywords go to timm.create_model('{base}', ...)).")
    globals()[entrypoint.__name__] = register_model(entrypoint)


def main(argv=None):
    """python -m common.timm_ista2 SCRIPT [ARGS...]: run SCRIPT (e.g. timm's train.py or validate.py) as
    __main__ with ARGS, after the `<name>_ista2` models are registered."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(main.__doc__.strip())
        return
    script = argv[0]
    sys.argv = [script, *argv[1:]]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name='__main__')


if __name__ == '__main__':  # register under the module's real name, then run the script
    from common import timm_ista2
    timm_ista2.main()
else:
    for _name in REGISTERED:
        _register(_name)
