# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv and installs the
# locked stack of its Python version (requirements/lock-py3.X.txt) when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The supported Python versions, one lock each; setup.py's python_requires says the same
# (tests/test_locks.py checks both).
PYTHON_VERSIONS := 3.10 3.11 3.12 3.13
LOCKS := $(PYTHON_VERSIONS:%=requirements/lock-py%.txt)
PRINT_VERSION := import sys; print(".".join(map(str, sys.version_info[:3])))
# The goals to name in the hint of a wrong interpreter.
GOALS = $(or $(MAKECMDGOALS),test)
SUPPORTED := $(firstword $(PYTHON_VERSIONS))-$(lastword $(PYTHON_VERSIONS))
DEMO_DIR ?= runs/demo
# pytest workers: the suite is dominated by single-threaded graph building, so 2 processes on
# 2 cores finish sooner than one.
TEST_WORKERS ?= 2

.PHONY: demo demo-steps search-demo test clean lock mediapipe-venv

# The venv's interpreter (.venv's own once it exists) must be a supported version: otherwise one
# line says which it found and what to run instead, before anything is created.
# The lock of its version is installed as is with --no-deps, so pip adds no unlocked version of
# its own (a dependency missing from a stale lock would otherwise come in at whatever version is
# newest); `pip check` then fails unless the locked set meets the requirements of setup.py and of
# every package in it.
$(STAMP): setup.py constraints.txt $(LOCKS)
	@supported() { v=$$($$1 -c '$(PRINT_VERSION)' 2>/dev/null) && \
	    case " $(PYTHON_VERSIONS) " in *" $${v%.*} "*) return 0;; esac; return 1; }; \
	  py=$(PYTHON); fix=; if test -x $(PY); then py=$(PY); fix='`make clean`, then '; fi; \
	  supported $$py && exit 0; \
	  found="is Python $$v"; test -n "$$v" || found="was not found"; \
	  hint="install one, then run $$fix\`make $(GOALS) PYTHON=python3.X\`"; \
	  for c in $(PYTHON_VERSIONS:%=python%); do \
	    supported $$c && hint="run $$fix\`make $(GOALS) PYTHON=$$c\`"; \
	  done; \
	  echo "make: $$py $$found; nasfpn_tf needs Python $(SUPPORTED): $$hint" >&2; exit 1
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	v=$$($(PY) -c '$(PRINT_VERSION)') && \
	  $(PY) -m pip install --no-deps -r requirements/lock-py$${v%.*}.txt -e .
	$(PY) -m pip check
	touch $(STAMP)

# make lock: after an edit of constraints.txt (or setup.py's requirements), resolves the full
# locks again, one per supported version, for Linux x86_64 wheels whatever machine runs it. uv
# (pinned, in build/uv) can resolve for another Python than its own. It keeps the versions a lock
# already holds where they still fit; delete a lock to resolve it afresh. setup.py's metadata is
# refreshed because uv's cache of it does not see constraints.txt.
UV_VERSION := 0.13.9
UV := build/uv/bin/uv
LOCK_ARGS := setup.py --extra test -c constraints.txt --python-platform linux \
  --refresh-package nasfpn-tf

lock: | $(UV)
	mkdir -p requirements
	for v in $(PYTHON_VERSIONS); do \
	  for args in "$(LOCK_ARGS) --python-version $$v -o requirements/lock-py$$v.txt" \
	      "$(MEDIAPIPE_LOCK_ARGS) --python-version $$v -o requirements/mediapipe-lock-py$$v.txt"; do \
	    $(UV) pip compile --quiet $$args \
	      --custom-compile-command "make lock, which runs uv $(UV_VERSION): uv pip compile $$args" \
	      || exit 1; \
	  done; \
	done

$(UV):
	$(PYTHON) -m venv build/uv
	build/uv/bin/pip install uv==$(UV_VERSION)

# make mediapipe-venv: MediaPipe Tasks, whose ObjectDetector tests/test_tflite_metadata.py runs on
# an exported .tflite, in a venv of its own: no mediapipe release installs beside this stack's
# TensorFlow (docs/mediapipe.md). Its lock (requirements/mediapipe-lock-py3.X.txt, from
# requirements/mediapipe.in) is installed as is, then checked, as the main one is. `make test`
# builds it; run alone, the test skips without it (and fails under CI=true).
MEDIAPIPE_VENV := .venv-mediapipe
MEDIAPIPE_STAMP := $(MEDIAPIPE_VENV)/.installed
MEDIAPIPE_LOCK_ARGS := requirements/mediapipe.in --python-platform linux
mediapipe-venv: $(MEDIAPIPE_STAMP)

