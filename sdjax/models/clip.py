"""The CLIP encoders, as transformers' `CLIPTextModel`, `CLIPTextModelWithProjection` and
`CLIPVisionModelWithProjection` (the image encoder of IP-Adapters)."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.models import config_utils
from sdjax.models.layers import Conv, Embed, LoadedParams, dense, layer_norm

Dtype = Any

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}

# Keys every transformers config may carry that do not change the forward pass.
_IGNORED = frozenset({
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
    "initializer_factor", "initializer_range", "attention_dropout", "dropout",
    "id2label", "label2id", "return_dict",
    "output_attentions", "output_hidden_states", "chunk_size_feed_forward", "is_encoder_decoder",
    "problem_type", "tie_word_embeddings", "use_bfloat16", "torchscript", "pruned_heads",
    "tokenizer_class", "prefix", "task_specific_params", "finetuning_task", "is_decoder",
    "add_cross_attention", "cross_attention_hidden_size", "tf_legacy_loss", "sep_token_id",
    "decoder_start_token_id", "max_length", "min_length", "do_sample", "early_stopping",
    "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p",
    "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "gradient_checkpointing",
})


def _check_encoder(cfg, component: str) -> None:
  if cfg.hidden_act not in _ACTIVATIONS:
    raise config_utils.ConfigError(
        f"{component} hidden_act {cfg.hidden_act!r} is not supported by sdjax")
  if cfg.hidden_size % cfg.num_attention_heads:
    raise config_utils.ConfigError(
        f"{component} hidden_size must be a multiple of num_attention_heads")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """The options of transformers' `CLIPTextConfig` that change the forward pass."""

  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 512  # `CLIPTextModelWithProjection`'s text_projection width only
  # Token ids: no effect on the hidden states, kept so an exported config says the same.
  # eos_token_id picks the pooled position (see `pool_eos`).
  bos_token_id: int | None = 49406
  eos_token_id: int | None = 49407
  pad_token_id: int | None = 1

  def __post_init__(self):
    _check_encoder(self, "text_encoder")

  @classmethod
  def from_dict(cls, raw: dict[str, Any]) -> CLIPTextConfig:
    model_type = raw.get("model_type", "clip_text_model")
    if model_type != "clip_text_model":
      raise config_utils.ConfigError(
          f"text_encoder model_type {model_type!r} is not supported (need clip_text_model)"
      )
    return config_utils.build_config(
        cls, raw, component="text_encoder", fixed={}, ignored=_IGNORED
    )

  def to_dict(self, architecture: str = "CLIPTextModel") -> dict[str, Any]:
    out = config_utils.to_json_dict(self, architecture)
    del out["_class_name"]
    out.update(architectures=[architecture], model_type="clip_text_model")
    return out


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """The options of transformers' `CLIPVisionConfig` that change the forward pass."""

  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 512  # `CLIPVisionModelWithProjection`'s visual_projection width

  def __post_init__(self):
    _check_encoder(self, "image_encoder")
    if self.image_size % self.patch_size:
      raise config_utils.ConfigError("image_encoder image_size must be a multiple of patch_size")

  @property
  def num_positions(self) -> int:
    """Tokens the encoder sees: one per patch and the class token."""
    return (self.image_size // self.patch_size) ** 2 + 1

  @classmethod
  def from_dict(cls, raw: dict[str, Any]) -> CLIPVisionConfig:
    if raw.get("model_type") == "clip" and "vision_config" in raw:  # a whole CLIPModel's
      raw = raw["vision_config"]
    model_type = raw.get("model_type", "clip_vision_model")
    if model_type != "clip_vision_model":
      raise config_utils.ConfigError(
          f"image_encoder model_type {model_type!r} is not supported (need clip_vision_model)")
    return config_utils.build_config(cls, raw, component="image_encoder", fixed={},
                                     ignored=_IGNORED)

  def to_dict(self) -> dict[str, Any]:
    out = config_utils.to_json_dict(self, "CLIPVisionModelWithProjection")
    del out["_class_name"]
    out.update(architectures=["CLIPVisionModelWithProjection"], model_type="clip_vision_model")
    return out


class CLIPAttention(nn.Module):
  heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  causal: bool = True  # the text encoder's; the vision encoder attends to every token

  @nn.compact
  def __call__(self, x):
    d, pd = self.dtype, self.param_dtype
    b, n, c = x.shape
    head_dim = c // self.heads

    def proj(name):
      return dense(c, d, pd, name)(x).reshape(b, n, self.heads, head_dim)  # B, N, H, D

    q, k, v = proj("q_proj") * head_dim**-0.5, proj("k_proj"), proj("v_proj")
    scores = jnp.einsum("bnhd,bmhd->bhnm", q, k).astype(jnp.float32)  # B, H, N, N
    if self.causal:
      scores = jnp.where(jnp.tril(jnp.ones((n, n), bool)), scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhnm,bmhd->bnhd", probs, v).reshape(b, n, c)  # B, N, C
    return dense(c, d, pd, "out_proj")(out)


class CLIPEncoderLayer(nn.Module):
  config: CLIPTextConfig | CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  causal: bool = True

  @nn.compact
  def __call__(self, x):
    cfg, d, pd = self.config, self.dtype, self.param_dtype
    h = layer_norm(cfg.layer_norm_eps, d, pd, "layer_norm1")(x)
    x = x + CLIPAttention(cfg.num_attention_heads, d, pd, self.causal, name="self_attn")(h)
    h = layer_norm(cfg.layer_norm_eps, d, pd, "layer_norm2")(x)
    return x + CLIPMLP(cfg, d, pd, name="mlp")(h)


class CLIPMLP(nn.Module):
  config: CLIPTextConfig | CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    h = dense(cfg.intermediate_size, self.dtype, self.param_dtype, "fc1")(x)
    h = _ACTIVATIONS[cfg.hidden_act](h)
    return dense(cfg.hidden_size, self.dtype, self.param_dtype, "fc2")(h)


class CLIPEmbeddings(nn.Module):
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids, token_embeds=None):
    cfg = self.config
    tok = Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
                param_dtype=self.param_dtype, name="token_embedding")
    pos = Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype,
                param_dtype=self.param_dtype, name="position_embedding")
    x = tok(input_ids)  # B, N, C
    if token_embeds is not None:  # (vectors [B, N, C], where [B, N]): textual inversion
      vectors, where = token_embeds
      x = jnp.where(where[..., None], vectors.astype(x.dtype), x)
    return x + pos(jnp.arange(input_ids.shape[-1]))[None]  # B, N, C


