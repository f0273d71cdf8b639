r"""Detects objects in image files with an exported or a trained NAS-FPN RetinaNet.

  python -m nasfpn_tf.predict --model=exports/demo/1 --input=photos/ --output_dir=out
  python -m nasfpn_tf.predict --model=exports/demo.tflite --input='photos/*.jpg' --output_dir=out
  python -m nasfpn_tf.predict --model=runs/demo --input=photo.jpg --output_dir=out

--model is a SavedModel folder (nasfpn_tf.main --mode=export_saved_model), a .tflite file
(--mode=export_tflite) or a model dir (its last checkpoint, built from its model_config.json).
Every image is decoded with PIL (grayscale, palette and RGBA images as RGB) and preprocessed as
evaluation does it. Writes into --output_dir:
  detections.json  every detection in COCO results format ({image_id, category_id, bbox: [x, y,
                   width, height] in original pixels, score}) plus the image's file_name;
                   image_id is the file name's number when all are numbers (COCO's naming),
                   else the image's position in the input order, from 1;
  one image per input, of the same name (PNG stays PNG, other formats become JPEG), with the
                   boxes of score >= --min_score drawn, with class name and score.
--soft_nms_sigma=S post-processes a model dir's detections with Gaussian Soft-NMS
(`build_retinanet.soft_nms_sigma`, nasfpn_tf/models/postprocess.py); a SavedModel has the
post-processing it was exported with (export with that gin binding for Soft-NMS), a .tflite has
TFLite's hard-NMS op only.
--tta_scales=1.0,1.25 --tta_flip detect with test-time augmentation (a model dir only;
nasfpn_tf/models/tta.py, docs/tta.md): every view's candidates merged before one NMS.
Unreadable images are skipped with a message on stderr and counted in the summary (a JSON line
on stdout). Exit status 1, with a message, for bad flags, a model that cannot be loaded, or no
readable image.
"""
import glob
import json
import math
import os
import sys
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from absl import app
from absl import flags
import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont
import tensorflow as tf

from nasfpn_tf.data import label_map as label_map_lib
from nasfpn_tf.evaluation import coco_metrics
from nasfpn_tf.export import saved_model
from nasfpn_tf.models import geometry
from nasfpn_tf.models import tta as tta_lib
from nasfpn_tf import tta_flags

_MODEL = flags.DEFINE_string(
    'model', None, 'A SavedModel folder, a .tflite file, or a model dir with checkpoints and '
    'model_config.json (or, written before it, operative_config.gin).')
_INPUT = flags.DEFINE_multi_string(
    'input', None, 'An image file, a folder (its image files, not subfolders), or a glob such '
    "as 'photos/*.jpg'; repeatable.")
_OUTPUT_DIR = flags.DEFINE_string(
    'output_dir', None, 'Folder for detections.json and the drawn images; created if missing. '
    'It must not hold input images (they would be overwritten).')
_MIN_SCORE = flags.DEFINE_float(
    'min_score', 0.3, 'Draw detections of at least this score; detections.json keeps all (as '
    'COCO evaluation wants them).', lower_bound=0.0, upper_bound=1.0)
_LABEL_MAP = flags.DEFINE_string(
    'label_map', None, 'JSON {"category id": "name"} for the drawn names; default: the one the '
    'model carries (SavedModel assets/label_map.json, <stem>.labels.json beside a .tflite, the '
    'label map beside a model dir\'s records), else the category ids.')
_SOFT_NMS_SIGMA = flags.DEFINE_float(
    'soft_nms_sigma', None, 'For a model dir: Gaussian Soft-NMS with this sigma instead of its '
    'recorded post-processing (0: hard NMS). A SavedModel keeps what it was exported with, a '
    '.tflite has hard NMS only: both refuse the flag.')
