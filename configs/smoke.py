"""A tiny end-to-end run: no network, no files, well under a minute on a CPU.

Run:
    python main.py --config=configs/smoke.py --workdir=/tmp/hhjax/smoke

Synthetic images (the classes differ in brightness), 75x75, random init, InceptionV3 cut at
mixed0 with a small head: 2 warm-up epochs with the backbone frozen, then 1 fine-tuning epoch
that opens mixed0, 10 steps of 4 images each. It exercises everything the real job does
(checkpoints, resume, evaluation, metrics.jsonl, TensorBoard, loss.png / accuracy.png,
eval.json with a confusion matrix, test.json). Expected: about 25 s on 2 CPU cores, ending at
validation accuracy 1.0 on the 12 synthetic validation images (and on the 12 test images) (an easy task on purpose: it shows that the loop
works, not what the model can do).
Running the same command again resumes the finished run and only evaluates.
"""

from configs import default


def get_config():
  """Returns the smoke-test configuration."""
  config = default.get_config()
  config.batch_size = 4
  config.steps_per_epoch = 10
  config.log_every_steps = 5
  config.checkpoint_every_steps = 5
  config.keep_checkpoints = 2

  config.data.source = 'fake'
  # Synthetic splits of their own: 12 validation images choose, 12 other test images report.
  config.data.validation_split = 'validation'
  config.data.test_split = 'test'
  config.data.image_size = 75
  config.data.fake.num_train_examples = 32
  config.data.fake.num_eval_examples = 12
  config.data.fake.num_classes = 2
  config.data.num_parallel_calls = 2

  config.model.cut = 'mixed0'
  config.model.pretrained = None
  config.model.head = 'gap'
  config.model.hidden = 32

  config.warmup.epochs = 2
  config.warmup.learning_rate = 1e-2
  config.finetune.epochs = 1
  config.finetune.learning_rate = 1e-3
  config.finetune.unfreeze_from = 'mixed0'
  return config
