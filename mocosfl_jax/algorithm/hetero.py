"""Heterogeneous clients: the reference's `--hetero` string "a_b|c|d_e" and what it resolves to.

    spec = hetero.resolve('reference', num_clients=100)   # the reference's string for N = 100
    spec.rich_clients(100), spec.rich_batch(batch_size=1)  # 20 rich clients, batch 16

"a_b|c|d_e" (MocoSFL's `hetero_string`): a fraction `a` of the clients is rich (client ids
< int(a * N)), `b` = 1 - a; rich clients draw int(c) * B images per step (poor clients B); rich
clients own a fraction `d` of the data (IID split), `e` = 1 - d (the non-IID split makes shards
e times smaller and gives each rich client (1 - e) / e shard groups; data/partition.py).

The reference replaces any string by a fixed one when N is 500, 200 or 100 (`REFERENCE_BY_N`),
whatever the user passed. Here a string the user writes is used as written (a setting is never
silently replaced); `config.hetero='reference'` gives what the reference would run: its string
for those N, its default string otherwise. docs/reference.md, 'Heterogeneous clients'.
"""
import dataclasses

REFERENCE_DEFAULT = '0.2_0.8|16|0.8_0.2'
# The reference's run_sflmoco.py forces these strings by num_client whenever --hetero is set.
REFERENCE_BY_N = {500: '0.2_0.8|16|0.8_0.2', 200: '0.5_0.5|4|0.8_0.2',
                  100: '0.2_0.8|16|0.8_0.2'}
FORM = "'' (off), 'reference', or 'a_b|c|d_e' (e.g. '0.2_0.8|4|0.8_0.2')"


@dataclasses.dataclass(frozen=True)
class HeteroSpec:
  """A parsed hetero string.

  Attributes:
    rich_fraction: a, the fraction of clients that are rich (ids < int(a * N)).
    batch_multiplier: int(c), rich batch = int(c) * B.
    rich_data: d, the fraction of the (subset of the) training set the rich clients share (IID).
    poor_data: e = 1 - d; the non-IID split's shard shrink factor.
    text: the string it was parsed from.
  """
  rich_fraction: float
  batch_multiplier: int
  rich_data: float
  poor_data: float
  text: str

  def rich_clients(self, num_clients: int) -> int:
    """int(a * N), as the reference counts its rich clients."""
    return int(self.rich_fraction * num_clients)

  def rich_batch(self, batch_size: int) -> int:
    """int(c) * B."""
    return self.batch_multiplier * batch_size

  def shard_groups(self) -> int:
    """Shard groups per rich client in the non-IID split: int((1 - e) / e) (the reference's
    float expression, so e = 0.2 gives 4)."""
    return int((1 - self.poor_data) / self.poor_data)


def _bad(text, why):
  return ValueError(f'hetero={text!r}: {why}; valid: {FORM}')


def parse(text: str) -> HeteroSpec:
  """'a_b|c|d_e' -> HeteroSpec. The complements must match (a + b = 1, d + e = 1): the
  reference reads only a, c, d (IID) or e (non-IID), so a b or e that disagrees would be ignored."""
  if not isinstance(text, str):
    raise _bad(text, 'must be a string')
  groups = text.split('|')
  if len(groups) != 3:
    raise _bad(text, "needs three '|'-separated groups")
  try:
    a, b = (float(x) for x in groups[0].split('_'))
    d, e = (float(x) for x in groups[2].split('_'))
  except ValueError:
    raise _bad(text, "the first and last groups must be two numbers joined by '_'") from None
  c = groups[1]
  if not (c.isascii() and c.isdigit()) or int(c) < 1:
    raise _bad(text, f'the batch multiplier {c!r} must be an int >= 1')
  if not 0.0 < a < 1.0 or abs(a + b - 1.0) > 1e-9:
    raise _bad(text, f'the rich fraction a={a} must be in (0, 1) with b = 1 - a (b={b})')
  if not 0.0 < d < 1.0 or abs(d + e - 1.0) > 1e-9:
    raise _bad(text, f'the rich data share d={d} must be in (0, 1) with e = 1 - d (e={e})')
  return HeteroSpec(a, int(c), d, e, text)


def resolve(value: str, num_clients: int):
  """config.hetero -> None ('' off) or the HeteroSpec to run ('reference': the reference's
  string for this N)."""
  if value == '':
    return None
  if value == 'reference':
    value = REFERENCE_BY_N.get(num_clients, REFERENCE_DEFAULT)
  spec = parse(value)
  r = spec.rich_clients(num_clients)
  if not 1 <= r < num_clients:
    raise _bad(value, f'int(a * num_clients) = int({spec.rich_fraction} * {num_clients}) = {r} '
                      f'rich clients; need at least one rich and one poor client')
  return spec
