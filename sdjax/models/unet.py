"""The conditional UNet noise predictor, as diffusers' `UNet2DConditionModel` (SD 1.x/2.x, SDXL).

Note diffusers' naming quirk, kept here for compatibility with every checkpoint: the config's
`attention_head_dim` is the number of attention *heads* per block; the head width is
`channels // heads`.

SDXL adds `addition_embed_type="text_time"`: the pooled text embedding and sinusoidal embeddings
of the micro-conditioning `time_ids` go through `add_embedding` and are added to the time
embedding. `transformer_layers_per_block` may give one depth per block or, per block, one depth
per layer (distilled SDXL variants); up blocks take the reversed list unless
`reverse_transformer_layers_per_block` gives theirs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from sdjax.models import config_utils, token_merging
from sdjax.models.layers import (
    Downsample2D,
    Embed,
    ResnetBlock2D,
    Transformer2DModel,
    Upsample2D,
    conv,
    dense,
    group_norm,
    timestep_embedding,
)

Dtype = Any

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
# None: no mid block (block-removed distillations such as BK-SDM); UNetMidBlock2D: one resnet.
_MID_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The options of `UNet2DConditionModel` that sdjax implements (diffusers' names)."""

  sample_size: int | None = 64
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  down_block_types: tuple[str, ...] = (
      "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D",
  )
  mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
  up_block_types: tuple[str, ...] = (
      "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
  )
  only_cross_attention: bool | tuple[bool, ...] = False
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int | tuple[int, ...] = 2
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  dropout: float = 0.0  # training only: identity at inference
  act_fn: str = "silu"
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int = 1280
  transformer_layers_per_block: int | tuple[int | tuple[int, ...], ...] = 1
  reverse_transformer_layers_per_block: tuple[int | tuple[int, ...], ...] | None = None
  attention_head_dim: int | tuple[int, ...] = 8
  use_linear_projection: bool = False
  upcast_attention: bool | None = False
  addition_embed_type: str | None = None
  addition_time_embed_dim: int | None = None
  projection_class_embeddings_input_dim: int | None = None
  # LCM-distilled UNets: the width of a guidance-scale embedding added to the time embedding's
  # input (diffusers' `timestep_cond`; their pipelines then run without CFG).
  time_cond_proj_dim: int | None = None
  # A learned embedding of `class_labels` added to the time embedding (diffusers'
  # `class_embedding`, class_embed_type None): the x4 upscaler's noise level, 0..999.
  num_class_embeds: int | None = None

  def __post_init__(self):
    n = len(self.block_out_channels)
    bad = [t for t in self.down_block_types if t not in _DOWN_TYPES]
    bad += [t for t in self.up_block_types if t not in _UP_TYPES]
    if bad:
      raise config_utils.ConfigError(f"unet block type {bad[0]!r} is not supported by sdjax")
    if self.mid_block_type not in _MID_TYPES:
      raise config_utils.ConfigError(
          f"unet mid_block_type {self.mid_block_type!r} is not supported by sdjax"
      )
    if self.act_fn != "silu":
      raise config_utils.ConfigError(f"unet act_fn {self.act_fn!r} is not supported by sdjax")
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise config_utils.ConfigError(
          "unet down_block_types, up_block_types and block_out_channels differ in length"
      )
    for name in ("attention_head_dim", "only_cross_attention", "transformer_layers_per_block",
                 "layers_per_block", "reverse_transformer_layers_per_block"):
      value = getattr(self, name)
      if isinstance(value, tuple) and len(value) != n:
        raise config_utils.ConfigError(f"unet {name} needs one entry per block ({n})")
    if self.addition_embed_type not in (None, "text_time"):
      raise config_utils.ConfigError(
          f"unet config option addition_embed_type={self.addition_embed_type!r} is not "
          "supported by sdjax (only None or 'text_time')"
      )
    if self.addition_embed_type and not (
        self.addition_time_embed_dim and self.projection_class_embeddings_input_dim):
      raise config_utils.ConfigError(
          "unet addition_embed_type 'text_time' needs addition_time_embed_dim and "
          "projection_class_embeddings_input_dim"
      )
    if any(c % self.norm_num_groups for c in self.block_out_channels):
      raise config_utils.ConfigError("unet block_out_channels must be multiples of norm_num_groups")

  def per_block(self, name: str) -> tuple:
    value = getattr(self, name)
    return value if isinstance(value, tuple) else (value,) * len(self.block_out_channels)

  def transformer_depth(self, block: int, layer: int, up: bool) -> int:
    """Transformer blocks in layer `layer` of down (or up) block `block`, as diffusers counts."""
    if up and self.reverse_transformer_layers_per_block is not None:
      value = self.reverse_transformer_layers_per_block[block]
    else:
      k = len(self.block_out_channels) - 1 - block if up else block
      value = self.per_block("transformer_layers_per_block")[k]
    return value[layer] if isinstance(value, tuple) else value

  @property
  def downscale(self) -> int:
    """How much the UNet downsamples: latent sizes must be a multiple of this."""
    return 2 ** (len(self.block_out_channels) - 1)

  @property
  def skip_channels(self) -> tuple[int, ...]:
    """Channels of each skip the down path keeps (conv_in's, then each down block's layers and
    downsampler): the residuals a ControlNet adds."""
    channels = [self.block_out_channels[0]]
    n = len(self.block_out_channels)
    for i, c in enumerate(self.block_out_channels):
      channels += [c] * (self.per_block("layers_per_block")[i] + (1 if i < n - 1 else 0))
    return tuple(channels)

  def intrablock_shapes(self, height: int, width: int):
    """Where a T2I-Adapter's feature maps go, for latents of (height, width): ((h, w, channels)
    per down block (see `_Block`), the mid block's output's (h, w, channels))."""
    blocks = []
    n = len(self.block_out_channels)
    for i, (kind, c) in enumerate(zip(self.down_block_types, self.block_out_channels,
                                      strict=True)):
      if kind.startswith("CrossAttn"):
        blocks.append((height, width, c))
      if i < n - 1:  # Downsample2D: a stride-2 3x3 convolution (padding 0: one more pixel)
        pad = 2 * self.downsample_padding or 1
        height, width = (height + pad - 3) // 2 + 1, (width + pad - 3) // 2 + 1
      if not kind.startswith("CrossAttn"):
        blocks.append((height, width, c))
    return blocks, (height, width, self.block_out_channels[-1])

  @classmethod
  def from_dict(cls, raw: dict[str, Any]) -> UNetConfig:
    return config_utils.build_config(
        cls, raw, component="unet", fixed=_FIXED_OPTIONS, ignored=frozenset()
    )

  def to_dict(self) -> dict[str, Any]:
    return config_utils.to_json_dict(self, "UNet2DConditionModel")