flags.adopt_module_key_flags(tta_flags)

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')
RESULTS_FILE = 'detections.json'
# Box colors by class id: distinct and readable under black text.
_PALETTE = ('#ff595e', '#ffca3a', '#8ac926', '#1982c4', '#6a4c93', '#ff924c', '#52a675',
            '#4267ac', '#c5ca30', '#f15bb5')

_JPEG_OPTIONS = {'quality': 95, 'subsampling': 0}


def _is_jpeg(name: str) -> bool:
  return os.path.splitext(name)[1].lower() in ('.jpg', '.jpeg')

# One RGB uint8 [H, W, 3] image -> numpy detections with a batch of 1 (`coco_metrics` keys,
# boxes in original pixels, classes the dataset's ids).
Detector = Callable[[np.ndarray], Dict[str, np.ndarray]]


def list_images(inputs: Sequence[str]) -> List[str]:
  """The image files that the --input values name, in order, each once."""
  paths, seen = [], set()
  for spec in inputs:
    if os.path.isdir(spec):
      found = sorted(p for p in glob.glob(os.path.join(spec, '*'))
                     if p.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(p))
      if not found:
        raise ValueError(f'--input={spec}: the folder has no {"/".join(IMAGE_EXTENSIONS)} files.')
    elif os.path.isfile(spec):
      found = [spec]
    else:
      found = sorted(p for p in glob.glob(spec) if os.path.isfile(p))
      if not found:
        raise ValueError(f'--input={spec}: no such file or folder, and no file matches it.')
    paths += [p for p in found if not (p in seen or seen.add(p))]
  return paths


def _numpy(detections: Mapping[str, tf.Tensor]) -> Dict[str, np.ndarray]:
  return {key: np.asarray(value) for key, value in detections.items()}


def _saved_model_detector(path: str) -> Tuple[Detector, Dict[int, str]]:
  signature = tf.saved_model.load(path).signatures.get('serving_default')
  if signature is None or 'images' not in signature.structured_input_signature[1]:
    raise ValueError(f'--model={path}: its serving_default signature takes no `images`; export '
                     'it with nasfpn_tf.main --mode=export_saved_model.')
  label_map_file = os.path.join(path, 'assets', label_map_lib.ASSET_FILE)
  label_map = (label_map_lib.read_label_map(label_map_file) if os.path.exists(label_map_file)
               else {})
  return lambda image: _numpy(signature(images=tf.constant(image[None]))), label_map


def _model_dir_detector(
    path: str, soft_nms_sigma: Optional[float] = None,
    tta: Optional[tta_lib.TTAConfig] = None) -> Tuple[Detector, Dict[int, str]]:
  bindings = ([] if soft_nms_sigma is None else
              [f'build_retinanet.soft_nms_sigma = {float(soft_nms_sigma)!r}'])
  model, _, _ = saved_model.load_model(path, bindings)
  label_map, _ = saved_model.model_label_map(model.get_config()['num_classes'])
  if tta is None:
    module = saved_model.DetectionModule(model)
    return lambda image: _numpy(module.detect_images(image[None])), label_map
  detect_views = tf.function(tta_lib.TTADetector(model, tta))

  def detect(image):
    # Evaluation's preprocessing, the views, and back to original pixels, as DetectionModule.
    inputs, image_info = geometry.resize_and_pad(image, model.image_size)
    detections = detect_views({'images': inputs[None], 'image_info': image_info[None]})
    detections['detection_boxes'] = geometry.to_original_image(
        detections['detection_boxes'], image_info[None])
    return _numpy(detections)

  return detect, label_map


def _tflite_detector(path: str) -> Tuple[Detector, Dict[int, str]]:
  # Imported here so the other model kinds never load the TFLite code.
  from nasfpn_tf.export import tflite_runtime  # pylint: disable=g-import-not-at-top
  detector = tflite_runtime.TFLiteDetector(model_path=path)
  size = detector.image_size

  def detect(image):
    # The file takes the preprocessed image and answers in its input's pixels; its input size is
    # all the preprocessing needs.
    inputs, image_info = geometry.resize_and_pad(image, size)
    detections = detector(inputs.numpy())
    detections['detection_boxes'] = geometry.to_original_image(
        detections['detection_boxes'], image_info[None]).numpy()
    return detections

  labels_file = label_map_lib.tflite_labels_path(path)
  label_map = (label_map_lib.read_tflite_labels(labels_file) if os.path.exists(labels_file)
               else {})
  return detect, label_map


