"""Training and evaluation engine: configs, the train loop, checkpoints, distributed runs, and COCO
evaluation (:mod:`deformable.engine.evaluation`)."""
