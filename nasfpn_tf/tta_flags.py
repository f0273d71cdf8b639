"""The test-time augmentation flags of nasfpn_tf.main (--mode=eval, train_and_eval) and
nasfpn_tf.predict (a model dir), defined once for both (docs/tta.md, `models.tta`)."""
from typing import Optional

from absl import flags

from nasfpn_tf.models import tta as tta_lib

TTA_SCALES = flags.DEFINE_string(
    'tta_scales', None, 'Test-time augmentation at these scale factors of the model\'s input '
    'size, comma-separated, e.g. 1.0,1.25 (docs/tta.md): every view\'s candidate boxes mapped '
    'back to the image and merged before one NMS. For nasfpn_tf.main --mode=eval or '
    'train_and_eval, and nasfpn_tf.predict on a model dir. Default: off.')
TTA_FLIP = flags.DEFINE_bool(
    'tta_flip', False, 'Test-time augmentation adds the horizontally flipped image at each '
    '--tta_scales scale (default: 1.0 only). Where --tta_scales applies.')


def tta_config() -> Optional[tta_lib.TTAConfig]:
  """The TTAConfig of the flags; None when neither is given. Bad values raise ValueError."""
  return tta_lib.from_flags(TTA_SCALES.value, TTA_FLIP.value)