def load_detector(path: str, soft_nms_sigma: Optional[float] = None,
                  tta: Optional[tta_lib.TTAConfig] = None) -> Tuple[Detector, Dict[int, str]]:
  """(detector, label map {id: name}) of a SavedModel folder, .tflite file or model dir;
  `soft_nms_sigma` (model dirs only) overrides the model's post-processing, `tta` (model dirs
  only) detects with test-time augmentation."""
  if soft_nms_sigma is not None and not (soft_nms_sigma >= 0 and math.isfinite(soft_nms_sigma)):
    raise ValueError(f'--soft_nms_sigma={soft_nms_sigma}: give a finite number >= 0 (0: hard '
                     'NMS).')
  if tta is not None and (path.endswith('.tflite') or
                          os.path.isfile(os.path.join(path, 'saved_model.pb'))):
    raise ValueError(f'--tta_scales / --tta_flip: --model={path} is an export, whose graph runs '
                     'one fixed-size view with its NMS inside; test-time augmentation needs the '
                     'model dir (its checkpoint), give that.')
  if path.endswith('.tflite'):
    if not os.path.isfile(path):
      raise ValueError(f'--model={path}: no such file.')
    if soft_nms_sigma:
      raise ValueError(f'--soft_nms_sigma: --model={path} is a .tflite file, whose built-in '
                       'TFLite_Detection_PostProcess op has hard NMS only (no Soft-NMS); use the '
                       'SavedModel or the model dir.')
    return _tflite_detector(path)
  if os.path.isfile(os.path.join(path, 'saved_model.pb')):
    if soft_nms_sigma is not None:
      raise ValueError(f'--soft_nms_sigma: --model={path} is a SavedModel, whose '
                       'post-processing was fixed at export; export it with --gin_bindings='
                       f"'build_retinanet.soft_nms_sigma = {soft_nms_sigma}', or give the model "
                       'dir.')
    return _saved_model_detector(path)
  if os.path.isdir(path):
    # Its errors say what the model dir lacks.
    return _model_dir_detector(path, soft_nms_sigma, tta)
  raise ValueError(f'--model={path}: not a SavedModel folder, a .tflite file or a model dir.')


def image_ids(paths: Sequence[str]) -> List[int]:
  """COCO image ids: the file names' numbers (000000000139.jpg -> 139) when all are distinct
  numbers, so results match COCO annotations; else 1..N."""
  stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
    return [int(s) for s in stems]
  return list(range(1, len(paths) + 1))


def draw_detections(image: Image.Image, detections: Mapping[str, np.ndarray],
                    label_map: Mapping[int, str], min_score: float) -> Image.Image:
  """A copy of `image` with the boxes of score >= min_score drawn and labeled 'name score'."""
  image = image.copy()
  draw = ImageDraw.Draw(image)
  width = max(2, round(min(image.size) / 250))
  font = ImageFont.load_default(size=max(10, round(min(image.size) / 40)))
  count = int(detections['num_detections'][0])
  scores = detections['detection_scores'][0, :count]
  # Least confident first, so the most confident boxes and labels end up on top.
  for index in np.argsort(scores, kind='stable'):
    ymin, xmin, ymax, xmax = detections['detection_boxes'][0, index]
    category, score = detections['detection_classes'][0, index], scores[index]
    if score < min_score:
      continue
    color = _PALETTE[int(category) % len(_PALETTE)]
    draw.rectangle([xmin, ymin, xmax, ymax], outline=color, width=width)
    text = f'{label_map.get(int(category), int(category))} {score:.2f}'
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    height = bottom - top + 2 * width
    label_top = ymin - height if ymin >= height else ymin  # above the box, else inside it
    draw.rectangle([xmin, label_top, xmin + right - left + 2 * width, label_top + height],
                   fill=color)
    draw.text((xmin + width - left, label_top + width - top), text, fill='black', font=font)
  return image