$(MEDIAPIPE_STAMP): requirements/mediapipe.in $(PYTHON_VERSIONS:%=requirements/mediapipe-lock-py%.txt) | $(STAMP)
	test -x $(MEDIAPIPE_VENV)/bin/python || $(PY) -m venv $(MEDIAPIPE_VENV)
	v=$$($(MEDIAPIPE_VENV)/bin/python -c '$(PRINT_VERSION)') && \
	  $(MEDIAPIPE_VENV)/bin/python -m pip install --no-deps -r requirements/mediapipe-lock-py$${v%.*}.txt
	$(MEDIAPIPE_VENV)/bin/python -m pip check
	touch $(MEDIAPIPE_STAMP)

# make demo: embedded dataset -> TFRecords -> train + COCO eval of gin_configs/demo.gin -> exports
# -> drawn predictions, each phase timed.
# Generation and conversion are file targets under $(DEMO_DIR), skipped when their outputs exist.
# Training always runs and resumes from the last checkpoint in $(DEMO_DIR): on a finished run it
# is already at train_steps, so a rerun evaluates, exports over the earlier exports and draws
# again (about a minute); an interrupted one goes on where it stopped. DEMO_IMAGE_SIZE is the synthetic images' nominal side; it must stay
# build_retinanet.image_size of demo.gin (object sizes scale with it).
DEMO_IMAGE_SIZE ?= 256
DEMO_NUM_TRAIN ?= 2000
DEMO_NUM_VAL ?= 200
DEMO_SEED ?= 0
DEMO_DATA := $(DEMO_DIR)/data
# The demo ends by exporting the trained model (SavedModel for TF Serving, .tflite for phones)
# and drawing the SavedModel's detections of score >= DEMO_MIN_SCORE on a few val images.
DEMO_EXPORT := $(DEMO_DIR)/export
DEMO_TFLITE_QUANTIZATION ?= float32
DEMO_MIN_SCORE ?= 0.4
DEMO_PREDICT_IMAGES = $(addprefix $(DEMO_DATA)/val/,000000000001.jpg 000000000002.jpg \
  000000000003.jpg 000000000004.jpg)
DEMO_RECORDS := $(DEMO_DIR)/records
# Extra arguments of the training run, e.g. DEMO_GIN_ARGS="--gin_bindings='TRAIN_STEPS = 100'".
DEMO_GIN_ARGS ?=
# The demo's config by what this machine trains fast (nasfpn_tf/training/precision.py, demo_gin):
# demo.gin (SGD, 1100 steps) in bfloat16 (AMX-BF16, a GPU) or in float32 with AVX-512 (Zen 4, 5),
# demo_float32.gin (AdamW, 500 steps with a long warm-up: half the time) on AVX2-only CPUs;
# evaluated only when the demo runs.
DEMO_GIN ?= $(or $(shell $(PY) -m nasfpn_tf.training.precision --demo_gin 2>/dev/null),demo.gin)
# TensorFlow's C++ INFO/WARNING lines (CUDA probing, oneDNN notices) hide the progress lines.
DEMO_ENV := TF_CPP_MIN_LOG_LEVEL=2
# Runs a command and prints its wall time: $(call demo_timed,what,command).
demo_timed = @s=$$(date +%s); $(2) && echo "[demo] $(1): $$(( $$(date +%s) - s )) s"

demo: $(STAMP)
	@s=$$(date +%s); $(MAKE) --no-print-directory demo-steps DEMO_DIR=$(DEMO_DIR) && \
	  echo "[demo] total (generate + convert + train + eval + export + predict): $$(( $$(date +%s) - s )) s"