# UNet2DConditionModel options sdjax implements only at their diffusers default.
_FIXED_OPTIONS = {
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}


class _Block(nn.Module):
  """One resolution level of the UNet: resnets, optional transformers, optional resampler.

  A down block returns its output and the skip activations it produced; an up block consumes
  skips (`skips`, last first) by concatenating them onto its input channels.
  """

  out_channels: int
  num_layers: int
  has_attention: bool
  resample: bool
  up: bool
  heads: int
  transformer_layers: tuple[int, ...]  # per layer
  only_cross_attention: bool
  config: UNetConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, context, skips=(), context_bias=None, intrablock=None, ip=None,
               pag=None, freeu=None):
    """`intrablock`: a T2I-Adapter's feature map, added to a down block's output (and to its
    last skip, which is that output): with attention, to its last layer's, before the
    downsampler, as diffusers' `down_intrablock_additional_residuals`. `ip`: IP-Adapters'
    image tokens (see `layers.Attention`). `freeu`: an up block's FreeU (static; see
    `_freeu_scales`), before each layer."""
    cfg, d, pd = self.config, self.dtype, self.param_dtype
    outputs = []
    skips = list(skips)
    for j in range(self.num_layers):
      if self.up:
        skip = skips.pop()
        if freeu is not None:
          x, skip = _apply_freeu(x, skip, freeu)
        x = jnp.concatenate([x, skip], axis=-1)  # B, H, W, C + C_skip
      x = ResnetBlock2D(
          self.out_channels, cfg.norm_num_groups, cfg.norm_eps, dtype=d, param_dtype=pd,
          name=f"resnets_{j}",
      )(x, temb)
      if self.has_attention:
        x = self._transformer(f"attentions_{j}", self.transformer_layers[j])(
            x, context, context_bias, ip, pag)
        if intrablock is not None and j == self.num_layers - 1:
          x = x + intrablock.astype(x.dtype)
      outputs.append(x)
    if self.resample and self.up:
      x = Upsample2D(self.out_channels, d, pd, name="upsamplers_0")(x)
    elif self.resample:
      x = Downsample2D(self.out_channels, cfg.downsample_padding, d, pd, name="downsamplers_0")(x)
      outputs.append(x)
    if intrablock is not None and not self.has_attention:
      x = x + intrablock.astype(x.dtype)  # diffusers adds it in place: to the last skip too
      outputs[-1] = x
    return x, tuple(outputs)

  def _transformer(self, name, depth):
    cfg = self.config
    return Transformer2DModel(
        heads=self.heads,
        head_dim=self.out_channels // self.heads,
        num_layers=depth,
        groups=cfg.norm_num_groups,
        use_linear_projection=cfg.use_linear_projection,
        only_cross_attention=self.only_cross_attention,
        upcast_attention=cfg.upcast_attention,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name,
    )


