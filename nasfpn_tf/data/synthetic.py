"""The embedded demo dataset: coloured shapes on cluttered backgrounds, written in COCO format.

`make demo` must train and evaluate without the internet, so the demo data is generated here.
The task is built to be learnable in minutes on a CPU yet to exercise the whole detector:

* five shape classes with COCO-style non-contiguous ids (1, 3, 5, 7, 9), so a pipeline that
  silently renumbers categories shows up as wrong results;
* object sizes drawn log-uniformly over 12..120 px (at image_size=256), so every pyramid level
  from stride 8 to 64 gets positives;
* colour is correlated with the class but not decisive, and the backgrounds carry gradients,
  noise, stripes, lines, curves, irregular blobs and elongated ellipses that are not objects;
* image sizes vary per side within [0.75, 1.25] x image_size (--vary_size), exercising the
  resize and padding of the input pipeline.

Boxes are tight: each is the bounding box of the object's visible pixels (later objects are
drawn on top and may hide at most 30% of earlier ones), and `area` counts those pixels. The
segmentation is the drawn shape's outer polygon (for a ring its outer circle, as a COCO polygon
list cannot hold holes), hidden parts included.

Every image is drawn from its own generator seeded by (seed, split, index), so a seed gives
byte-identical json and images, however many processes (--num_processes) draw them. The module
imports no TensorFlow.

Usage:
  python -m nasfpn_tf.data.synthetic --output_dir=/tmp/shapes --num_train=800 --num_val=200 \
      --num_processes=2
"""
import colorsys
import concurrent.futures
import io
import json
import math
import multiprocessing
import pathlib
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image
from PIL import ImageDraw

CATEGORIES = (
    {'id': 1, 'name': 'circle', 'supercategory': 'shape'},
    {'id': 3, 'name': 'square', 'supercategory': 'shape'},
    {'id': 5, 'name': 'triangle', 'supercategory': 'shape'},
    {'id': 7, 'name': 'star', 'supercategory': 'shape'},
    {'id': 9, 'name': 'ring', 'supercategory': 'shape'},
)
CATEGORY_NAMES = {c['id']: c['name'] for c in CATEGORIES}
# Usual hue (degrees) of each class; an object takes it with probability _CLASS_HUE_PROB.
_CLASS_HUES = {1: 0, 3: 220, 5: 120, 7: 50, 9: 290}
_CLASS_HUE_PROB = 0.6
SPLITS = ('train', 'val')
# Nominal object size range (px) at image_size=256; scaled linearly with image_size.
MIN_OBJECT_SIZE = 12
MAX_OBJECT_SIZE = 120
MAX_OBJECTS = 8
MAX_BOX_IOU = 0.3
# A new object may hide at most this fraction of an earlier object's visible pixels.
MAX_HIDDEN_FRACTION = 0.3
SIZE_JITTER = (0.75, 1.25)
_JPEG_QUALITY = 92
# Vertices of the polygons that stand for circles; they deviate < 0.3 px from a circle at 120 px.
_ROUND_VERTICES = 48


def _random_colour(rng, hue=None):
  """A random RGB colour (floats in [0, 255]); `hue` (degrees) picks a hue up to 15 degrees off."""
  hue = rng.uniform(0, 360) if hue is None else (hue + rng.uniform(-15, 15)) % 360
  return 255.0 * np.array(colorsys.hsv_to_rgb(hue / 360, rng.uniform(0.45, 1.0),
                                              rng.uniform(0.45, 1.0)))


def _background(rng, width, height):
  """Smooth colour gradient with low-frequency colour noise and (sometimes) faint stripes."""
  # Both smooth parts are drawn on a coarse grid and upsampled once: cheap, and bicubic
  # interpolation keeps the gradient linear.
  grid_w, grid_h = (int(n) for n in rng.integers(3, 8, size=2))
  angle = rng.uniform(0, 2 * math.pi)
  t = (np.linspace(0, 1, grid_w)[None, :] * math.cos(angle) +
       np.linspace(0, 1, grid_h)[:, None] * math.sin(angle))
  t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
  start, end = _random_colour(rng), _random_colour(rng)
  coarse = start + t[..., None] * (end - start) + rng.uniform(-45, 45, size=(grid_h, grid_w, 3))
  coarse = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8))
  image = coarse.resize((width, height), Image.BICUBIC)
  if rng.random() < 0.4:
    frequency = 2 * math.pi / rng.uniform(6, 30)
    direction = rng.uniform(0, 2 * math.pi)
    # sin(a + b) = sin a cos b + cos a sin b keeps the trigonometry one-dimensional.
    a = np.arange(width, dtype=np.float32)[None, :] * frequency * math.cos(direction)
    b = np.arange(height, dtype=np.float32)[:, None] * frequency * math.sin(direction)
    stripes = rng.uniform(8, 25) * (np.sin(a) * np.cos(b) + np.cos(a) * np.sin(b))
    image = Image.fromarray(
        np.clip(np.asarray(image, np.float32) + stripes[..., None], 0, 255).astype(np.uint8))
  return image


