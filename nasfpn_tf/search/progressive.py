"""The search space of `python -m nasfpn_tf.search` from its flags, and NAS-FCOS's progressive
search (§3.3): the pyramid first, then the head with the found pyramid fixed.

  python -m nasfpn_tf.search --space=nasfcos_fpn --search_dir=runs/fcos_fpn --proxy=cpu
  python -m nasfpn_tf.search --space=nasfcos_head --fixed_pyramid=runs/fcos_fpn \
      --search_dir=runs/fcos_head --proxy=cpu

--space: `nasfpn` (the default; --num_cells, --min_level, --max_level), `nasfcos_fpn` (NAS-FCOS
pyramids of --num_cells cells over C3-C5: the package's backbones give no C2, so the space has
`read_c2=False`) or `nasfcos_head` (NAS-FCOS heads on the --fixed_pyramid). --fixed_pyramid: the
search dir of a `--space=nasfcos_fpn` search (its best pyramid that trained to the end), a
pyramid's key (`NASFCOSFPNSpace.key`, as the journal and best.gin print it) or a name of
`nasfcos_specs.SPECS` (default: the published `nasfcos_fpn`). Errors name the flag at fault.
"""
import json
import pathlib
from typing import Optional, Tuple

from nasfpn_tf.decoders import nasfcos_specs
from nasfpn_tf.search import nasfcos_space
from nasfpn_tf.search import progress
from nasfpn_tf.search import search_dir as search_dir_lib
from nasfpn_tf.search import space as space_lib
from nasfpn_tf.search.journal import Journal

SPACE_NAMES = tuple(space_lib.spaces())
# NAS-FCOS's reward (§4.4.1) is the negative held-out loss; NAS-FPN's the held-out AP.
DEFAULT_REWARDS = {space_lib.SearchSpace.NAME: 'ap',
                   nasfcos_space.NASFCOSFPNSpace.NAME: 'neg_loss',
                   nasfcos_space.NASFCOSHeadSpace.NAME: 'neg_loss'}


def make_space(name: str, num_cells: int = 7, min_level: int = 3, max_level: int = 7,
               fixed_pyramid: Optional[str] = None, levels_given: bool = False):
  """The space of --space=`name` and its flags; ValueError naming the flag that does not apply
  or does not resolve. levels_given: whether --min_level or --max_level was passed (NAS-FPN's
  only; the NAS-FCOS pyramid gives P3-P7)."""
  if name not in SPACE_NAMES:
    raise ValueError(f'--space={name!r} is not one of {list(SPACE_NAMES)}.')
  if fixed_pyramid is not None and name != nasfcos_space.NASFCOSHeadSpace.NAME:
    raise ValueError(f'--fixed_pyramid={fixed_pyramid!r} is the pyramid of a head search: it '
                     f'needs --space={nasfcos_space.NASFCOSHeadSpace.NAME}, not --space={name}.')
  if name == space_lib.SearchSpace.NAME:
    return space_lib.SearchSpace(num_cells, min_level, max_level)
  if levels_given:
    raise ValueError(f'--min_level and --max_level are the NAS-FPN space\'s; --space={name} '
                     'builds P3-P7 (leave them out).')
  if name == nasfcos_space.NASFCOSFPNSpace.NAME:
    return nasfcos_space.NASFCOSFPNSpace(num_cells=num_cells, read_c2=False)
  return nasfcos_space.NASFCOSHeadSpace(
      pyramid=resolve_fixed_pyramid(fixed_pyramid or 'nasfcos_fpn'))


def resolve_fixed_pyramid(value: str) -> Tuple[nasfcos_specs.CellSpec, ...]:
  """The cells of --fixed_pyramid=`value`: a search dir of an `nasfcos_fpn` search (its best
  pyramid that trained to the end), a key, or a name of `nasfcos_specs.SPECS`. The pyramid must
  be in a `NASFCOSFPNSpace` without C2 (what the search builds). ValueError naming the flag."""
  where = f'--fixed_pyramid={value}'
  path = pathlib.Path(value)
  if path.is_dir():
    specs = _best_of_search(path, where)
  else:
    try:
      specs = (nasfcos_space.parse_key(value) if ':' in value else nasfcos_specs.resolve(value))
    except ValueError as e:
      raise ValueError(f'{where} is no search dir, key or name of a NAS-FCOS pyramid '
                       f'(names: {sorted(nasfcos_specs.SPECS)}): {e}') from e
  space = nasfcos_space.NASFCOSFPNSpace(num_cells=len(specs), read_c2=False)
  try:
    return space.decode(space.encode(specs))
  except ValueError as e:
    raise ValueError(f'{where} is not a pyramid of {space!r}: {e}') from e


def _best_of_search(directory: pathlib.Path, where: str):
  """The best pyramid that trained to the end in the nasfcos_fpn search of `directory`."""
  identity_file = directory / search_dir_lib.IDENTITY_FILE
  if not identity_file.exists():
    raise ValueError(f'{where}: {directory} holds no search ({identity_file} is missing).')
  identity = json.loads(identity_file.read_text())
  name = identity.get('space_name', space_lib.SearchSpace.NAME)
  if name != nasfcos_space.NASFCOSFPNSpace.NAME:
    raise ValueError(f'{where}: {directory} holds a search in --space={name}, not '
                     f'--space={nasfcos_space.NASFCOSFPNSpace.NAME}.')
  records = [r for r in Journal(directory / search_dir_lib.TRIALS_FILE).read()
             if progress.trained_to_the_end(r)]
  if not records:
    raise ValueError(f'{where}: the search in {directory} has no trial that trained to the end '
                     'yet.')
  return nasfcos_specs.resolve(max(records, key=lambda r: r['reward'])['block_specs'])