class CLIPEncoder(nn.Module):
  config: CLIPTextConfig | CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  causal: bool = True

  @nn.compact
  def __call__(self, x):
    hidden_states = [x]
    for i in range(self.config.num_hidden_layers):
      x = CLIPEncoderLayer(self.config, self.dtype, self.param_dtype, self.causal,
                           name=f"layers_{i}")(x)
      hidden_states.append(x)
    return hidden_states


def pool_eos(last_hidden_state, input_ids, eos_token_id):
  """The hidden state [B, C] at each sequence's end-of-text token, as transformers picks it.

  Configs with `eos_token_id == 2` (SD2's and SDXL's encoders, written before transformers fixed
  the id) take the position of the largest token id, which is the real EOS in CLIP's vocabulary;
  otherwise the first position holding `eos_token_id`.
  """
  if eos_token_id == 2:
    pos = jnp.argmax(input_ids, axis=-1)
  else:
    pos = jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)
  return jnp.take_along_axis(last_hidden_state, pos[:, None, None], axis=1)[:, 0]  # B, C


class CLIPTextModel(nn.Module):
  """Token ids [B, N] -> dict(last_hidden_state, hidden_states, pooler_output, prompt_embeds).

  `hidden_states` holds the embeddings output and every layer's output (before the final
  LayerNorm), as transformers' `output_hidden_states=True`. `prompt_embeds` is what Stable
  Diffusion pipelines condition on: the last hidden state, or with `clip_skip=k` the output k
  layers before the last passed through the final LayerNorm, as diffusers' `clip_skip` does.
  `token_embeds=(vectors, where)` replaces the token embeddings where `where` is true (before the
  position embeddings are added), for textual-inversion vectors placed by a prompt parser.
  """

  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids, clip_skip: int | None = None, token_embeds=None):
    return self._encode(input_ids, clip_skip, token_embeds)

  def _encode(self, input_ids, clip_skip, token_embeds=None):
    cfg, d, pd = self.config, self.dtype, self.param_dtype
    if clip_skip is not None and not 0 <= clip_skip < cfg.num_hidden_layers:
      raise ValueError(f"clip_skip must be in [0, {cfg.num_hidden_layers}), got {clip_skip}")
    x = CLIPEmbeddings(cfg, d, pd, name="embeddings")(input_ids, token_embeds)
    hidden_states = CLIPEncoder(cfg, d, pd, name="encoder")(x)
    final_norm = layer_norm(cfg.layer_norm_eps, d, pd, "final_layer_norm")
    last = final_norm(hidden_states[-1])
    prompt_embeds = final_norm(hidden_states[-(clip_skip + 1)]) if clip_skip else last
    return {"last_hidden_state": last, "hidden_states": hidden_states,
            "pooler_output": pool_eos(last, input_ids, cfg.eos_token_id),
            "prompt_embeds": prompt_embeds}