def _draw_distractors(rng, canvas, scale):
  """Paints clutter that is no object, so that the detector must learn shapes, not "anything
  colourful": lines, random-walk curves, irregular blobs (filled or outlined), thin ellipses and
  dot sprays."""
  width, height = canvas.size
  draw = ImageDraw.Draw(canvas)
  colour = lambda: tuple(int(v) for v in _random_colour(rng))
  point = lambda: (float(rng.uniform(0, width)), float(rng.uniform(0, height)))
  for _ in range(rng.integers(6, 16)):
    kind = rng.integers(5)
    x, y = point()
    if kind == 0:
      draw.line([(x, y), point()], fill=colour(), width=int(rng.integers(1, 5)))
    elif kind == 1:
      steps = rng.normal(0, 12 * scale, size=(int(rng.integers(4, 10)), 2)).cumsum(0)
      draw.line([(x + dx, y + dy) for dx, dy in steps], fill=colour(),
                width=int(rng.integers(1, 4)), joint='curve')
    elif kind == 2:
      n = int(rng.integers(6, 12))
      angles = np.sort(rng.uniform(0, 2 * math.pi, n))
      radii = rng.uniform(6, 40) * scale * rng.uniform(0.35, 1.0, n)
      outline = [(x + r * math.cos(a), y + r * math.sin(a)) for a, r in zip(angles, radii)]
      if rng.random() < 0.7:
        draw.polygon(outline, fill=colour())
      else:
        draw.polygon(outline, outline=colour(), width=int(rng.integers(1, 4)))
    elif kind == 3:
      long_axis = rng.uniform(15, 70) * scale
      short_axis = long_axis * rng.uniform(0.08, 0.3)
      tilt = rng.uniform(0, math.pi)
      angles = np.linspace(0, 2 * math.pi, 32, endpoint=False)
      u, v = long_axis * np.cos(angles), short_axis * np.sin(angles)
      draw.polygon([(x + a * math.cos(tilt) - b * math.sin(tilt),
                     y + a * math.sin(tilt) + b * math.cos(tilt)) for a, b in zip(u, v)],
                   fill=colour())
    else:
      for _ in range(rng.integers(5, 30)):
        r = rng.uniform(0.5, 2.5) * scale
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour())
        x, y = point()


def _shape_polygons(category_id, cx, cy, size, rotation):
  """Outline polygons [(x, y), ...] of one object about `size` px across; a second is a hole."""
  r = size / 2.0

  def polygon(angles, radii):
    return [(cx + rad * math.cos(a + rotation), cy + rad * math.sin(a + rotation))
            for a, rad in zip(angles, radii)]

  round_angles = np.arange(_ROUND_VERTICES) * 2 * math.pi / _ROUND_VERTICES
  if category_id == 1:  # circle
    return [polygon(round_angles, [r] * _ROUND_VERTICES)]
  if category_id == 3:  # square
    return [polygon(np.arange(4) * math.pi / 2 + math.pi / 4, [r * math.sqrt(2) * 0.8] * 4)]
  if category_id == 5:  # triangle
    return [polygon(np.arange(3) * 2 * math.pi / 3, [r] * 3)]
  if category_id == 7:  # five-pointed star
    return [polygon(np.arange(10) * math.pi / 5, [r, r * 0.42] * 5)]
  if category_id == 9:  # ring
    return [polygon(round_angles, [r] * _ROUND_VERTICES),
            polygon(round_angles, [r * 0.6] * _ROUND_VERTICES)]
  raise ValueError(f'Unknown category id {category_id}.')


