#!/usr/bin/env bash
# Your own COCO-format dataset, end to end: TFRecords, training with COCO evaluation, a SavedModel
# and an int8 TFLite file that carry the class names, detections drawn on images.
# README.md, "Your own dataset", explains each step. Run it from the repository root:
#
#   bash examples/own_dataset.sh
#
# As written it runs on coco128 (128 COCO train2017 images, ../shared/data/coco128 or
# $NASFPN_COCO128), which has no val json: it holds out NUM_VAL of the images as the val split.
# For your data, edit the variables below, or set them in the environment (each is
# ${NAME:-default}). Every step is one command; a rerun converts, evaluates and exports again and
# resumes training from the last checkpoint in $WORK/model. tests/test_walkthrough.py runs this
# script with a tiny model and a few steps.
set -euo pipefail

# ---- Your data: COCO instances jsons and the image folders their file_names are relative to.
COCO128=${NASFPN_COCO128:-../shared/data/coco128}
TRAIN_JSON=${TRAIN_JSON:-$COCO128/annotations/instances_train2017.json}
TRAIN_IMAGES=${TRAIN_IMAGES:-$COCO128/train2017}
# Empty: hold out NUM_VAL random images of TRAIN_JSON as the val split.
VAL_JSON=${VAL_JSON:-}
VAL_IMAGES=${VAL_IMAGES:-$TRAIN_IMAGES}
NUM_VAL=${NUM_VAL:-28}
NUM_SHARDS=${NUM_SHARDS:-1}
# Everything the script writes goes here.
WORK=${WORK:-runs/own_dataset}

# ---- The model and its training.
# Classes: the largest category id of your json + 1 (class index = category id, 0 is the
# background); 91 for COCO's ids 1..90. The converter prints the categories it found.
NUM_CLASSES=${NUM_CLASSES:-91}
# A model file of gin_configs/ (README, "Configs"): here the mobile NAS-FPNLite MobileNetV2 3@48 at
# 320 px; nasfpn_r50_7x256_640.gin is the paper's R-50 (for accelerators).
MODEL_GIN=${MODEL_GIN:-nasfpn_lite_mnv2_3x48_320.gin}
# The paper's recipe, counted in epochs of NUM_TRAIN_IMAGES images (the train converter's
# images_written) at batch BATCH: steps per epoch, the run's length, the decays and the
# learning rates (linear in the batch) follow.
RECIPE=${RECIPE:-recipe_coco_50ep.gin}
NUM_TRAIN_IMAGES=${NUM_TRAIN_IMAGES:-100}
BATCH=${BATCH:-8}
EPOCHS=${EPOCHS:-50}
# Optional: a TF Model Garden backbone checkpoint (e.g. ImageNet weights; README, "Train and
# evaluate"), which small datasets need most. Empty: from random weights.
INIT_CHECKPOINT=${INIT_CHECKPOINT:-}

# ---- Exports and predictions.
NUM_CALIBRATION_IMAGES=${NUM_CALIBRATION_IMAGES:-100}
# Images or folders to draw detections on (on coco128 the val images share the folder of all 128).
PREDICT_INPUT=${PREDICT_INPUT:-$VAL_IMAGES}
MIN_SCORE=${MIN_SCORE:-0.3}
PY=${PY:-.venv/bin/python}
# TensorFlow's C++ INFO/WARNING lines (CUDA probing, oneDNN notices) hide the progress lines.
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}

RECORDS=$WORK/records
MODEL_DIR=$WORK/model
EXPORT=$WORK/export
GIN_FLAGS=(
  --gin_file="$MODEL_GIN" --gin_file="$RECIPE"
  --gin_bindings="build_retinanet.num_classes = $NUM_CLASSES"
  --gin_bindings="NUM_TRAIN_IMAGES = $NUM_TRAIN_IMAGES"
  --gin_bindings="GLOBAL_BATCH_SIZE = $BATCH"
  --gin_bindings="TRAIN_EPOCHS = $EPOCHS"
  --gin_bindings="build_train_dataset.file_pattern = '$RECORDS/train-*.tfrecord'"
  --gin_bindings="build_eval_dataset.file_pattern = '$RECORDS/val-*.tfrecord'"
)
if [[ -n $INIT_CHECKPOINT ]]; then
  GIN_FLAGS+=(--gin_bindings="RetinaNetTrainer.init_checkpoint = '$INIT_CHECKPOINT'")
fi

# 0. coco128 only (no val json): split the train json into train and val jsons.
if [[ -z $VAL_JSON ]]; then
  "$PY" -c "import json, sys; from nasfpn_tf.search import heldout; \
    print(json.dumps(heldout.carve(sys.argv[1], sys.argv[2], int(sys.argv[3]))))" \
    "$TRAIN_JSON" "$WORK/split" "$NUM_VAL"
  TRAIN_JSON=$WORK/split/instances_proxy_train.json
  VAL_JSON=$WORK/split/instances_proxy_heldout.json
fi

# 1. Convert train and val to TFRecords (+ train-label_map.json, val-label_map.json).
"$PY" -m nasfpn_tf.data.create_coco_tfrecord --annotations_file="$TRAIN_JSON" \
  --image_dir="$TRAIN_IMAGES" --output_prefix="$RECORDS/train" --num_shards="$NUM_SHARDS"
"$PY" -m nasfpn_tf.data.create_coco_tfrecord --annotations_file="$VAL_JSON" \
  --image_dir="$VAL_IMAGES" --output_prefix="$RECORDS/val" --num_shards="$NUM_SHARDS"

# 2. What the run will do (steps, batch, learning rates, parameters), without training.
"$PY" -m nasfpn_tf.main --mode=show_config "${GIN_FLAGS[@]}"

# 3. Train, then COCO-evaluate on the val split against its own json: $MODEL_DIR/eval_metrics.json.
"$PY" -m nasfpn_tf.main --mode=train_and_eval --model_dir="$MODEL_DIR" "${GIN_FLAGS[@]}" \
  --gin_bindings="RetinaNetTrainer.eval_annotation_file = '$VAL_JSON'"

# 4. Export a SavedModel (TF Serving: base path $EXPORT/saved_model, version 1) with the names.
"$PY" -m nasfpn_tf.main --mode=export_saved_model --model_dir="$MODEL_DIR" \
  --export_dir="$EXPORT/saved_model/1" --export_label_map="$RECORDS/train-label_map.json"

# 5. Export an int8 TFLite file (+ model.labels.json), calibrated on training images.
"$PY" -m nasfpn_tf.main --mode=export_tflite --model_dir="$MODEL_DIR" \
  --tflite_path="$EXPORT/model.tflite" --quantization=int8 \
  --representative_file_pattern="$RECORDS/train-*.tfrecord" \
  --num_representative_images="$NUM_CALIBRATION_IMAGES" \
  --export_label_map="$RECORDS/train-label_map.json"

# 6. Draw the detections of both exports: detections.json and one image per input.
"$PY" -m nasfpn_tf.predict --model="$EXPORT/saved_model/1" --input="$PREDICT_INPUT" \
  --output_dir="$WORK/predictions/saved_model" --min_score="$MIN_SCORE"
"$PY" -m nasfpn_tf.predict --model="$EXPORT/model.tflite" --input="$PREDICT_INPUT" \
  --output_dir="$WORK/predictions/tflite" --min_score="$MIN_SCORE"