demo-steps: $(DEMO_RECORDS)/train-label_map.json $(DEMO_RECORDS)/val-label_map.json
	$(call demo_timed,train + eval,$(DEMO_ENV) $(PY) -m nasfpn_tf.main --mode=train_and_eval \
	  --gin_file=$(DEMO_GIN) --model_dir=$(DEMO_DIR) \
	  --gin_bindings="build_train_dataset.file_pattern = '$(DEMO_RECORDS)/train-*.tfrecord'" \
	  --gin_bindings="build_eval_dataset.file_pattern = '$(DEMO_RECORDS)/val-*.tfrecord'" \
	  $(DEMO_GIN_ARGS))
	@$(PY) -c "import json; from nasfpn_tf.evaluation.coco_metrics import format_metrics; \
	  m = json.load(open('$(DEMO_DIR)/eval_metrics.json')); \
	  print('COCO box metrics of $(DEMO_DIR) at step', m['step'], 'on the demo val split:'); \
	  print(format_metrics(m)); print('AP50 = %.3f (the demo aims at >= 0.6)' % m['AP50'])"
	$(call demo_timed,export SavedModel + TFLite,$(DEMO_ENV) $(PY) -m nasfpn_tf.main \
	  --mode=export --model_dir=$(DEMO_DIR) --export_dir=$(DEMO_EXPORT)/saved_model \
	  --tflite_path=$(DEMO_EXPORT)/model.tflite --quantization=$(DEMO_TFLITE_QUANTIZATION))
	$(call demo_timed,predict,$(DEMO_ENV) $(PY) -m nasfpn_tf.predict \
	  --model=$(DEMO_EXPORT)/saved_model --output_dir=$(DEMO_DIR)/predictions \
	  --min_score=$(DEMO_MIN_SCORE) $(foreach image,$(DEMO_PREDICT_IMAGES),--input=$(image)))
	@echo "[demo] exported $(DEMO_EXPORT)/saved_model and $(DEMO_EXPORT)/model.tflite;" \
	  "drawn detections in $(DEMO_DIR)/predictions/"

# The generator writes annotations/instances_val.json last. Two processes draw the images (the
# same bytes as one).
$(DEMO_DATA)/annotations/instances_val.json: | $(STAMP)
	$(call demo_timed,generate,$(DEMO_ENV) $(PY) -m nasfpn_tf.data.synthetic \
	  --output_dir=$(DEMO_DATA) --num_train=$(DEMO_NUM_TRAIN) --num_val=$(DEMO_NUM_VAL) \
	  --image_size=$(DEMO_IMAGE_SIZE) --seed=$(DEMO_SEED) --num_processes=2)

# One converter process (one TensorFlow start) writes both splits, train then val, each split's
# label map after its shards, and a JSON summary line of each into $(DEMO_DIR)/records.jsonl. A
# pattern rule with two targets (% is `records`) runs once for both, in any GNU make (grouped
# targets, &:, need make 4.3), and again when either label map is missing.
$(DEMO_DIR)/%/train-label_map.json $(DEMO_DIR)/%/val-label_map.json: \
    $(DEMO_DATA)/annotations/instances_val.json
	$(call demo_timed,convert train + val,$(DEMO_ENV) $(PY) -m nasfpn_tf.data.create_coco_tfrecord \
	  $(foreach split,train val,--annotations_file=$(DEMO_DATA)/annotations/instances_$(split).json \
	    --image_dir=$(DEMO_DATA)/$(split) --output_prefix=$(DEMO_DIR)/$*/$(split)) \
	  --num_shards=2 --num_threads=2 > $(DEMO_DIR)/$*.jsonl)

# make search-demo: a short architecture search (PPO) on the CPU proxy into $(SEARCH_DIR), timed.
# The proxy's shared cache (a backbone trained once, its features) is built first; every trial
# then trains one pyramid on it. A rerun resumes; a larger SEARCH_DEMO_TRIALS extends the search.
# PPO updates its policy every 2 rewards at learning rate 0.01 here, the setting that learned
# within 50 samples on the CPU proxy (docs/search.md; the defaults, 16 and 1e-3, are for searches
# of thousands). Six trials keep the demo within 10 minutes on 2 cores with the cache;
# SEARCH_DEMO_TRIALS=12 shows PPO's updates at work.
SEARCH_DIR ?= runs/search_demo
SEARCH_DEMO_TRIALS ?= 6
search-demo: $(STAMP)
	@s=$$(date +%s); $(DEMO_ENV) $(PY) -m nasfpn_tf.search --search_dir=$(SEARCH_DIR) \
	  --algorithm=ppo --proxy=cpu --num_trials=$(SEARCH_DEMO_TRIALS) \
	  --gin_bindings="PPOController.batch_size = 2" \
	  --gin_bindings="PPOController.learning_rate = 0.01" && \
	  echo "[search-demo] $$(( $$(date +%s) - s )) s; best architecture: $(SEARCH_DIR)/best.gin," \
	    "progress: $(SEARCH_DIR)/search_progress.png"

# The tests run MediaPipe's ObjectDetector on an export, from its own venv (mediapipe-venv).
test: $(STAMP) $(MEDIAPIPE_STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --durations=15 tests

clean:
	rm -rf $(VENV) $(MEDIAPIPE_VENV) runs .pytest_cache