class _Object:
  """A placed object: its visible pixels as a mask over the window [x0, x0+w) x [y0, y0+h).

  Working in the object's window instead of the whole image keeps rendering fast.
  """

  def __init__(self, category_id, polygons, width, height):
    self.category_id = category_id
    self.outline = polygons[0]
    xs = [x for x, _ in polygons[0]]
    ys = [y for _, y in polygons[0]]
    self.x0, self.y0 = max(0, math.floor(min(xs)) - 1), max(0, math.floor(min(ys)) - 1)
    x1, y1 = min(width, math.ceil(max(xs)) + 2), min(height, math.ceil(max(ys)) + 2)
    window = Image.new('1', (x1 - self.x0, y1 - self.y0))
    draw = ImageDraw.Draw(window)
    for i, polygon in enumerate(polygons):  # the first filled, the others cut out as holes
      draw.polygon([(x - self.x0, y - self.y0) for x, y in polygon], fill=int(i == 0))
    self.mask = np.array(window)

  @property
  def bbox(self):
    """Tight [x, y, w, h] of the visible pixels."""
    rows = np.flatnonzero(self.mask.any(1))
    cols = np.flatnonzero(self.mask.any(0))
    return [self.x0 + int(cols[0]), self.y0 + int(rows[0]),
            int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]

  def overlap(self, other):
    """Views of both masks on the intersection of the windows (None when they are disjoint)."""
    x0, y0 = max(self.x0, other.x0), max(self.y0, other.y0)
    x1 = min(self.x0 + self.mask.shape[1], other.x0 + other.mask.shape[1])
    y1 = min(self.y0 + self.mask.shape[0], other.y0 + other.mask.shape[0])
    if x0 >= x1 or y0 >= y1:
      return None
    return (self.mask[y0 - self.y0:y1 - self.y0, x0 - self.x0:x1 - self.x0],
            other.mask[y0 - other.y0:y1 - other.y0, x0 - other.x0:x1 - other.x0])

  def full_mask(self, width, height):
    mask = np.zeros((height, width), bool)
    mask[self.y0:self.y0 + self.mask.shape[0], self.x0:self.x0 + self.mask.shape[1]] = self.mask
    return mask


def _box_iou(a, b):
  ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
  iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
  inter = ix * iy
  return inter / float(a[2] * a[3] + b[2] * b[3] - inter)


def _fits(new, objects):
  """Keeps overlap limited, so that every object stays recognisable and its box meaningful."""
  box = new.bbox
  for other in objects:
    if _box_iou(box, other.bbox) > MAX_BOX_IOU:
      return False
    views = other.overlap(new)
    if views is not None and (views[0] & views[1]).sum() > MAX_HIDDEN_FRACTION * other.mask.sum():
      return False
  return True


