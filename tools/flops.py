"""Model FLOPs of a JAX program, for tools/benchmark.py's TFLOP/s and MFU."""

from __future__ import annotations

import math

import jax


def jaxpr_flops(jaxpr) -> float:
  """FLOPs (2 per multiply-add) of the matmuls and convolutions in a (closed) jaxpr, each loop's
  body times its trip count and a conditional's costliest branch: the model FLOPs of MFU.
  XLA's cost analysis counts a loop body once, which misses all steps but one of the sampler's
  scan and all query blocks but one of the blocked attention."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    out = eqn.outvars[0].aval.shape if eqn.outvars else ()
    if name == "dot_general":
      (contracting, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(out) * math.prod(lhs[d] for d in contracting)
    elif name == "conv_general_dilated":
      kernel, spec = eqn.invars[1].aval.shape, eqn.params["dimension_numbers"].rhs_spec
      total += 2.0 * math.prod(out) * math.prod(kernel[d] for d in spec[1:])  # in/group x window
    elif name == "while":
      raise ValueError("jaxpr_flops: a while loop's trip count is unknown")
    subs = [v for v in eqn.params.values() if _is_jaxpr(v)]
    subs += [x for v in eqn.params.values() if isinstance(v, tuple | list) for x in v
             if _is_jaxpr(x)]
    if name == "cond":
      total += max(jaxpr_flops(b) for b in subs)
    else:
      total += (eqn.params["length"] if name == "scan" else 1) * sum(jaxpr_flops(j) for j in subs)
  return total


def _is_jaxpr(value) -> bool:
  return isinstance(value, jax.extend.core.Jaxpr | jax.extend.core.ClosedJaxpr)
