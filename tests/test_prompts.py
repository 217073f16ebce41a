"""A1111 prompt syntax: the parser against A1111's own docstring examples; weighted encoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_default_codegen
from parity import assert_close, nchw, nhwc, rel_err, transfer

import sdjax
from sdjax import conditioning, prompts, sampling, testing
from sdjax.prompts import parse_prompt_attention, prompt_schedule


# -- attention weights: modules/prompt_parser.py parse_prompt_attention's docstring ----------------
@pytest.mark.parametrize("text,expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
        ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
])
def test_attention_docstring_examples(text, expected):
  assert parse_prompt_attention(text) == expected  # exact floats, products included


@pytest.mark.parametrize("text,expected", [
    ("", [("", 1.0)]),
    ("[a] (b:0.5) (c: 1.5 )", [("a", 1 / 1.1), (" ", 1.0), ("b", 0.5), (" ", 1.0), ("c", 1.5)]),
    ("a BREAK b", [("a", 1.0), prompts.BREAK, ("b", 1.0)]),
    ("BREAK", [("", 1.0), prompts.BREAK, ("", 1.0)]),
    # Inside brackets BREAK is weighted too, and then A1111 reads it as the word "BREAK".
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
    ("x:1.5) \\\\ y\\z", [("x:1.5) \\ yz", 1.0)]),  # no open bracket; a lone backslash vanishes
    ("[[a]", [("a", 1 / 1.1 / 1.1)]),
])
def test_attention_edge_cases(text, expected):
  assert parse_prompt_attention(text) == expected


def test_saved_styles(tmp_path):
  """A1111's styles.csv: a style's text replaces its {prompt}, else follows the prompt after
  ", " (nothing added for an empty side); styles apply in order; the file's BOM and older "text"
  column are read as A1111 reads them; bad files and unknown names are one-line errors."""
  assert prompts.merge_style("photo of {prompt}, 8k", "a cat") == "photo of a cat, 8k"
  assert prompts.merge_style("film grain", "a cat ") == "a cat, film grain"
  assert prompts.merge_style("", "a cat") == "a cat"
  assert prompts.merge_style("blurry", "") == "blurry"
  path = tmp_path / "styles.csv"
  path.write_text('name,prompt,negative_prompt\nCinematic,"cinematic still of {prompt}, '
                  'grain",blurry\nSharp, sharp focus,"lowres, bad"\n', encoding="utf-8-sig")
  styles = prompts.read_styles(str(path), ["Cinematic", "Sharp"])
  assert styles.apply("a cat", "") == ("cinematic still of a cat, grain, sharp focus",
                                       "blurry, lowres, bad")
  assert styles.apply("a cat", "ugly", ["Sharp"]) == ("a cat, sharp focus", "ugly, lowres, bad")
  assert styles.apply("a cat", "ugly", []) == ("a cat", "ugly")
  old = tmp_path / "old.csv"
  old.write_text("name,text\nOld,old style\n")
  assert prompts.read_styles(str(old)).apply("x", "y", ["Old"]) == ("x, old style", "y")
  with pytest.raises(ValueError, match=r"unknown style 'Noir' \(the styles file has: "
                     r"Cinematic, Sharp\)"):
    prompts.read_styles(str(path), ["Noir"])
  bad = tmp_path / "bad.csv"
  bad.write_text("title,body\nA,b\n")
  with pytest.raises(ValueError, match="needs the columns name, prompt .* it has title, body"):
    prompts.read_styles(str(bad))
  with pytest.raises(ValueError, match="cannot read styles file"):
    prompts.read_styles(str(tmp_path / "none.csv"))


def test_attention_bad_weight():
  with pytest.raises(prompts.PromptError, match="bad attention weight '1.2.3'"):
    parse_prompt_attention("(a:1.2.3)")


# -- schedules: get_learned_conditioning_prompt_schedules' docstring (steps=10) --------------------
def _alternating(a, b, steps=10):
  return [(s, a if s % 2 else b) for s in range(1, steps + 1)]


@pytest.mark.parametrize("prompt,expected", [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", _alternating("a", "(b:1.1)")),
    ("[fe|]male", _alternating("female", "male")),
    ("[fe|||]male", [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)]),
    # Not in the docstring: a step past the end clamps; a `|` outside brackets leaves it all text.
    ("a [b:1.5] c", [(10, "a  c")]),
    ("a|b [c:2]", [(10, "a|b [c:2]")]),
])
def test_schedule_docstring_examples(prompt, expected):
  assert prompt_schedule(prompt, 10) == expected


@pytest.mark.parametrize("prompt,expected", [
    # A1111's docstring, a hires pass of 10 steps after a first pass of 10:
    ("a [b:.5] c", [(10, "a b c")]),
    ("a [b:1.5] c", [(5, "a  c"), (10, "a b c")]),
    # Steps count on from the first pass; edits it finished stay finished.
    ("a [b:15] c", [(5, "a  c"), (10, "a b c")]),
    ("a [b:c:5] d", [(10, "a c d")]),
    ("[x|y] z", _alternating("x z", "y z")),
])
def test_schedule_of_a_hires_pass(prompt, expected):
  assert prompt_schedule(prompt, 10, 10) == expected


@pytest.mark.parametrize("prompt,base,expected,new", [
    # below 1 a fraction, any other a step: "1.0" is step 1, not the whole run
    ("a [b:1.0] c", None, [(1, "a  c"), (10, "a b c")], [(10, "a  c")]),
    ("a [b:0.5] c", None, [(5, "a  c"), (10, "a b c")], [(5, "a  c"), (10, "a b c")]),
    ("a [b:3] c", None, [(3, "a  c"), (10, "a b c")], [(3, "a  c"), (10, "a b c")]),
    ("a [b:c:2.5] d", None, [(2, "a b d"), (10, "a c d")], [(10, "a b d")]),
    # a hires pass (10 steps after 20) schedules as the first pass: over its 20 steps
    ("a [b:15] c", 20, [(15, "a  c"), (20, "a b c")], [(10, "a b c")]),
    ("a [b:0.5] c", 20, [(10, "a  c"), (20, "a b c")], [(10, "a b c")]),
])
def test_old_prompt_editing_timelines(prompt, base, expected, new):
  """A1111's Old prompt editing timelines (`use_old_scheduling`, its counting before 1.6)."""
  assert prompt_schedule(prompt, 10, base, old_timelines=True) == expected
  assert prompt_schedule(prompt, 10, base) == new


