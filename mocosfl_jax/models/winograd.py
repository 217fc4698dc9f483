"""Winograd F(m x m, 3 x 3) convolution with a custom VJP, for XLA:CPU (stride 1, padding 1).

Why: on CPU the training step is bound by 3x3 convolutions, and XLA:CPU's own weight-gradient
convolution is slow. Winograd F(4x4, 3x3) needs 36 multiplies per 4x4 output tile and
input/output channel pair instead of 144 (4x fewer), F(2x2, 3x3) 16 instead of 36 (2.25x); the
rest are additions over tiles (memory-bound). bench/README.md has the measured speed-up.

Forward: Y = A^T [ (G k G^T) . (B^T d B) ] A per tile, written as one batched matmul over the
(m+2)^2 tile positions. Backward (custom VJP): from dM = A dY A^T per tile, dK is V^T dM in the
Winograd domain mapped back by G^T, and dX is dM U^T through the transpose of the input
transform (overlapping tiles added back), so dY is transformed once for both.
The maths equals a direct convolution; only float rounding differs (F(4,3) ~1e-5 relative to
max|y| in float32, F(2,3) ~1e-6; tests/test_winograd.py).

`conv.conv_winograd` decides which convolutions take this path (`applies`) and computes the rest
as shifted-view matmuls. Differs from the reference on purpose: speed only (PyTorch uses oneDNN's
direct convolution).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

# (B^T, G, A^T) of Lavin & Gray (2016) for F(2x2, 3x3) and F(4x4, 3x3).
MATS = {
    2: (np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64),
        np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float64),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)),
    4: (np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                  [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64),
        np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float64),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                  [0, 1, -1, 8, -8, 1]], np.float64)),
}
TILES = tuple(MATS)


MIN_TILES = 128


def applies(kernel_shape, stride: int, padding: int, groups: int = 1, x_shape=None,
            m: int = 4) -> bool:
  """True for the convs this module computes: 3x3, stride 1, padding 1, no groups, and (given
  `x_shape`) at least MIN_TILES output tiles per call, with fewer multiplies than a direct conv.

  Small calls (a vmapped client with batch 1 sees 64 tiles at 32x32) become batches of tiny
  per-tile matmuls that run slower than one shifted-view matmul, so they keep the matmul conv.
  Maps smaller than a tile are padded to whole tiles: a 2x2 map in one F(4x4) tile multiplies
  36 times for 4 outputs, as many as the direct conv's 9 per output, so it keeps the matmul
  conv too (one GEMM with K = 9 Cin instead of 36 with K = Cin, and no transforms).
  """
  if not (tuple(kernel_shape[:2]) == (3, 3) and stride == 1 and padding == 1 and groups == 1):
    return False
  if x_shape is None:
    return True
  th, tw = _tiles(x_shape[1], x_shape[2], m)
  fewer_multiplies = (m + 2) ** 2 * th * tw < 9 * x_shape[1] * x_shape[2]
  return fewer_multiplies and x_shape[0] * th * tw >= MIN_TILES


def _combine(mat, parts):
  """Rows of a constant matrix applied to a list of arrays (zeros skipped, +-1 without mul)."""
  out = []
  for row in mat:
    acc = None
    for c, p in zip(row, parts):
      if c == 0:
        continue
      t = p if c == 1 else (-p if c == -1 else p * np.asarray(c, p.dtype))
      acc = t if acc is None else acc + t
    out.append(acc)
  return out


def _tiles(h: int, w: int, m: int):
  return -(-h // m), -(-w // m)


def input_transform(x: jax.Array, m: int) -> jax.Array:
  """[N, H, W, C] -> [(m+2)^2, N*th*tw, C]: B^T d B of every (m+2)^2 input tile (pad 1)."""
  bt = MATS[m][0]
  a = m + 2
  n, h, w, c = x.shape
  th, tw = _tiles(h, w, m)
  xp = jnp.pad(x, ((0, 0), (1, 1 + th * m - h), (1, 1 + tw * m - w), (0, 0)))
  # B^T over tile rows, stacked, then B^T over tile columns of the stack: 2a slice-and-add
  # passes instead of a + a^2 (XLA:CPU runs each pass as its own fusion, so fewer is faster).
  u = jnp.stack(_combine(bt, [xp[:, i:i + m * (th - 1) + 1:m] for i in range(a)]))
  v = _combine(bt, [u[:, :, :, j:j + m * (tw - 1) + 1:m] for j in range(a)])   # a x [a,n,th,tw,c]
  return jnp.stack(v, 1).reshape(a * a, n * th * tw, c)


def _kernel_mat(m: int) -> np.ndarray:
  """G (x) G: [(m+2)^2, 9], row (a, b) and column (i, j) of G k G^T for a flattened 3x3 k."""
  g = MATS[m][1]
  return np.kron(g, g)


def kernel_transform(kernel: jax.Array, m: int) -> jax.Array:
  """[3, 3, C, O] -> [(m+2)^2, C, O]: G k G^T, as one matmul of G (x) G with [9, C*O].

  The same sums as an einsum over both kernel axes, which XLA:CPU lowers to two dots with
  transposes around them, far slower on the deep layers' large kernels (bench/README.md).
  """
  c, o = kernel.shape[2:]
  gg = jnp.asarray(_kernel_mat(m), kernel.dtype)
  return jnp.dot(gg, kernel.reshape(9, c * o)).reshape((m + 2) ** 2, c, o)


def output_transform(prod: jax.Array, m: int, n: int, h: int, w: int) -> jax.Array:
  """[(m+2)^2, N*th*tw, O] -> [N, H, W, O]: A^T M A per tile, tiles put back in place."""
  at = MATS[m][2]
  a = m + 2
  th, tw = _tiles(h, w, m)
  o = prod.shape[-1]
  prod = prod.reshape(a, a, n, th, tw, o)
  rows = [_combine(at, [r[j] for j in range(a)]) for r in _combine(at, [prod[i] for i in range(a)])]
  y = jnp.stack([jnp.stack(r, axis=3) for r in rows], axis=2)       # [n, th, m, tw, m, o]
  return y.reshape(n, th * m, tw * m, o)[:, :h, :w]


def output_transform_t(dy: jax.Array, m: int) -> jax.Array:
  """Transpose of `output_transform`: dY [N, H, W, O] -> dM [(m+2)^2, N*th*tw, O]."""
  at = MATS[m][2]
  n, h, w, o = dy.shape
  th, tw = _tiles(h, w, m)
  dy = jnp.pad(dy, ((0, 0), (0, th * m - h), (0, tw * m - w), (0, 0)))
  dy = dy.reshape(n, th, m, tw, m, o)
  u = jnp.stack(_combine(at.T, [dy[:, :, r] for r in range(m)]))     # [a, n, th, tw, m, o]
  v = _combine(at.T, [u[:, :, :, :, s] for s in range(m)])           # a x [a, n, th, tw, o]
  return jnp.stack(v, 1).reshape((m + 2) ** 2, n * th * tw, o)


def kernel_transform_t(du: jax.Array, m: int) -> jax.Array:
  """Transpose of `kernel_transform`: [(m+2)^2, C, O] -> [3, 3, C, O]."""
  c, o = du.shape[1:]
  gg = jnp.asarray(_kernel_mat(m).T, du.dtype)
  return jnp.dot(gg, du.reshape((m + 2) ** 2, c * o)).reshape(3, 3, c, o)


def _forward(x, kernel, m):
  n, h, w, _ = x.shape
  prod = jnp.einsum('ktc,kco->kto', input_transform(x, m), kernel_transform(kernel, m))
  return output_transform(prod, m, n, h, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3(x: jax.Array, kernel: jax.Array, m: int = 4) -> jax.Array:
  """NHWC x HWIO 3x3 convolution, stride 1, padding 1 (any H, W; vmappable), Winograd F(m, 3)."""
  return _forward(x, kernel, m)


def _conv3x3_fwd(x, kernel, m):
  return _forward(x, kernel, m), (x, kernel)


def _conv3x3_bwd(m, res, dy):
  # Both gradients start from dM = A dY A^T of every tile (computed once): dW maps
  # V^T dM back by G^T, dX is dM U^T taken back through the input transform's transpose
  # (jax.linear_transpose: the tiles' B dV B^T added where they overlap). One transform of dY
  # fewer than computing dX as a forward Winograd conv of dY with the rotated kernel.
  x, kernel = res
  dm = output_transform_t(dy, m)
  dv = jnp.einsum('kto,kco->ktc', dm, kernel_transform(kernel, m))
  (dx,) = jax.linear_transpose(functools.partial(input_transform, m=m),
                               jax.ShapeDtypeStruct(x.shape, x.dtype))(dv)
  du = jnp.einsum('ktc,kto->kco', input_transform(x, m), dm)
  return dx, kernel_transform_t(du, m)


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)