class _MidBlock(nn.Module):
  """resnet, transformer, resnet at the lowest resolution (`UNetMidBlock2D`: one resnet)."""

  config: UNetConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, context, context_bias=None, ip=None, pag=None):
    cfg, d, pd = self.config, self.dtype, self.param_dtype
    channels = cfg.block_out_channels[-1]
    heads = cfg.per_block("attention_head_dim")[-1]

    def resnet(name):
      return ResnetBlock2D(
          channels, cfg.norm_num_groups, cfg.norm_eps, cfg.mid_block_scale_factor, d, pd,
          name=name,
      )

    x = resnet("resnets_0")(x, temb)
    if cfg.mid_block_type == "UNetMidBlock2D":
      return x
    x = Transformer2DModel(
        heads=heads,
        head_dim=channels // heads,
        num_layers=_first(cfg.per_block("transformer_layers_per_block")[-1]),
        groups=cfg.norm_num_groups,
        use_linear_projection=cfg.use_linear_projection,
        upcast_attention=cfg.upcast_attention,
        dtype=d,
        param_dtype=pd,
        name="attentions_0",
    )(x, context, context_bias, ip, pag)
    return resnet("resnets_1")(x, temb)


FREEU_FORMS = ("diffusers", "comfyui", "comfyui_v2")


def _freeu_scales(form: str, factors, block: int, model_channels: int):
  """The FreeU an up block applies: ((backbone channels or None: any, b, s, v2), ...), the
  first entry that fits a layer's input applies; None: none. diffusers' `apply_freeu`: the
  first two up blocks, (b1, s1) and (b2, s2). ComfyUI's FreeU and FreeU_V2 nodes (an output
  block patch): any layer whose backbone input has 4 or 2 times the model's first channels;
  V2 scales the backbone by its channel mean, min-max normalised per image."""
  s1, s2, b1, b2 = factors
  if form == "diffusers":
    return None if block > 1 else ((None, b1, s1, False),) if block == 0 else (
        (None, b2, s2, False),)
  v2 = form == "comfyui_v2"
  return ((4 * model_channels, b1, s1, v2), (2 * model_channels, b2, s2, v2))


def _apply_freeu(x, skip, scales):
  """(x, skip) of an up block's layer with FreeU (`_freeu_scales`): half the backbone's
  channels times b (V2: times (b - 1) * its normalised channel mean + 1), the skip's lowest
  frequencies times s."""
  for channels, b, s, v2 in scales:
    if channels is not None and channels != x.shape[-1]:
      continue
    factor = jnp.asarray(b, x.dtype)
    if v2:  # ComfyUI's FreeU_V2
      mean = jnp.mean(x, axis=-1, keepdims=True)
      flat = mean.reshape(mean.shape[0], -1)
      low = jnp.min(flat, axis=-1)[:, None, None, None]
      high = jnp.max(flat, axis=-1)[:, None, None, None]
      factor = jnp.asarray(b - 1, x.dtype) * ((mean - low) / (high - low)) + 1
    half = x.shape[-1] // 2
    x = jnp.concatenate([x[..., :half] * factor, x[..., half:]], -1)
    return x, fourier_filter(skip, 1, s)
  return x, skip