class CLIPTextModelWithProjection(CLIPTextModel):
  """`CLIPTextModel`'s outputs plus `text_embeds` [B, projection_dim]: the pooled state projected.

  The projection sits beside the text model's modules, as the checkpoint's `text_projection`
  key sits beside its (prefix-stripped) `text_model.*` keys.
  """

  @nn.compact
  def __call__(self, input_ids, clip_skip: int | None = None, token_embeds=None):
    out = self._encode(input_ids, clip_skip, token_embeds)
    cfg = self.config
    proj = dense(cfg.projection_dim, self.dtype, self.param_dtype, "text_projection",
                 use_bias=False)
    return {**out, "text_embeds": proj(out["pooler_output"])}


class CLIPVisionEmbeddings(LoadedParams, nn.Module):
  """Patches of the image embedded by a convolution, the class token first, positions added."""

  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels):
    cfg, d, pd = self.config, self.dtype, self.param_dtype
    p = cfg.patch_size
    x = Conv(cfg.hidden_size, p, p, ((0, 0), (0, 0)), d, pd, use_bias=False,
             name="patch_embedding")(pixels.astype(d))  # B, S/p, S/p, C
    x = x.reshape(x.shape[0], -1, cfg.hidden_size)  # B, N, C
    cls = self.param("class_embedding", nn.initializers.normal(1.0), (cfg.hidden_size,), pd)
    cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, cfg.hidden_size))
    pos = Embed(cfg.num_positions, cfg.hidden_size, dtype=d, param_dtype=pd,
                name="position_embedding")
    return jnp.concatenate([cls, x], axis=1) + pos(jnp.arange(cfg.num_positions))[None]


class CLIPVisionModelWithProjection(nn.Module):
  """Pixels [B, S, S, 3] (NHWC, normalized as CLIP's image processor does) -> dict(
  last_hidden_state, hidden_states, pooler_output, image_embeds), as transformers' model with
  `output_hidden_states=True`: `hidden_states` the embeddings (after the pre-LayerNorm) and every
  layer's output, `image_embeds` the class token's final state, LayerNormed and projected."""

  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels):
    cfg, d, pd = self.config, self.dtype, self.param_dtype
    x = CLIPVisionEmbeddings(cfg, d, pd, name="embeddings")(pixels)
    x = layer_norm(cfg.layer_norm_eps, d, pd, "pre_layrnorm")(x)  # (sic, transformers' name)
    hidden_states = CLIPEncoder(cfg, d, pd, causal=False, name="encoder")(x)
    pooled = layer_norm(cfg.layer_norm_eps, d, pd, "post_layernorm")(hidden_states[-1][:, 0])
    proj = dense(cfg.projection_dim, d, pd, "visual_projection", use_bias=False)
    return {"last_hidden_state": hidden_states[-1], "hidden_states": hidden_states,
            "pooler_output": pooled, "image_embeds": proj(pooled)}
