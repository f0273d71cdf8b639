"""`build_retinanet`: the one gin configurable that describes a whole model (RetinaNet or, with
`build_retinanet.detector = 'fcos'`, FCOS), and `build_loss`: the loss that trains it."""
import inspect
from typing import Any, Dict

import gin

from nasfpn_tf.models.losses import FCOSLoss, RetinaNetLoss
from nasfpn_tf.models.retinanet import RetinaNet

# RetinaNet's own arguments. Gin checks bindings against this list, so a misspelled binding fails
# instead of vanishing into RetinaNet's **kwargs.
MODEL_ARGUMENTS = tuple(
    name for name, p in inspect.signature(RetinaNet.__init__).parameters.items()
    if p.kind == p.POSITIONAL_OR_KEYWORD and name != 'self')


@gin.configurable('build_retinanet', allowlist=MODEL_ARGUMENTS)
def build_retinanet(**model_arguments) -> RetinaNet:
  """A `RetinaNet` from gin bindings `build_retinanet.<argument>` (see RetinaNet for each).

  The model's config holds every argument, so a saved model rebuilds without gin.
  """
  return RetinaNet(**model_arguments)


def bound_model_arguments() -> Dict[str, Any]:
  """{argument: value} of the `build_retinanet` bindings in the parsed gin config: what they
  change in a recorded model config."""
  bound = {}
  for name in MODEL_ARGUMENTS:
    try:
      bound[name] = gin.query_parameter(f'build_retinanet.{name}')
    except ValueError:  # not bound
      continue
  return bound


def model_argument(name: str) -> Any:
  """The `build_retinanet` argument `name` as the parsed gin config binds it, else RetinaNet's
  default."""
  if name not in MODEL_ARGUMENTS:
    raise ValueError(f'{name!r} is not a build_retinanet argument; they are '
                     f'{list(MODEL_ARGUMENTS)}.')
  return bound_model_arguments().get(
      name, inspect.signature(RetinaNet.__init__).parameters[name].default)


def build_loss(model_config: Dict[str, Any]):
  """The training loss of a model config's detector (`RetinaNet.get_config()`): `FCOSLoss` for
  `build_retinanet.detector = 'fcos'`, else `RetinaNetLoss` (each gin-configurable)."""
  loss_class = FCOSLoss if model_config.get('detector', 'retinanet') == 'fcos' else RetinaNetLoss
  return loss_class(num_classes=model_config['num_classes'])
