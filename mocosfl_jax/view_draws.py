"""The random draws of the two-view augmentation: its constants, the layout of each view's
uniform vector, and the crop's fallback box.

One definition for the two places that apply the draws: the JAX pipeline (data/augment.py),
which draws them, and the numpy pipeline of edge clients (remote/edge_augment.py), which gets
them from the server. The layout is therefore part of the remote protocol. numpy only (no JAX):
devices import it.
"""
import math

PIPELINES = ("mocov2", "mocov1", "none")
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10
JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
P_JITTER, P_GRAY, P_BLUR, P_FLIP = 0.8, 0.2, 0.5, 0.5
BLUR_SIGMA = (0.1, 2.0)
BLUR_RADIUS = int(math.ceil(3 * BLUR_SIGMA[1]))

# Layout of the per-view uniform vector (one PRNG call per view keeps compile time low on CPU).
CROP_UNIFORMS = 2 * CROP_ATTEMPTS + 2
JITTER_UNIFORMS = 8
U_CROP = slice(0, CROP_UNIFORMS)
U_JITTER = slice(CROP_UNIFORMS, CROP_UNIFORMS + JITTER_UNIFORMS)
U_FLIP, U_P_JITTER, U_GRAY, U_BLUR, U_SIGMA = range(CROP_UNIFORMS + JITTER_UNIFORMS,
                                                    CROP_UNIFORMS + JITTER_UNIFORMS + 5)
NUM_UNIFORMS = CROP_UNIFORMS + JITTER_UNIFORMS + 5


def fallback_box(height: int, width: int, ratio=CROP_RATIO) -> tuple[int, int, int, int]:
  """torchvision's central-crop fallback after the attempts fail, (i, j, h, w) (static: depends
  on the shape only)."""
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w