def _paint(rng, image, obj):
  """Fills the object's pixels with a shaded colour that stands out from what lies beneath."""
  h, w = obj.mask.shape
  region = image[obj.y0:obj.y0 + h, obj.x0:obj.x0 + w]
  below = region[obj.mask].mean(0)
  hue = _CLASS_HUES[obj.category_id] if rng.random() < _CLASS_HUE_PROB else None
  for _ in range(10):
    colour = _random_colour(rng, hue)
    if np.linalg.norm(colour - below) > 90:
      break
  ys, xs = np.nonzero(obj.mask)
  angle = rng.uniform(0, 2 * math.pi)
  t = xs * math.cos(angle) + ys * math.sin(angle)
  shade = 1.0 + rng.uniform(0, 0.25) * ((t - t.min()) / max(float(np.ptp(t)), 1.0) - 0.5)
  region[ys, xs] = np.clip(colour * shade[:, None], 0, 255)
  if rng.random() < 0.35:  # a darker rim, inside the mask so the box stays tight
    padded = np.pad(obj.mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    region[obj.mask & ~inner] = colour * 0.45


def render(seed, split, index, image_size=256, vary_size=True):
  """Draws one image; returns (HxWx3 uint8 RGB image, objects).

  Each object is a dict with `category_id`, `mask` (HxW bool, its visible pixels), `bbox` (their
  tight [x, y, w, h]) and `outline` (the drawn shape's outer polygon, hidden parts included).
  Deterministic in its arguments, so tests and previews can redraw any image of a dataset.
  """
  rng = np.random.default_rng([seed, SPLITS.index(split), index])
  if vary_size:
    width, height = (int(round(image_size * rng.uniform(*SIZE_JITTER))) for _ in range(2))
  else:
    width = height = image_size
  scale = image_size / 256.0
  canvas = _background(rng, width, height)
  _draw_distractors(rng, canvas, scale)
  image = np.array(canvas)

  objects = []
  for _ in range(rng.integers(1, MAX_OBJECTS + 1)):
    for _ in range(20):  # placement attempts
      category_id = CATEGORIES[rng.integers(len(CATEGORIES))]['id']
      size = min(math.exp(rng.uniform(math.log(MIN_OBJECT_SIZE), math.log(MAX_OBJECT_SIZE)))
                 * scale, min(width, height) - 4)
      cx = rng.uniform(size / 2 + 1, width - size / 2 - 1)
      cy = rng.uniform(size / 2 + 1, height - size / 2 - 1)
      # Squares tilt at most ~15 degrees so that they do not turn into diamonds.
      rotation = rng.uniform(-0.25, 0.25) if category_id == 3 else rng.uniform(0, 2 * math.pi)
      new = _Object(category_id, _shape_polygons(category_id, cx, cy, size, rotation),
                    width, height)
      if _fits(new, objects):
        break
    else:
      continue
    _paint(rng, image, new)
    for other in objects:
      views = other.overlap(new)
      if views is not None:
        below, above = views
        below &= ~above  # hidden by the new object
    objects.append(new)

  # Grey sensor grain: one draw per pixel, shared by the channels (a third of the cost).
  grain = rng.uniform(2, 10) * rng.standard_normal((height, width, 1), dtype=np.float32)
  noisy = image + grain
  return np.clip(noisy, 0, 255).round().astype(np.uint8), [
      {'category_id': o.category_id, 'mask': o.full_mask(width, height), 'bbox': o.bbox,
       'outline': o.outline} for o in objects]


def _draw(task):
  """One image of a split as its file holds it: (JPEG bytes, height, width, annotations without
  ids). `task` is (seed, split, index, image_size, vary_size); what a worker process runs."""
  seed, split, index, image_size, vary_size = task
  pixels, objects = render(seed, split, index, image_size, vary_size)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format='JPEG', quality=_JPEG_QUALITY)
  annotations = [{'category_id': obj['category_id'], 'bbox': [float(v) for v in obj['bbox']],
                  'area': float(obj['mask'].sum()), 'iscrowd': 0,
                  'segmentation': [[round(v, 2) for p in obj['outline'] for v in p]]}
                 for obj in objects]
  return buffer.getvalue(), int(pixels.shape[0]), int(pixels.shape[1]), annotations


def _write_split(output_dir, split, num_images, image_size, seed, vary_size, pool=None):
  """Writes DIR/split/*.jpg and DIR/annotations/instances_split.json; returns per-class counts.
  Images are drawn by `pool` (an executor) when given, written here in index order."""
  image_dir = output_dir / split
  image_dir.mkdir(parents=True, exist_ok=True)
  images, annotations = [], []
  tasks = [(seed, split, index, image_size, vary_size) for index in range(num_images)]
  drawn = pool.map(_draw, tasks, chunksize=16) if pool else map(_draw, tasks)
  for index, (jpeg, height, width, objects) in enumerate(drawn):
    image_id = index + 1  # COCO ids start at 1; 0 is falsy in some tools
    file_name = f'{image_id:012d}.jpg'
    (image_dir / file_name).write_bytes(jpeg)
    images.append({'id': image_id, 'file_name': file_name, 'height': height, 'width': width})
    for obj in objects:
      annotations.append({'id': len(annotations) + 1, 'image_id': image_id, **obj})
  dataset = {
      'info': {'description': f'nasfpn_tf synthetic shapes, split={split}, seed={seed}, '
                              f'image_size={image_size}, vary_size={vary_size}',
               'version': '1.0', 'contributor': 'nasfpn_tf.data.synthetic', 'url': ''},
      'licenses': [],
      'images': images,
      'annotations': annotations,
      'categories': [dict(c) for c in CATEGORIES],
  }
  (output_dir / 'annotations').mkdir(parents=True, exist_ok=True)
  with open(output_dir / 'annotations' / f'instances_{split}.json', 'w') as f:
    json.dump(dataset, f, separators=(',', ':'))
  per_class = {c['name']: 0 for c in CATEGORIES}
  for ann in annotations:
    per_class[CATEGORY_NAMES[ann['category_id']]] += 1
  return {'images': len(images), 'annotations': len(annotations), 'per_class': per_class}


