"""--mode=eval: loss, accuracy and the confusion matrix of a checkpoint over the eval split.

    python main.py --workdir=W --mode=eval [--checkpoint=best]

The same `Evaluator` (hhjax.training.evaluation) runs at the end of every training epoch.
"""

from typing import Any

import jax
import ml_collections

from hhjax import entry
from hhjax import pictures
from hhjax import run_report
from hhjax import sharding
from hhjax import workdir as workdir_lib
from hhjax.training import evaluation


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             checkpoint: str = 'latest') -> dict[str, Any]:
  """Evaluates the latest (or 'best') checkpoint in `workdir` on config.data.eval_split.

  Prints loss, accuracy, the confusion matrix and the metrics of hhjax.eval_metrics; writes
  WORKDIR/eval.json and, beside it, the pictures of hhjax.pictures (confusion matrix,
  reliability diagram, misclassified images) and the run report, report.html.
  """
  workdir_lib.check_inference_config(config, workdir)
  sharding.check_batch_size(entry.eval_batch_size(config), 'config.eval_batch_size')
  mesh, model, state, class_names, step = entry.restore_for_inference(config, workdir,
                                                                      checkpoint)
  evaluator = evaluation.Evaluator(model, len(class_names), mesh,
                                   evaluation.eval_batches(entry.data(config)),
                                   label_smoothing=entry.label_smoothing(config),
                                   metrics=entry.eval_metrics(config))
  result = evaluator(state['params'], state['batch_stats'])
  is_main = jax.process_index() == 0
  out = evaluation.report(result, class_names, step, workdir_lib.absolute(workdir), is_main)
  pictures.write_eval_pictures(entry.data(config), result, class_names, step, workdir_lib.absolute(workdir),
                               is_main=is_main)
  if is_main:
    run_report.write_and_log(workdir_lib.absolute(workdir))
  return out
