"""One distillation job, from examples to a candidate adapter: data, models, the teacher (generation,
scoring, target cache), vocabulary planning and cross-tokenizer alignment, the objective and losses,
the training loop with its seams (batch sources, hooks), checkpoints, the publish gate and outputs.

Must not import rq, redis, `kd_worker.daemon`, `kd_worker.ops`, `kd_worker.fixtures` or `kd_worker.cli`;
it receives a `KDConfig` and paths, never the worker's settings or runtime.
"""