def fourier_filter(x, threshold: int, scale: float):
  """FreeU's filter, as diffusers' `fourier_filter`: x [B, H, W, C] with its centred lowest
  (2 * threshold)^2 spatial frequencies times `scale`, in float32, back in x's dtype."""
  h, w = x.shape[1:3]
  freq = jnp.fft.fftshift(jnp.fft.fftn(x.astype(jnp.float32), axes=(1, 2)), axes=(1, 2))
  mask = np.ones((h, w), np.float32)
  mask[max(h // 2 - threshold, 0):h // 2 + threshold,
       max(w // 2 - threshold, 0):w // 2 + threshold] = scale
  freq = freq * mask[None, :, :, None]
  out = jnp.fft.ifftn(jnp.fft.ifftshift(freq, axes=(1, 2)), axes=(1, 2)).real
  return out.astype(x.dtype)


def _first(depth):
  """The mid block has one layer: a per-layer depth list gives its first entry."""
  return depth[0] if isinstance(depth, tuple) else depth


class TimestepEmbedding(nn.Module):
  """Two linear layers with a SiLU between, from the sinusoidal embedding to the time vector;
  with `cond_proj_dim`, a condition [B, cond_proj_dim] projected (no bias) and added first."""

  dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  cond_proj_dim: int | None = None

  @nn.compact
  def __call__(self, x, condition=None):
    if self.cond_proj_dim is not None:
      if condition is None:
        raise ValueError(f"this UNet (time_cond_proj_dim={self.cond_proj_dim}) needs a "
                         "timestep_cond (an LCM model's guidance-scale embedding)")
      x = x + dense(x.shape[-1], self.dtype, self.param_dtype, "cond_proj", use_bias=False)(
          condition.astype(self.dtype))
    x = dense(self.dim, self.dtype, self.param_dtype, "linear_1")(x)
    return dense(self.dim, self.dtype, self.param_dtype, "linear_2")(nn.silu(x))


class UNet2DConditionModel(nn.Module):
  """Predicts the noise (or v) in latents x [B, h, w, C] at timesteps t [B] given context.

  `context_bias` (optional, [B, 1, 1, M]) is added to the cross-attention scores: -inf hides
  padded context tokens, so a short prompt padded to a batch's length attends as if alone.
  """

  config: UNetConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  # FreeU (Si et al. 2023) as diffusers' `enable_freeu(s1, s2, b1, b2)`: in the first two up
  # blocks, before each layer, half the backbone channels times b and the skip's lowest
  # frequencies times s (`freeu`); None: off. `freeu_form` (`FREEU_FORMS`): diffusers' or
  # ComfyUI's FreeU / FreeU_V2 nodes (`_freeu_scales`).
  freeu: tuple[float, float, float, float] | None = None
  freeu_form: str = "diffusers"
  # Token merging (ToMe SD as A1111 applies it, `token_merging`): the share of the tokens of
  # the full-resolution transformer blocks that their self-attention merges; 0: off.
  token_merging: float = 0.0

  @nn.compact
  def __call__(self, sample, timesteps, context, text_embeds=None, time_ids=None,
               context_bias=None, timestep_cond=None, down_residuals=None, mid_residual=None,
               intrablock_residuals=None, ip=None, pag=None, class_labels=None):
    """`text_embeds` [B, P] and `time_ids` [B, K] are diffusers' `added_cond_kwargs` (SDXL),
    `class_labels` [B] integers its argument of that name (`num_class_embeds`),
    `timestep_cond` [B, time_cond_proj_dim] its argument of that name (LCM-distilled UNets),
    `down_residuals` (one per skip) and `mid_residual` a ControlNet's outputs (diffusers'
    `down_block_additional_residuals`, `mid_block_additional_residual`),
    `intrablock_residuals` a T2I-Adapter's feature maps (diffusers'
    `down_intrablock_additional_residuals`: one per down block, in order, and one more for the
    mid block's output if it has that shape, as SDXL's adapters make), `ip` IP-Adapters' image
    tokens, per adapter (tokens [B, T, cross_attention_dim], scale [B]), which every
    cross-attention layer attends to with its own `to_k_ip_<a>` / `to_v_ip_<a>` params
    (diffusers' `added_cond_kwargs["image_embeds"]` after its `encoder_hid_proj`), `pag` a
    `PerturbedLayers` (static): perturbed-attention guidance's identity self-attention for the
    last rows in the blocks it names."""
    with token_merging.applied(self.token_merging, sample.shape[1:3]):
      cfg, d, pd = self.config, self.dtype, self.param_dtype
      class_emb = None
      if cfg.num_class_embeds is not None:
        if class_labels is None and self.is_initializing():  # shape inference: any label
          class_labels = jnp.zeros(sample.shape[:1], jnp.int32)
        if class_labels is None:
          raise ValueError("this UNet (num_class_embeds) needs class_labels")
        class_emb = Embed(cfg.num_class_embeds, cfg.block_out_channels[0] * 4, dtype=d,
                          param_dtype=pd, name="class_embedding")(jnp.asarray(class_labels))
      temb = self._time_embedding(sample, timesteps, text_embeds, time_ids, timestep_cond,
                                  class_emb)
      x = self._conv_in(sample)
      x, skips = self._down_and_mid(x, temb, context.astype(d), context_bias,
                                    list(intrablock_residuals or ()), ip, pag)
      if down_residuals is not None:
        skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_residuals, strict=True)]
        x = x + mid_residual.astype(x.dtype)

      for i, block_type in enumerate(cfg.up_block_types):
        n = cfg.per_block("layers_per_block")[-1 - i] + 1
        block_skips, skips = skips[-n:], skips[:-n]
        freeu = None if self.freeu is None else _freeu_scales(
            self.freeu_form, self.freeu, i, cfg.block_out_channels[0])
        x, _ = self._block(i, block_type, up=True)(x, temb, context, block_skips, context_bias,
                                                   None, ip, pag, freeu)

      x = nn.silu(group_norm(cfg.norm_num_groups, cfg.norm_eps, d, pd, "conv_norm_out")(x))
      return conv(cfg.out_channels, 3, d, pd, "conv_out")(x)

  def _time_embedding(self, sample, timesteps, text_embeds, time_ids, timestep_cond,
                      extra=None):
    """The time vector [B, 4 * C0]: timesteps, SDXL's added conditioning, an LCM guidance;
    `extra` (a module's own embedding, [B, 4 * C0]) added before SDXL's, in diffusers' order."""
    cfg, d, pd = self.config, self.dtype, self.param_dtype
    channels = cfg.block_out_channels
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
    temb = timestep_embedding(timesteps, channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
    temb = TimestepEmbedding(channels[0] * 4, d, pd, cfg.time_cond_proj_dim,
                             name="time_embedding")(temb.astype(d), timestep_cond)
    if extra is not None:
      temb = temb + extra.astype(temb.dtype)
    if cfg.addition_embed_type == "text_time":
      temb = temb + self._text_time_embedding(text_embeds, time_ids)
    return temb

  def _conv_in(self, sample):
    cfg = self.config
    if cfg.center_input_sample:
      sample = 2 * sample - 1.0
    return conv(cfg.block_out_channels[0], 3, self.dtype, self.param_dtype, "conv_in")(
        sample.astype(self.dtype))

  def _down_and_mid(self, x, temb, context, context_bias, intrablock=None, ip=None, pag=None):
    """The down blocks and the mid block: (the mid block's output, the skips, first first);
    `intrablock`: a T2I-Adapter's feature maps, taken in order (see `__call__`)."""
    cfg = self.config
    intrablock = list(intrablock or ())
    skips = [x]
    for i, block_type in enumerate(cfg.down_block_types):
      x, outputs = self._block(i, block_type, up=False)(
          x, temb, context, (), context_bias, intrablock.pop(0) if intrablock else None, ip,
          pag)
      skips.extend(outputs)
    if cfg.mid_block_type is not None:
      x = _MidBlock(cfg, self.dtype, self.param_dtype, name="mid_block")(x, temb, context,
                                                                        context_bias, ip, pag)
      if intrablock and intrablock[0].shape == x.shape:
        x = x + intrablock.pop(0).astype(x.dtype)
    if intrablock:
      raise ValueError(f"{len(intrablock)} T2I-Adapter feature maps left over: an adapter for "
                       "another model family?")
    return x, skips

  def _text_time_embedding(self, text_embeds, time_ids):
    """SDXL's added conditioning: pooled text [B, P] and micro-conditioning [B, K] -> [B, T]."""
    cfg = self.config
    if text_embeds is None or time_ids is None:
      raise ValueError("this UNet (addition_embed_type='text_time') needs text_embeds and "
                       "time_ids")
    b = text_embeds.shape[0]
    time_embeds = timestep_embedding(
        jnp.asarray(time_ids).reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
        cfg.freq_shift)  # B*K, E
    add = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds.reshape(b, -1)],
                          axis=-1)  # B, P + K*E
    return TimestepEmbedding(cfg.block_out_channels[0] * 4, self.dtype, self.param_dtype,
                             name="add_embedding")(add.astype(self.dtype))

  def _block(self, i: int, block_type: str, up: bool) -> _Block:
    cfg = self.config
    n = len(cfg.block_out_channels)
    # Up blocks walk the per-block lists in reverse.
    k = n - 1 - i if up else i
    num_layers = cfg.per_block("layers_per_block")[k] + (1 if up else 0)
    return _Block(
        out_channels=cfg.block_out_channels[k],
        num_layers=num_layers,
        has_attention=block_type.startswith("CrossAttn"),
        resample=i < n - 1,
        up=up,
        heads=cfg.per_block("attention_head_dim")[k],
        transformer_layers=tuple(cfg.transformer_depth(i, j, up) for j in range(num_layers)),
        only_cross_attention=cfg.per_block("only_cross_attention")[k],
        config=cfg,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=f"{'up' if up else 'down'}_blocks_{i}",
    )
