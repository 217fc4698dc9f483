"""Bytes a split-learning client exchanges in one step: the one count that costs.py's tables
and the loss-threshold saving's report (run/replay.py) share.

Every step a client uploads the smashed data of its query rows and of its key rows (the key
upload is what the reference's overhead calculator forgets) and, unless it is frozen, downloads
the gradient of its query rows; float32 on the wire.
"""
FLOAT_BYTES = 4


def step_bytes(rows: int, smashed_floats: int, frozen_client: bool = False) -> tuple[int, int]:
  """(upload, download) bytes of one client in one step.

  Args:
    rows: smashed rows per view the client sends (B, or 2B for the two-view loss form).
    smashed_floats: floats of one row of smashed data.
    frozen_client: no gradient comes back (c_lr = 0, TAResSFL's deployment).
  """
  up = 2 * rows * smashed_floats * FLOAT_BYTES             # query + key activations
  down = 0 if frozen_client else rows * smashed_floats * FLOAT_BYTES
  return up, down
