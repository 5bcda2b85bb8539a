"""Trains SRNO: `python main.py --config configs/default.py --workdir runs/edsr`.

Config values can be overridden on the command line, e.g. `--config.batch_size=32`.
A rerun with the same --workdir resumes from its latest checkpoint.
"""
import sys

from absl import app, flags
from ml_collections import config_flags

flags.DEFINE_string("workdir", None, "Where checkpoints and TensorBoard logs go.", required=True)
config_flags.DEFINE_config_file("config", "configs/default.py", "Training configuration.",
                                lock_config=True)
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from srno_jax import evaluation, sharding, train
    from srno_jax.errors import SRNOError

    train.setup_logging()
    try:
        sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                        FLAGS.process_id)
        results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except SRNOError as e:
        sys.exit(f"error: {e}")
    if results:
        print(evaluation.format_results(results))


def parse_flags(argv):
    """absl's parsing; an unknown --config.key gets a one-line error, not a traceback."""
    try:
        return app.parse_flags_with_usage(argv)
    except (KeyError, AttributeError) as e:  # raised by ml_collections for a misspelt key
        while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(..))
            e = e.args[0]
        msg = (e.args[0] if e.args and isinstance(e.args[0], str) else str(e)).replace("\n", " ")
        bad = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        sys.exit(f"error: unknown config field {msg} (in {', '.join(bad)}); "
                 "see the config file for the valid fields")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