def generate(output_dir, num_train=800, num_val=200, image_size=256, seed=0, vary_size=True,
             num_processes=1):
  """Writes the COCO-format dataset under `output_dir`; returns a summary with counts per split.
  `num_processes` > 1 draws the images in that many worker processes (started by spawning, so
  safe whatever the caller has imported); the files are the same bytes either way."""
  if num_processes < 1:
    raise ValueError(f'num_processes must be >= 1, got {num_processes}')
  output_dir = pathlib.Path(output_dir)
  summary = {'output_dir': str(output_dir)}
  pool = None
  if num_processes > 1:
    pool = concurrent.futures.ProcessPoolExecutor(
        num_processes, mp_context=multiprocessing.get_context('spawn'))
  try:
    for split, num_images in zip(SPLITS, (num_train, num_val)):
      summary[split] = _write_split(output_dir, split, num_images, image_size, seed, vary_size,
                                    pool)
  finally:
    if pool:
      pool.shutdown()
  return summary


def save_preview(path, seed=0, split='train', num_images=6, image_size=256, vary_size=True,
                 columns=3):
  """Saves a grid of images with their boxes and class names, to eyeball tightness and clutter."""
  tiles = []
  for index in range(num_images):
    pixels, objects = render(seed, split, index, image_size, vary_size)
    tile = Image.fromarray(pixels)
    draw = ImageDraw.Draw(tile)
    for obj in objects:
      x, y, w, h = obj['bbox']
      # Pixel x covers [x, x+1): a white frame on x-1 and x+w lies just outside the object if the
      # box is tight, a black one around it keeps it visible on light backgrounds.
      draw.rectangle([x - 2, y - 2, x + w + 1, y + h + 1], outline=(0, 0, 0))
      draw.rectangle([x - 1, y - 1, x + w, y + h], outline=(255, 255, 255))
      draw.text((x, max(0, y - 12)), CATEGORY_NAMES[obj['category_id']], fill=(255, 255, 255),
                stroke_width=1, stroke_fill=(0, 0, 0))
    tiles.append(tile)
  cell_w = max(t.width for t in tiles) + 8
  cell_h = max(t.height for t in tiles) + 8
  rows = -(-num_images // columns)
  grid = Image.new('RGB', (columns * cell_w, rows * cell_h), (255, 255, 255))
  for index, tile in enumerate(tiles):
    grid.paste(tile, ((index % columns) * cell_w + 4, (index // columns) * cell_h + 4))
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  grid.save(path)


def main(argv):
  del argv  # unused
  flag_values = flags.FLAGS
  started = time.time()
  summary = generate(flag_values.output_dir, flag_values.num_train, flag_values.num_val,
                     flag_values.image_size, flag_values.seed, flag_values.vary_size,
                     flag_values.num_processes)
  if flag_values.preview:
    save_preview(flag_values.preview, flag_values.seed, image_size=flag_values.image_size,
                 vary_size=flag_values.vary_size)
  summary['seconds'] = round(time.time() - started, 2)
  print(json.dumps(summary))


if __name__ == '__main__':
  # Defined only when run as a script, so that importing generate() (the demo does) cannot clash
  # with the importer's own flags.
  flags.DEFINE_string('output_dir', None, 'Folder to write train/, val/ and annotations/ into.')
  flags.DEFINE_integer('num_train', 800, 'Number of training images.')
  flags.DEFINE_integer('num_val', 200, 'Number of validation images.')
  flags.DEFINE_integer('image_size', 256, 'Nominal image side in pixels; object sizes '
                       '(12 to 120 px at 256) and clutter scale with it.')
  flags.DEFINE_integer('seed', 0, 'Random seed; the same seed writes byte-identical files.')
  flags.DEFINE_bool('vary_size', True, 'Draw each image side within [0.75, 1.25] x image_size '
                    '(mostly non-square images); --novary_size makes them all square.')
  flags.DEFINE_integer('num_processes', 1, 'Worker processes drawing the images (make demo: 2); '
                       'the files are the same bytes whatever the number.', lower_bound=1)
  flags.DEFINE_string('preview', None, 'Also save a PNG grid of the first 6 training images with '
                      'their boxes and class names to this path.')
  flags.mark_flag_as_required('output_dir')
  app.run(main)