def _output_name(path: str, taken: Set[str]) -> str:
  """The drawn image's file name: the input's, made unique among `taken`."""
  stem, extension = os.path.splitext(os.path.basename(path))
  extension = '.png' if extension.lower() == '.png' else '.jpg'
  name, number = stem + extension, 1
  while name in taken:
    number += 1
    name = f'{stem}_{number}{extension}'
  taken.add(name)
  return name


def predict(model: str, inputs: Sequence[str], output_dir: str, min_score: float = 0.3,
            label_map_path: Optional[str] = None,
            soft_nms_sigma: Optional[float] = None,
            tta: Optional[tta_lib.TTAConfig] = None) -> Dict[str, object]:
  """Runs the model on the images, writes detections.json and the drawn images into
  `output_dir`; returns the summary. Raises ValueError for bad arguments (naming the flag)."""
  paths = list_images(inputs)
  output_dir_path = os.path.abspath(output_dir)
  inside = [p for p in paths if os.path.dirname(os.path.abspath(p)) == output_dir_path]
  if inside:
    raise ValueError(f'--output_dir={output_dir} holds input images ({inside[0]}, ...): the drawn '
                     'images would overwrite them; choose another folder.')
  detect, label_map = load_detector(model, soft_nms_sigma, tta)
  if label_map_path:
    label_map = label_map_lib.read_label_map(label_map_path)
  os.makedirs(output_dir, exist_ok=True)
  results, skipped, taken, drawn = [], [], set(), 0
  for path, image_id in zip(paths, image_ids(paths)):
    try:
      with Image.open(path) as opened:
        image = opened.convert('RGB')  # Decodes the whole file: a truncated one fails here.
    except (OSError, ValueError, Image.DecompressionBombError) as e:
      print(f'Skipping {path}: cannot read it as an image ({e}).', file=sys.stderr, flush=True)
      skipped.append(path)
      continue
    detections = detect(np.asarray(image))
    image_results = coco_metrics.coco_results([image_id], detections)
    results += [dict(result, file_name=path) for result in image_results]
    name = _output_name(path, taken)
    # JPEG at quality 95 without chroma subsampling keeps the thin colored boxes crisp.
    draw_detections(image, detections, label_map, min_score).save(
        os.path.join(output_dir, name), **_JPEG_OPTIONS if _is_jpeg(name) else {})
    shown = sum(r['score'] >= min_score for r in image_results)
    drawn += shown
    print(f'{path}: {len(image_results)} detections, {shown} drawn -> {name}', flush=True)
  if len(skipped) == len(paths):
    raise ValueError(f'none of the {len(paths)} --input images could be read.')
  results_path = os.path.join(output_dir, RESULTS_FILE)
  coco_metrics.results_to_coco_json(results, results_path)
  return {'images': len(paths) - len(skipped), 'detections': len(results), 'drawn': drawn,
          'skipped': len(skipped), 'skipped_files': skipped, 'results': results_path,
          'output_dir': output_dir}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  tf.get_logger().setLevel('WARNING')
  try:
    summary = predict(_MODEL.value, _INPUT.value, _OUTPUT_DIR.value, _MIN_SCORE.value,
                      _LABEL_MAP.value, _SOFT_NMS_SIGMA.value,
                      tta_flags.tta_config())
  except ValueError as e:
    sys.exit(f'nasfpn_tf.predict: error: {e}')
  print(json.dumps(summary), flush=True)


if __name__ == '__main__':
  flags.mark_flags_as_required(['model', 'input', 'output_dir'])
  app.run(main)
