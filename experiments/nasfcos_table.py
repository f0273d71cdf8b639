"""Params and FLOPs of the NAS-FCOS gin files beside NAS-FCOS's Table 2 (docs/nasfcos.md).

Each row is a gin file of gin_configs/ (with bindings for the @128 and @128-256 widths), built
as `build_retinanet` builds it, at its own size (1152x896: our detector needs sides divisible by
2^max_level = 128), and again at the paper's 1088x800 (800x1088 here, height first): the same
backbone, pyramid and head rebuilt from their configs on one 800x1088 image. The released code
pads to multiples of 32, which 1088 and 800 are, so P6 and P7 are 13x17 and 7x9 there, as our
stride-2 'same' convs give. Our regular FPN ('fpn') cannot take 800x1088 (it resamples P7 to P6
by 2x), so the FPN-FCOS row has FLOPs at 1152x896 only.

Params: ours count every weight (BN statistics included; `nasfpn_tf.utils.count_params`) and
the trainable ones. "Released, by hand" is the authors' PyTorch model counted as their
`compute_params` would count the parameters that train (maskrcnn_benchmark freezes the ResNet's
stem and first stage and its BN is frozen, MobileNetV2's first two blocks are frozen; 80
classes; the pyramid also adapts C2, which no cell reads). The paper's figures are that count
plus each deformable conv's 3x3 kernel counted a second time (12 * 9 * width^2 for the pyramid),
to within its rounding for every Table 2 row the released code has (docs/nasfcos.md).
FLOPs are the TF profiler's on the frozen inference graph (2 per multiply-add,
nasfpn_tf.utils.model_stats), head outputs without post-processing; NAS-FCOS's "FLOPs" are
multiply-adds, so the paper is compared with ours / 2.

  python experiments/nasfcos_table.py                 # all rows, markdown on stdout
  python experiments/nasfcos_table.py --rows=0,7      # some rows, by index
"""
import sys
import time

import gin
import tf_keras
from absl import app, flags, logging

from nasfpn_tf.config import GIN_CONFIGS_DIR
from nasfpn_tf.models import build_retinanet
from nasfpn_tf.models.backbones import build_backbone
from nasfpn_tf.search.configurables import parse_gin
from nasfpn_tf.utils import count_flops, count_params

PAPER_SIZE = (800, 1088)  # NAS-FCOS's "1088x800", height first
# (label, gin file, bindings, NAS-FCOS Table 2's (params, G "FLOPs") or None).
ROWS = (
    ('NAS-FCOS @256, R-50', 'nasfcos_r50_256_1152x896.gin', (), (46.0e6, 199.6e9)),
    ('NAS-FCOS @128, R-50', 'nasfcos_r50_256_1152x896.gin',
     ('num_filters = 128', 'head_num_filters = 128'), (29.6e6, 104.3e9)),
    ('NAS-FCOS @128-256, R-50', 'nasfcos_r50_256_1152x896.gin', ('num_filters = 128',),
     (34.1e6, 170.4e9)),
    ('NAS-FCOS @256, R-101', 'nasfcos_r101_256_1152x896.gin', (), (64.9e6, 264.0e9)),
    ('NAS-FCOS @256, MobileNetV2', 'nasfcos_mnv2_256_1152x896.gin', (), (23.7e6, 131.8e9)),
    ('NAS-FCOS @128, MobileNetV2', 'nasfcos_mnv2_256_1152x896.gin',
     ('num_filters = 128', 'head_num_filters = 128'), (7.7e6, 39.5e9)),
    ('NAS-FCOS @128-256, MobileNetV2', 'nasfcos_mnv2_256_1152x896.gin', ('num_filters = 128',),
     (12.3e6, 105.6e9)),
    ('FPN-FCOS @256, R-50', 'fcos_fpn_r50_256_1152x896.gin', (), (32.0e6, 169.9e9)),
    ('NAS-FCOS @256 + searched head, R-50', 'nasfcos_head_r50_256_1152x896.gin', (), None),
)

FLAGS = flags.FLAGS
flags.DEFINE_list('rows', [str(i) for i in range(len(ROWS))],
                  'Indices of the rows to measure: ' + '; '.join(
                      f'{i}: {row[0]}' for i, row in enumerate(ROWS)) + '.')


