"""StarGAN-VC training (docs/training.md): ``train``, held-out ``evaluate``, checkpoints, the CLI.

Run directory layout::

    config.json  labels.json  corpus.json  log.csv  eval.csv  tb/
    samples/step_XXXXXXXX.{png,wav}
    checkpoints/step_XXXXXXXX/{generator.safetensors, discriminator.safetensors,
                               training_state.pt, state.json}
    checkpoints/LATEST

Example::

    from vcfast.data import load_corpus, demo_corpus_dir
    from vcfast.train import TrainConfig, train, load_generator
    corpus = load_corpus(demo_corpus_dir())
    summary = train(TrainConfig(size="small", steps=50), corpus, "runs/demo")
    G, label_space, info = load_generator("runs/demo")
"""

from vcfast.train.checkpoint import CheckpointError
from vcfast.train.cli import add_train_arguments, cmd_train
from vcfast.train.config import SIZES, TrainConfig
from vcfast.train.evaluate import evaluate
from vcfast.train.loop import train
from vcfast.train.models import build_models, load_generator

__all__ = [
    "SIZES",
    "CheckpointError",
    "TrainConfig",
    "add_train_arguments",
    "build_models",
    "cmd_train",
    "evaluate",
    "load_generator",
    "train",
]
