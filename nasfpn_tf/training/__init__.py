"""Training utilities: learning-rate schedules of the paper's recipes (gin-configurable)."""
from nasfpn_tf.training.schedules import CosineDecayWithWarmup, StepDecayWithWarmup, epochs_to_steps