def test_schedule_stale_docstring_example():
  # The docstring says [[5, 'a  c'], [10, 'a {b|d{ c']] ("not handling this right now"), but with
  # A1111's grammar (lark 1.1.2, its pinned version, and later ones) `|` outside an alternation is
  # a syntax error, so A1111 encodes the prompt as written. sdjax does what A1111 does.
  assert prompt_schedule("a [{b|d{:.5] c", 10) == [(10, "a [{b|d{:.5] c")]


def test_schedule_module_comment_example():
  prompt = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
            "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]")
  assert prompt_schedule(prompt, 100) == [
      (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
      (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
      (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
      (75, "fantasy landscape with a lake and an oak in background masterful"),
      (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
  ]


def test_schedule_index_counts_denoiser_calls():
  # get_learned_conditioning's docstring: 'a [blue:green:5] jeweled crown' at 20 steps.
  schedule = prompt_schedule("a [blue:green:5] jeweled crown", 20)
  assert schedule == [(5, "a blue jeweled crown"), (20, "a green jeweled crown")]
  ends = [end for end, _ in schedule]
  # A1111's denoiser counts calls from 0 and keeps an entry while the count is <= its end.
  assert [prompts.schedule_index(ends, c) for c in range(8)] == [0] * 6 + [1] * 2
  assert prompts.schedule_index(ends, 25) == 0  # past every end: the first entry, as A1111


# -- extra networks: modules/extra_networks.py -----------------------------------------------------
def test_extra_networks_removed_in_order():
  text, found = prompts.extract_extra_networks(
      "1girl, <hypernet:agm:1.1> <extrasupernet:master:12:13:14> <hypernet:ray>")
  assert text == "1girl,   "
  assert found == [("hypernet", ("agm", "1.1")), ("extrasupernet", ("master", "12", "13", "14")),
                   ("hypernet", ("ray",))]


def test_comments():
  """A1111's comments: `#` to the end of the line; a tag inside one does nothing."""
  assert prompts.strip_comments("a cat # on a mat") == "a cat \n"
  assert prompts.strip_comments("# setting\na cat\n#style: oil\nBREAK a dog # old") == (
      "\na cat\nBREAK a dog \n")
  assert prompts.strip_comments("no comment") == "no comment"
  text, tags = prompts.lora_tags("<lora:a:0.5> a cat # <lora:b:1>")
  assert text == " a cat \n" and [t.name for t in tags] == ["a"]


def test_lora_tags():
  text, tags = prompts.lora_tags(
      "a <lora:one> b <lora:two:0.5> <lora:three:0.2:0.9><lora:four:te=0.3:unet=0.7> <hn:x:1>")
  assert text == "a  b   "
  assert tags == (prompts.LoraTag("one", 1.0, 1.0), prompts.LoraTag("two", 0.5, 0.5),
                  prompts.LoraTag("three", 0.2, 0.9), prompts.LoraTag("four", 0.3, 0.7))
  with pytest.raises(prompts.PromptError, match="bad multiplier in <lora:x:strong>"):
    prompts.lora_tags("<lora:x:strong>")


@pytest.mark.parametrize("prompt, found", [
    ("a cat AND a dog", "AND"),
    ("a cat AND a dog :1.2", "AND"),
    ("a cat: 1.5", "a trailing ':weight'"),
    ("a city at 5:30", "a trailing ':weight'"),  # A1111 reads this as weight 30 too
    ("a (cat:1.2)", None),
    ("a cat and a dog", None),  # only the upper-case word separates
    ("ANDROID, BRANDY", None),
    ("[cat:dog:0.5]", None),
])
def test_composable_syntax_is_named(prompt, found):
  assert prompts.composable_syntax(prompt) == found


# -- chunked, weighted encoding against A1111's description on transformers' CLIPTextModel --------
CAT, DOG = "cat ", "dog "


@pytest.fixture(scope="module", params=["<|endoftext|>", "!"], ids=["sd1_pad_eos", "sd2_pad"])
def clip(request, tmp_path_factory):
  import torch

  from sdjax.models.clip import CLIPTextConfig, CLIPTextModel

  torch.set_num_threads(1)
  folder = str(tmp_path_factory.mktemp("tokenizer"))
  testing.write_tokenizer(folder, pad_token=request.param)
  tok = testing.torch_tokenizer(folder)
  tm = testing.torch_clip(testing.clip_config("quick_gelu"), seed=3)
  fm = CLIPTextModel(CLIPTextConfig.from_dict(tm.config.to_dict()))
  params = transfer(tm, fm, np.zeros((1, 77), np.int32))

  @jax.jit
  def encode_all(ids, vectors, where):
    return fm.apply({"params": params}, ids, None, (vectors, where))["prompt_embeds"]

  def encode(ids, token_embeds):  # one compiled shape for every test: no-op vectors if none
    if token_embeds is None:
      token_embeds = (jnp.zeros((*ids.shape, 32)), jnp.zeros(ids.shape, bool))
    return encode_all(ids, *token_embeds)

  return tok, tm, encode


def _expected_chunk(tok, pieces):
  """One 77-token chunk written out by hand: pieces of (word or token id, weight, repeat)."""
  ids, weights = [tok.bos_token_id], [1.0]
  for word, weight, n in pieces:
    token = word if isinstance(word, int) else tok.convert_tokens_to_ids(word + "</w>")
    ids += [token] * n
    weights += [weight] * n
  ids.append(tok.eos_token_id)
  pad = tok.pad_token_id
  return ids + [pad] * (77 - len(ids)), weights + [1.0] * (77 - len(weights))


def _torch_conditioning(tm, variants, fixes=(), normalize=True):
  """A1111's recipe: per chunk, encode every variant's chunk as a batch, weight, restore mean
  (not with `normalize` False: A1111's "No norm" emphasis)."""
  import torch

  emb = tm.embeddings if hasattr(tm, "embeddings") else tm.text_model.embeddings
  original = emb.token_embedding

  class WithFixes(torch.nn.Module):  # A1111's EmbeddingsWithFixes: vectors over placeholders
    def forward(self, ids):
      out = original(ids).clone()
      for row, at, vectors in fixes_now:
        out[row, at:at + len(vectors)] = torch.from_numpy(vectors)
      return out

  chunks = []
  emb.token_embedding = WithFixes()
  try:
    for c in range(len(variants[0])):
      fixes_now = [(v, at, vec) for (v, k, at, vec) in fixes if k == c]
      ids = torch.tensor([variant[c][0] for variant in variants])
      weights = torch.tensor([variant[c][1] for variant in variants], dtype=torch.float32)
      with torch.no_grad():
        z = tm(ids).last_hidden_state.double()
      # In float64: the mean of CLIP's output is near zero, so a float32 mean (A1111's) carries
      # a relative rounding error of ~1e-5 of its own.
      weighted = z * weights.double()[..., None]
      chunks.append(weighted * (z.mean() / weighted.mean()) if normalize else weighted)
  finally:
    emb.token_embedding = original
  return torch.cat(chunks, dim=1).numpy()  # V, K*77, D


def _check(clip, prompt, variants, embeddings=None, fixes=(), emphasis="Original"):
  """Packs `prompt` in a batch of 2 variants x 2 chunks (padding included) and compares."""
  tok, tm, encode = clip
  batch = prompts.pack_prompts([prompt], tok, steps=10, calls=10, embeddings=embeddings,
                               chunks=2, variants=2, emphasis=emphasis)
  v, k = len(variants), len(variants[0])
  assert batch.chunks[0] == k and (batch.counts[0] > 0).sum() == v
  np.testing.assert_array_equal(batch.ids[0, :v, :k],
                                np.asarray([[chunk[0] for chunk in v] for v in variants]))
  np.testing.assert_array_equal(batch.weights[0, :v, :k],
                                np.asarray([[chunk[1] for chunk in v] for v in variants],
                                           np.float32))
  ours = prompts.encode_weighted(encode, jax.tree.map(jnp.asarray, batch))[0, :v, :k * 77]
  return assert_close(ours, _torch_conditioning(tm, variants, fixes, emphasis != "No norm"))


def test_weights_and_break(clip):
  tok = clip[0]
  _check(clip, "a (red:1.5) [cat] BREAK dog, house", [[
      _expected_chunk(tok, [("a", 1.0, 1), ("red", 1.5, 1), ("cat", 1 / 1.1, 1)]),
      _expected_chunk(tok, [("dog", 1.0, 1), (",", 1.0, 1), ("house", 1.0, 1)])]])


def test_comfyui_emphasis(clip):
  """ComfyUI's weighting (comfy/sd1_clip.py's encode_token_weights): the empty prompt encoded
  beside the chunks; a token of weight w != 1 becomes (z - z_empty) * w + z_empty at its
  position, every other token its plain output; chunks concatenated, no mean restored."""
  import torch

  tok, tm, encode = clip
  prompt = "a (red:1.5) [cat] BREAK dog"  # parsed as A1111's syntax reads it
  chunks = [_expected_chunk(tok, [("a", 1.0, 1), ("red", 1.5, 1), ("cat", 1 / 1.1, 1)]),
            _expected_chunk(tok, [("dog", 1.0, 1)])]
  empty = _expected_chunk(tok, [])[0]
  batch = prompts.pack_prompts([prompt], tok, steps=10, calls=10, chunks=2, variants=2,
                               emphasis="ComfyUI")
  assert batch.empty_ids == tuple(empty)
  ours = prompts.encode_weighted(encode, jax.tree.map(jnp.asarray, batch))[0, 0]
  with torch.no_grad():
    z = tm(torch.tensor([ids for ids, _ in chunks] + [empty])).last_hidden_state.double()
  weights = torch.tensor([w for _, w in chunks], dtype=torch.float64)[..., None]
  want = torch.where(weights != 1, (z[:2] - z[2:]) * weights + z[2:], z[:2])
  err = assert_close(ours, want.reshape(1, 2 * 77, -1)[0].numpy())
  original = prompts.encode_weighted(encode, jax.tree.map(jnp.asarray, prompts.pack_prompts(
      [prompt], tok, steps=10, calls=10, chunks=2, variants=2)))[0, 0]
  assert rel_err(original, ours) > 1e-3  # a weighting of its own
  print(f"\nComfyUI emphasis rel err {err:.2e}")


def test_emphasis_modes(clip):
  """A1111's emphasis modes: "No norm" weights without restoring the mean, "Ignore" parses
  (BREAK still splits) but leaves the weights out, "None" reads brackets and BREAK as text."""
  tok = clip[0]
  prompt = "a (red:1.5) [cat] BREAK dog"
  weighted = [_expected_chunk(tok, [("a", 1.0, 1), ("red", 1.5, 1), ("cat", 1 / 1.1, 1)]),
              _expected_chunk(tok, [("dog", 1.0, 1)])]
  err = _check(clip, prompt, [weighted], emphasis="No norm")
  original = prompts.encode_weighted(clip[2], jax.tree.map(jnp.asarray, prompts.pack_prompts(
      [prompt], tok, steps=10, calls=10)))
  no_norm = prompts.encode_weighted(clip[2], jax.tree.map(jnp.asarray, prompts.pack_prompts(
      [prompt], tok, steps=10, calls=10, emphasis="No norm")))
  assert rel_err(no_norm, original) > 1e-3  # the mean restoration matters at these weights
  print(f"\nNo norm rel err {err:.2e}")
  _check(clip, prompt, [[_expected_chunk(tok, [("a", 1.0, 1), ("red", 1.0, 1), ("cat", 1.0, 1)]),
                         _expected_chunk(tok, [("dog", 1.0, 1)])]], emphasis="Ignore")
  literal = tok(prompt, add_special_tokens=False)["input_ids"]
  _check(clip, prompt, [[_expected_chunk(tok, [(t, 1.0, 1) for t in literal])]], emphasis="None")
  with pytest.raises(prompts.PromptError, match="unknown emphasis 'no-norm'"):
    prompts.pack_prompts([prompt], tok, emphasis="no-norm")


def test_long_prompt_comma_backtrack(clip):
  tok = clip[0]
  # 70 weighted cats, a comma and 10 dogs: the chunk fills 4 dogs after the comma, which is
  # within 20 tokens, so those dogs move on to the second chunk.
  _check(clip, "(" + CAT * 70 + ":1.2), " + DOG * 10, [[
      _expected_chunk(tok, [("cat", 1.2, 70), (",", 1.0, 1)]),
      _expected_chunk(tok, [("dog", 1.0, 10)])]])
  # A comma 25 tokens back is too far: the chunk is cut at 75 tokens.
  _check(clip, CAT * 50 + ", " + DOG * 30, [[
      _expected_chunk(tok, [("cat", 1.0, 50), (",", 1.0, 1), ("dog", 1.0, 24)]),
      _expected_chunk(tok, [("dog", 1.0, 6)])]])


def test_schedule_variants_share_the_mean(clip):
  tok = clip[0]
  # The two texts of the schedule are one batch for the mean; the short one gets an empty chunk.
  long_cat = [_expected_chunk(tok, [("cat", 1.0, 75)]), _expected_chunk(tok, [("cat", 1.0, 5),
                                                                               ("red", 1.3, 1)])]
  dog = [_expected_chunk(tok, [("dog", 1.0, 1), ("red", 1.3, 1)]), _expected_chunk(tok, [])]
  err = _check(clip, "[" + CAT * 80 + ":dog:2](red:1.3)", [long_cat, dog])
  print(f"\nscheduled long prompt conditioning rel err {err:.2e}")


def test_embedding_triggers(clip):
  tok, tm, _ = clip
  vectors = np.random.default_rng(5).standard_normal((3, 32)).astype(np.float32)
  # A trigger takes one position per vector, weighted as its run.
  _check(clip, "a (house:1.2) cat", [[_expected_chunk(tok, [("a", 1.0, 1), (0, 1.2, 3),
                                                            ("cat", 1.0, 1)])]],
         {"house": vectors}, fixes=[(0, 0, 2, vectors)])
  # One that does not fit in the chunk starts the next.
  _check(clip, CAT * 73 + "house", [[_expected_chunk(tok, [("cat", 1.0, 73)]),
                                     _expected_chunk(tok, [(0, 1.0, 3)])]],
         {"house": vectors}, fixes=[(0, 1, 1, vectors)])


def test_pooled_output_from_first_chunk(clip):
  """An encoder with a pooled output (SDXL's second) gives each variant's first-chunk pool."""
  tok = clip[0]
  batch = prompts.pack_prompts(["[" + CAT * 80 + ":dog:2]"], tok, steps=10, calls=10)

  def encode(ids, token_embeds):  # pooled = the ids themselves, to see which chunk it came from
    return jnp.ones((*ids.shape, 4)), ids.astype(jnp.float32)

  context, pooled = prompts.encode_weighted(encode, jax.tree.map(jnp.asarray, batch))
  assert context.shape == (1, 2, 2 * 77, 4)
  np.testing.assert_array_equal(pooled[0], batch.ids[0, :, 0])


# -- through generate(): schedules switch at A1111's calls; padding is masked ---------------------
@pytest.fixture(scope="module")
def sd(tmp_path_factory):
  import diffusers
  import torch

  torch.set_num_threads(1)
  folder = str(tmp_path_factory.mktemp("sd1") / "pipe")
  testing.write_torch_pipeline(folder, "sd1", seed=4)
  ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
  return ref, sdjax.load_pipeline(folder)


def _torch_loop(ref, cond_at, uncond, latents, guidance, scheduler_cls, steps):
  """diffusers' UNet and scheduler in a plain loop whose conditioning is picked per UNet call."""
  import diffusers
  import torch

  sched = getattr(diffusers, scheduler_cls).from_config(ref.scheduler.config)
  sched.set_timesteps(steps)
  x = nchw(latents) * sched.init_noise_sigma
  with torch.no_grad():
    for call, t in enumerate(sched.timesteps):
      x_in = sched.scale_model_input(torch.cat([x, x]), t)
      context = torch.cat([uncond, cond_at(call)]).float()
      eps_uncond, eps_cond = ref.unet(x_in, t, encoder_hidden_states=context).sample.chunk(2)
      x = sched.step(eps_uncond + guidance * (eps_cond - eps_uncond), t, x).prev_sample
    images = ref.vae.decode(x / ref.vae.config.scaling_factor).sample
  return nhwc((images / 2 + 0.5).clamp(0, 1))


def test_scheduled_prompt_image_matches_torch_loop(sd):
  """Heun (2 calls a step, A1111 doubles the schedule's steps): 3 steps are 5 UNet calls and
  a schedule over 6 steps; `[red:(blue:1.3):3]` is red for calls 0-3 and weighted blue after."""
  ref, pipe = sd
  tok = ref.tokenizer
  variants = [[_expected_chunk(tok, [("a", 1.0, 1), ("red", 1.0, 1), ("circle", 1.0, 1)])],
              [_expected_chunk(tok, [("a", 1.0, 1), ("blue", 1.3, 1), ("circle", 1.0, 1)])]]
  import torch

  cond = torch.from_numpy(_torch_conditioning(ref.text_encoder, variants))
  uncond = torch.from_numpy(_torch_conditioning(ref.text_encoder, [[_expected_chunk(tok, [])]]))
  latents = np.random.default_rng(7).standard_normal((1, 8, 8, 4)).astype(np.float32)
  expected = _torch_loop(ref, lambda call: cond[:1] if call <= 3 else cond[1:], uncond, latents,
                         10.0, "HeunDiscreteScheduler", 3)
  ours = pipe.generate("a [red:(blue:1.3):3] circle", steps=3, scheduler="heun",
                       guidance_scale=10.0, height=16, width=16, latents=latents,
                       prompt_syntax="a1111")
  err = assert_close(ours, expected, 1e-4)
  # The schedule matters: switching one call later is a visibly different image.
  late = _torch_loop(ref, lambda call: cond[:1] if call <= 4 else cond[1:], uncond, latents,
                     10.0, "HeunDiscreteScheduler", 3)
  print(f"\nscheduled heun image rel err {err:.2e} (switching a call late: "
        f"{rel_err(late, expected):.2e})")
  assert rel_err(late, expected) > 100 * err


def test_composable_prompt_image_matches_torch_loop(sd):
  """A1111's composable diffusion: parts between ANDs with trailing weights, each scheduled on
  its own; a part shorter than the longest repeats its last vector (A1111's padding); the
  uncond (one chunk) is its own UNet call; guidance adds (part - uncond) * weight * scale."""
  import diffusers
  import torch

  ref, pipe = sd
  tok = ref.tokenizer
  prompt = "a [red:blue:1] circle AND a green square BREAK a cat :0.6 AND a blue square:-0.4"
  assert prompts.composable_parts(prompt) == [
      ("a [red:blue:1] circle", 1.0), (" a green square BREAK a cat", 0.6),
      (" a blue square", -0.4)]

  def cond(*chunks):
    return torch.from_numpy(_torch_conditioning(
        ref.text_encoder, [[_expected_chunk(tok, [(w, 1.0, 1) for w in c]) for c in chunks]]))

  def pad(c):  # to two chunks by repeating the last vector
    return torch.cat([c, c[:, -1:].repeat(1, 77, 1)], dim=1)

  red, blue = pad(cond(["a", "red", "circle"])), pad(cond(["a", "blue", "circle"]))
  long, square = cond(["a", "green", "square"], ["a", "cat"]), pad(cond(["a", "blue", "square"]))
  uncond = cond([])
  latents = np.random.default_rng(11).standard_normal((1, 8, 8, 4)).astype(np.float32)

  def loop(weights, switch_after=1):
    sched = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    sched.set_timesteps(3)
    x = nchw(latents) * sched.init_noise_sigma
    with torch.no_grad():
      for call, t in enumerate(sched.timesteps):
        x_in = sched.scale_model_input(x, t)
        parts = [red if call <= switch_after else blue, long, square]
        eps_u = ref.unet(x_in, t, encoder_hidden_states=uncond.float()).sample
        eps = eps_u.clone()
        for c, w in zip(parts, weights, strict=True):
          eps_c = ref.unet(x_in, t, encoder_hidden_states=c.float()).sample
          eps += (eps_c - eps_u) * (w * 10.0)
        x = sched.step(eps, t, x).prev_sample
      images = ref.vae.decode(x / ref.vae.config.scaling_factor).sample
    return nhwc((images / 2 + 0.5).clamp(0, 1))

  expected = loop([1.0, 0.6, -0.4])
  kw = dict(steps=3, scheduler="euler", guidance_scale=10.0, height=16, width=16,
            prompt_syntax="a1111")
  ours = pipe.generate(prompt, latents=latents, **kw)
  err = assert_close(ours, expected, 1e-4)
  print(f"\ncomposable prompt image rel err {err:.2e}")
  for other in (loop([1.0, 1.0, 1.0]), loop([1.0, 0.6, -0.4], switch_after=2)):
    assert rel_err(other, expected) > 100 * err  # weights and per-part schedules matter
  # Beside plain prompts (whose batch gets weight-0 parts): each image is what it is alone, to
  # the rounding of a 12-row UNet batch against 2 rows, times guidance 10 (seen: 2.4e-6).
  batch = pipe.generate(["a red circle", prompt, "a cat:1.5"], seed=5, **kw)
  for i, p in enumerate(["a red circle", prompt, "a cat:1.5"]):
    np.testing.assert_allclose(batch[i], pipe.generate(p, seed=5 + i, **kw)[0], atol=1e-5)
  with pytest.raises(ValueError, match="composable prompts .* guidance_rescale"):
    pipe.generate(prompt, guidance_rescale=0.5, **kw)


def test_pad_conds_match_torch_loop(sd):
  """A1111's Pad conds: where the prompt and negative prompt have different chunk counts, the
  shorter goes on with the empty prompt's encoding (cond_stage_model_empty_prompt), attended to;
  Pad conds v0: the negative prompt takes the prompt's length, its last vector repeated, or cut.
  (Without either the shorter attends to its own chunks: another image.) With composable parts
  the padding follows each part's own (its last vector repeated to the longest part's length)."""
  import torch

  ref, pipe = sd
  tok = ref.tokenizer

  def cond(*chunks):
    return torch.from_numpy(_torch_conditioning(
        ref.text_encoder, [[_expected_chunk(tok, [(w, 1.0, 1) for w in c]) for c in chunks]]))

  def repeat_last(c, n=1):
    return torch.cat([c, c[:, -1:].repeat(1, 77 * n, 1)], dim=1)

  long, short, empty = cond(["a", "red", "circle"], ["a", "cat"]), cond(["blue"]), cond([])
  latents = np.random.default_rng(12).standard_normal((1, 8, 8, 4)).astype(np.float32)

  def loop(c, u):
    return _torch_loop(ref, lambda call: c, u, latents, 7.0, "EulerDiscreteScheduler", 3)

  kw = dict(steps=3, scheduler="euler", guidance_scale=7.0, height=16, width=16, latents=latents,
            prompt_syntax="a1111")
  text = "a red circle BREAK a cat"
  cases = [(dict(pad_cond_uncond=True), loop(long, torch.cat([short, empty], 1)),
            loop(torch.cat([short, empty], 1), long)),
           (dict(pad_cond_uncond_v0=True), loop(long, repeat_last(short)),
            loop(short, long[:, :77]))]
  errs = []
  for options, negative_shorter, negative_longer in cases:
    errs.append(assert_close(pipe.generate(text, negative_prompts="blue", **options, **kw),
                             negative_shorter, 1e-4))
    errs.append(assert_close(pipe.generate("blue", negative_prompts=text, **options, **kw),
                             negative_longer, 1e-4))
  unpadded = (pipe.generate(text, negative_prompts="blue", **kw),
              pipe.generate("blue", negative_prompts=text, **kw))
  print(f"\npad conds rel errs {', '.join(f'{e:.1e}' for e in errs)}")
  for _, negative_shorter, negative_longer in cases:
    assert rel_err(unpadded[0], negative_shorter) > 100 * max(errs)
    assert rel_err(unpadded[1], negative_longer) > 100 * max(errs)

  # Composable: parts of 1 and 2 chunks under a negative prompt of 3.
  red, cat = repeat_last(cond(["a", "red", "circle"])), cond(["a", "dog"], ["a", "cat"])
  negative = cond(["blue"], ["green"], ["a", "cat"])
  parts = [torch.cat([red, empty], 1), torch.cat([cat, empty], 1)]
  import diffusers

  sched = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
  sched.set_timesteps(3)
  x = nchw(latents) * sched.init_noise_sigma
  with torch.no_grad():
    for t in sched.timesteps:
      x_in = sched.scale_model_input(x, t)
      eps_u = ref.unet(x_in, t, encoder_hidden_states=negative.float()).sample
      eps = eps_u.clone()
      for c, w in zip(parts, (1.0, 0.5), strict=True):
        eps += (ref.unet(x_in, t, encoder_hidden_states=c.float()).sample - eps_u) * (w * 7.0)
      x = sched.step(eps, t, x).prev_sample
    expected = nhwc((ref.vae.decode(x / ref.vae.config.scaling_factor).sample / 2 + 0.5)
                    .clamp(0, 1))
  ours = pipe.generate("a red circle AND a dog BREAK a cat :0.5",
                       negative_prompts="blue BREAK green BREAK a cat", pad_cond_uncond=True,
                       **kw)
  err = assert_close(ours, expected, 1e-4)
  print(f"composable pad conds rel err {err:.1e}")


def test_old_prompt_editing_timelines_reach_generate(sd):
  """generate(old_prompt_editing_timelines=True): `[a:b:1.0]` switches after step 1, as `[a:b:1]`
  does in today's counting (where 1.0 is the whole run: no switch); it needs the A1111 syntax."""
  _, pipe = sd
  kw = dict(steps=3, scheduler="euler", guidance_scale=7.5, height=16, width=16, seed=3,
            prompt_syntax="a1111")
  old = pipe.generate("a [red circle:dog:1.0]", old_prompt_editing_timelines=True, **kw)
  np.testing.assert_array_equal(old, pipe.generate("a [red circle:dog:1]", **kw))
  assert np.abs(old - pipe.generate("a [red circle:dog:1.0]", **kw)).max() > 1e-4
  with pytest.raises(ValueError, match="prompt_syntax='a1111'"):
    pipe.generate("a cat", old_prompt_editing_timelines=True, **{**kw, "prompt_syntax": "plain"})


def test_emphasis_reaches_generate(sd):
  """generate(emphasis=...): "Ignore" is the prompt without its weights, "None" reads the
  brackets as words, "No norm" is neither; the mode needs prompt_syntax="a1111". Comments."""
  _, pipe = sd
  kw = dict(steps=2, scheduler="euler", guidance_scale=7.5, height=16, width=16, seed=3,
            prompt_syntax="a1111")
  weighted, plain = "(a red circle:1.6)", "a red circle"
  ignore = pipe.generate(weighted, emphasis="Ignore", **kw)
  np.testing.assert_array_equal(ignore, pipe.generate(plain, **kw))
  original = pipe.generate(weighted, **kw)
  no_norm = pipe.generate(weighted, emphasis="No norm", **kw)
  literal = pipe.generate(weighted, emphasis="None", **kw)
  for a, b in ((original, ignore), (no_norm, original), (literal, ignore)):
    assert rel_err(a, b) > 1e-4  # seen: 4.8e-3, 1.5e-3, 4.7e-2; rounding alone is ~1e-7
  np.testing.assert_array_equal(pipe.generate(weighted.replace("(", "\\(").replace(")", "\\)"),
                                              **kw), literal)  # escaped brackets are text too
  # A comment (a1111 syntax) is not part of the prompt; in plain syntax it is text.
  np.testing.assert_array_equal(pipe.generate(plain + " # (blue:1.5) square", **kw),
                                pipe.generate(plain, **kw))
  commented = pipe.generate(plain + " # blue square", **{**kw, "prompt_syntax": "plain"})
  assert rel_err(commented, pipe.generate(plain, **{**kw, "prompt_syntax": "plain"})) > 1e-4
  with pytest.raises(ValueError, match="emphasis 'No norm' is a mode of prompt_syntax='a1111'"):
    pipe.generate(weighted, emphasis="No norm", **{**kw, "prompt_syntax": "plain"})


def test_a1111_plain_prompt_same_pixels_and_mixed_batch(sd):
  """A plain prompt under A1111 syntax is plain's pixels, bit for bit; a batch of prompts of
  different chunk counts makes each image what it makes alone. (In a process with XLA:CPU's
  default emitters: the classic ones round the two syntaxes' programs 1.8e-6 apart.)"""
  _, pipe = sd
  code = """
import sys
import numpy as np
import sdjax
pipe = sdjax.load_pipeline(sys.argv[1])
kw = dict(steps=2, scheduler="euler", guidance_scale=7.5, height=16, width=16, seed=3)
plain = ["a red circle", "a photo of a cat"]
np.testing.assert_array_equal(pipe.generate(plain, **kw, prompt_syntax="a1111"),
                              pipe.generate(plain, **kw))
# A long BREAK prompt (2 chunks) beside an alternating one (1 chunk), with negatives of other
# lengths: each image is what it is alone (one compile serves both lone images), to the
# rounding of programs of another batch size: up to 2e-6 on AVX-512 CPUs, 2.1e-6 on an
# AVX2-only EPYC (the same at the commit before IP-Adapters); what the check is for moves them
# far more (the prompt truncated to its first chunk, below: over 1e-3).
long = "a (red:1.2) circle, " * 20 + "BREAK a [cat|dog]"
prompts_ = [long, "a [photo|painting] of a (cat:0.8)"]
negatives = ["[blue:green:1]", "[green:yellow:1], " * 30]
batch = pipe.generate(prompts_, negative_prompts=negatives, **kw, prompt_syntax="a1111")
for i in range(2):
  alone = pipe.generate(prompts_[i], negative_prompts=negatives[i], **{**kw, "seed": 3 + i},
                        prompt_syntax="a1111")
  np.testing.assert_allclose(batch[i], alone[0], atol=1e-5)
truncated = pipe.generate(prompts_, negative_prompts=negatives, **kw)
assert not np.allclose(batch[0], truncated[0], atol=1e-3)
print("ok")
"""
  assert run_default_codegen(code, pipe.name).split() == ["ok"]


def test_sdxl_composable_prompt_matches_torch_loop(tmp_path):
  """SDXL parts: each its own context and pooled embeds (diffusers' encode_prompt of the part),
  the micro-conditioning for every part, combined as A1111 combines them."""
  import diffusers
  import torch

  torch.set_num_threads(1)
  folder = str(tmp_path / "sdxl")
  ref, _ = testing.write_torch_sdxl(folder, seed=6)
  pipe = sdjax.load_pipeline(f"{folder}/base")
  parts = [("a red circle", 1.0), ("a photo of a cat", 0.5)]
  latents = np.random.default_rng(2).standard_normal((1, 8, 12, 4)).astype(np.float32)
  with torch.no_grad():
    encoded = [ref.encode_prompt(p, device="cpu", do_classifier_free_guidance=True)
               for p, _ in parts]
    time_ids = torch.tensor([[16.0, 24.0, 0.0, 0.0, 16.0, 24.0]])
    sched = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    sched.set_timesteps(3)
    x = nchw(latents) * sched.init_noise_sigma
    for t in sched.timesteps:
      x_in = sched.scale_model_input(x, t)

      def unet(context, pooled, x_in=x_in, t=t):
        return ref.unet(x_in, t, encoder_hidden_states=context, added_cond_kwargs={
            "text_embeds": pooled, "time_ids": time_ids}).sample

      eps_u = unet(encoded[0][1], encoded[0][3])  # zeros: no negative prompt (SDXL base)
      eps = eps_u.clone()
      for (context, _, pooled, _), (_, w) in zip(encoded, parts, strict=True):
        eps += (unet(context, pooled) - eps_u) * (w * 5.0)
      x = sched.step(eps, t, x).prev_sample
    vae = ref.vae.config  # this VAE has latents_mean / latents_std
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (vae.latents_mean, vae.latents_std))
    images = ref.vae.decode(x * std / vae.scaling_factor + mean).sample
  expected = nhwc((images / 2 + 0.5).clamp(0, 1))
  ours = pipe.generate("a red circle AND a photo of a cat:0.5", steps=3, scheduler="euler",
                       height=16, width=24, guidance_scale=5.0, latents=latents,
                       prompt_syntax="a1111")
  err = assert_close(ours, expected, 1e-4)
  print(f"\nSDXL composable prompt image rel err {err:.2e}")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
  """A tiny random SDXL base and refiner folder, and the base loaded."""
  folder = str(tmp_path_factory.mktemp("sdxl"))
  testing.write_torch_sdxl(folder, seed=5)
  return folder, sdjax.load_pipeline(f"{folder}/base")


def test_sdxl_base_and_refiner(sdxl):
  """SDXL: both encoders chunked and weighted, pooled embeds of the first chunk; within 75
  tokens A1111 syntax gives plain's pixels, through the refiner handoff too."""
  folder, base = sdxl
  kw = dict(steps=3, scheduler="euler", height=16, width=24, guidance_scale=5.0, seed=1,
            refiner=sdjax.load_pipeline(f"{folder}/refiner"))
  prompts_, negatives = ["a red circle", "a photo of a cat"], ["blue", None]
  plain = base.generate(prompts_, negative_prompts=negatives, **kw)
  ours = base.generate(prompts_, negative_prompts=negatives, **kw, prompt_syntax="a1111")
  np.testing.assert_allclose(ours, plain, atol=2e-6)
  weighted = base.generate(["a (red:1.4) circle, " * 14 + "BREAK [cat|dog]", prompts_[1]],
                           negative_prompts=negatives, **kw, prompt_syntax="a1111")
  assert np.isfinite(weighted).all() and not np.allclose(weighted[0], plain[0], atol=1e-3)
  np.testing.assert_allclose(weighted[1], plain[1], atol=2e-6)  # its batch mate is masked
  seconds = dict(prompts_2=["a dog", "green tree"], negative_prompts_2=["sky", "blue"])
  plain = base.generate(prompts_, negative_prompts=negatives, **seconds, **kw)
  ours = base.generate(prompts_, negative_prompts=negatives, **seconds, **kw,
                       prompt_syntax="a1111")
  np.testing.assert_allclose(ours, plain, atol=2e-6)


def test_sdxl_prompts_2_of_other_lengths(sdxl):
  """A prompt and a prompts_2 of different chunk counts: the shorter encoder's text goes on with
  empty chunks and the image attends to every chunk (as ComfyUI pads its text_l / text_g to one
  length): each encoder's context is its text's as alone, padded as a shorter batch mate's."""
  _, base = sdxl
  long, short = "a red circle, " * 20, "a cat"
  opts = sampling.A1111(steps=1, calls=1)

  def encoded(texts, texts_2=None):
    cond = sampling.make_conditioning(base, texts, [None, None], prompts_2=texts_2,
                                      size=(16, 24), a1111=opts)
    assert cond.prompt.ids.ids.shape[2] == 2  # two chunks
    return conditioning.encode(base.networks, base.params, jax.tree.map(jnp.asarray, cond))[1]

  ours, alone = encoded([long, short], [short, long]), encoded([long, short])
  width = base.text_encoder.config.hidden_size
  for row, mate in ((0, 1), (1, 0)):
    np.testing.assert_allclose(ours.context[row, ..., :width], alone.context[row, ..., :width],
                               atol=1e-6)
    np.testing.assert_allclose(ours.context[row, ..., width:], alone.context[mate, ..., width:],
                               atol=1e-6)
    np.testing.assert_allclose(ours.text_embeds[row], alone.text_embeds[mate], atol=1e-6)
  assert not np.asarray(ours.context_bias).any()  # both rows attend both chunks
  assert np.asarray(alone.context_bias)[1].min() < 0  # alone, the short one hides its padding