# ------------------------------------------------ the released PyTorch models, counted by hand
def _conv(cin, cout, k, bias=True):
  return cin * cout * k * k + (cout if bias else 0)


def _released_resnet(depth):
  """Trainable params of maskrcnn_benchmark's ResNet body: conv weights only (its BN is
  frozen), without the stem and the first stage (FREEZE_CONV_BODY_AT = 2)."""
  blocks = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
  total, cin = 0, 64
  for stage, (num, width) in enumerate(zip(blocks, (64, 128, 256, 512))):
    for b in range(num):
      params = _conv(cin, width, 1, False) + _conv(width, width, 3, False) + _conv(
          width, 4 * width, 1, False) + (_conv(cin, 4 * width, 1, False) if b == 0 else 0)
      total += params if stage else 0
      cin = 4 * width
  return total


def _released_mobilenetv2():
  """Trainable params of the released MobileNetV2 body (to the 320-channel block, BN trainable),
  without its first two blocks (frozen)."""
  total, cin = 0, 32
  for t, c, n, _ in ((6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                     (6, 320, 1, 1)):  # after the frozen stem and block (1, 16, 1, 1)
    cin = 16 if cin == 32 and c == 24 else cin
    for _ in range(n):
      hidden = cin * t
      total += cin * hidden + 2 * hidden + 9 * hidden + 2 * hidden + hidden * c + 2 * c
      cin = c
  return total


BACKBONE_CHANNELS = {'resnet50': (256, 512, 1024, 2048), 'resnet101': (256, 512, 1024, 2048),
                     'mobilenetv2': (24, 32, 96, 320)}  # C2..C5, the released ENCODER_OUT
DEFORMABLE_CELL_OPS = 12  # in the published pyramid


def released_params(config, num_classes=80):
  """{'backbone', 'pyramid', 'head', 'total', 'paper_convention'}: the released PyTorch model of a
  model config (`RetinaNet.get_config()`), counted by hand as above."""
  backbone = {'resnet50': lambda: _released_resnet(50), 'resnet101': lambda: _released_resnet(101),
              'mobilenetv2': _released_mobilenetv2}[config['backbone']]()
  channels = BACKBONE_CHANNELS[config['backbone']]
  width, head_width = config['num_filters'], config['head_num_filters']
  p6p7 = 2 * _conv(width, width, 3)
  if config.get('decoder', 'nasfpn') == 'nasfcos_fpn':  # MicroDecoder_v2: adapt C2-C5, 7 concat cells
    deformable = _conv(width, width, 3) + _conv(width, 54, 3) + 2 * width  # DCN + BN
    pyramid = (sum(_conv(c, width, 1, False) + 2 * width for c in channels)
               + DEFORMABLE_CELL_OPS * deformable + 7 * (4 * width + 2 * width) + p6p7)
    doubled = DEFORMABLE_CELL_OPS * 9 * width * width
  else:  # FCOS's FPN: 1x1 laterals C3-C5, 3x3 outputs, P6/P7 from P5
    pyramid = sum(_conv(c, width, 1) for c in channels[1:]) + 3 * _conv(width, width, 3) + p6p7
    doubled = 0
  predictors = (_conv(head_width, num_classes, 3) + _conv(head_width, 4, 3)
                + _conv(head_width, 1, 3) + 5)  # + 5 per-level scales
  if config.get('fcos_head_spec') is None:  # DenseBoxHead: 4 conv 3x3 + GN per tower
    first = _conv(width, head_width, 3)
    tower = first + 3 * _conv(head_width, head_width, 3) + 4 * 2 * head_width
  else:  # the published MicroHead_v2: DCN, conv 3x3, DCN, conv 1x1, skip, skip (+ GN each)
    def dcn(cin):
      return _conv(cin, head_width, 3) + _conv(cin, 54, 3)
    tower = (dcn(width) + _conv(head_width, head_width, 3, False) + dcn(head_width)
             + _conv(head_width, head_width, 1, False) + 4 * 2 * head_width)
  head = 2 * tower + predictors
  total = backbone + pyramid + head
  return dict(backbone=backbone, pyramid=pyramid, head=head, total=total,
              paper_convention=total + doubled)


# ----------------------------------------------------------------------------- measuring
def _trainable(layer):
  return sum(w.shape.num_elements() for w in layer.trainable_weights)


def at_size(model, image_size):
  """The model's backbone, pyramid and head, rebuilt from their configs on one image of
  `image_size` [height, width] (the input normalization and post-processing left out)."""
  config = model.get_config()
  backbone = build_backbone(config['backbone'], [*image_size, 3])
  decoder_config = dict(model.decoder.get_config(), input_specs={
      k: v.as_list() for k, v in backbone.output_specs.items()})
  decoder = type(model.decoder).from_config(decoder_config)
  head = type(model.head).from_config(model.head.get_config())
  images = tf_keras.Input([*image_size, 3], batch_size=1)
  return tf_keras.Model(images, head(decoder(backbone(images))))


def measure(gin_file: str, bindings) -> dict:
  parse_gin([str(GIN_CONFIGS_DIR / gin_file)], [f'build_retinanet.{b}' for b in bindings])
  try:
    model = build_retinanet()
  finally:
    gin.clear_config()
  config = model.get_config()
  size = config['image_size']
  result = dict(
      image_size=size, params=count_params(model), trainable=_trainable(model),
      parts={part: (count_params(getattr(model, part)), _trainable(getattr(model, part)))
             for part in ('backbone', 'decoder', 'head')},
      released=released_params(config),
      flops=count_flops(model, [*size, 3]))
  try:
    result['paper_size_flops'] = count_flops(at_size(model, PAPER_SIZE), [*PAPER_SIZE, 3])
  except ValueError as e:  # our regular FPN needs sides divisible by 2^max_level
    logging.warning('%s at %s: %s', gin_file, PAPER_SIZE, e)
    result['paper_size_flops'] = None
  tf_keras.backend.clear_session()
  return result


def _m(n):
  return '—' if n is None else f'{n / 1e6:.2f}M'


def _delta(ours, paper):
  return '—' if paper is None or ours is None else f'{(ours - paper) / paper:+.1%}'


def markdown(rows) -> str:
  lines = [
      '| model (gin file) | params | trainable | released, by hand | + deformable kernels '
      'again | paper | Δ ours | Δ counted as the paper | FLOPs at 1152x896 | '
      'multiply-adds at 1088x800 | paper | Δ |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for (label, gin_file, bindings, paper), r in rows:
    paper_params, paper_macs = paper or (None, None)
    released = r['released']
    macs = None if r['paper_size_flops'] is None else r['paper_size_flops'] / 2
    name = f'{label} (`{gin_file}`' + (f', {", ".join(bindings)}' if bindings else '') + ')'
    lines.append(
        f'| {name} | {_m(r["params"])} | {_m(r["trainable"])} | {_m(released["total"])} | '
        f'{_m(released["paper_convention"])} | '
        f'{"—" if paper_params is None else f"{paper_params / 1e6:.1f}M"} | '
        f'{_delta(r["params"], paper_params)} | '
        f'{_delta(released["paper_convention"], paper_params)} | {r["flops"] / 1e9:.1f}G | '
        f'{"—" if macs is None else f"{macs / 1e9:.1f}G"} | '
        f'{"—" if paper_macs is None else f"{paper_macs / 1e9:.1f}G"} | '
        f'{_delta(macs, paper_macs)} |')
  return '\n'.join(lines)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    indices = [int(i) for i in FLAGS.rows]
    if any(not 0 <= i < len(ROWS) for i in indices):
      raise ValueError
  except ValueError as e:
    raise app.UsageError(f'--rows: {FLAGS.rows} are not row indices 0..{len(ROWS) - 1}.') from e
  results = []
  for n, i in enumerate(indices, 1):
    label, gin_file, bindings, _ = ROWS[i]
    start = time.time()
    r = measure(gin_file, bindings)
    results.append((ROWS[i], r))
    parts = ', '.join(f'{part} {all_:,} ({trainable:,} trainable)'
                      for part, (all_, trainable) in r['parts'].items())
    print(f'[{n}/{len(indices)}] {label}: {r["params"]:,} params: {parts}; released by hand '
          f'{r["released"]}; {r["flops"] / 1e9:.1f}G FLOPs at {list(r["image_size"])}, '
          f'{(r["paper_size_flops"] or 0) / 1e9:.1f}G at {list(PAPER_SIZE)} '
          f'({time.time() - start:.0f} s)', file=sys.stderr, flush=True)
  print(markdown(results))


if __name__ == '__main__':
  app.run(main)
