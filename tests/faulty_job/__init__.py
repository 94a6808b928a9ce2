"""The job with a model that gets a NaN loss on every ``NAN_EVERY``-th batch, for the fault test that checks such
batches are skipped and never published: the test seam (``tests.model_seams.poison_every``) lives here, not in the
job's code or configuration.

    flink run -pym tests.faulty_job -pyfs <zip of flink_job, model and tests> -- --config job.yaml

A TaskManager imports this package from the shipped zip when it unpickles ``NanTrainFunction``:
``flink_job.flink.train_function`` is imported first, as it imports torch off PyFlink's task thread.
"""
from __future__ import annotations

from flink_job.flink.train_function import TrainFunction
from flink_job.stages.train import TrainStage
from tests.model_seams import poison_every

NAN_EVERY = 4


class NanTrainFunction(TrainFunction):
    """``TrainFunction`` whose stage's model is poisoned once the stage is built or restored (a restored stage
    replays its logged calls unpoisoned first; the fault test's job never restarts)."""

    def _stage(self, index: int) -> TrainStage:
        fresh = index not in self.stages
        stage = super()._stage(index)
        if fresh:
            poison_every(stage.model, NAN_EVERY)
        return stage


def main() -> None:
    """``python -m flink_job``, with the topology building ``NanTrainFunction`` for the training stage."""
    from flink_job.flink import job, topology

    topology.make_train_function = NanTrainFunction
    job.main()
