"""`KerasParallel`: a `KerasTrainer` trained data-parallel under TensorFlow's
MultiWorkerMirroredStrategy, its workers started as processes (`launcher.processes`). Mirrors
`torch_parallel.TorchParallel` method for method; both implement `launcher.workers.ParallelTrainer`.
"""

from __future__ import annotations

import time
import weakref
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np

from stages.frameworks import tf_trainer  # first: it imports TensorFlow quietly (TF_NOISE)

# isort: split
import keras
import tensorflow as tf

from stages.frameworks.tf_trainer import KerasTrainer
from stages.launcher.plan import (
    COLLECTIVE_TIMEOUT_SECONDS,
    Launch,
    StepTotals,
    WorkerBatches,
    WorkerPlan,
    worker_device,
)
from stages.launcher.processes import launch_processes
from stages.launcher.workers import ParallelTrainer, Task

# A worker whose port was taken between choosing and binding it fails with this (then retried).
PORT_TAKEN = "Could not start gRPC server"


_collectives: dict[str, tf.types.experimental.PolymorphicFunction] = {}  # one strategy a process


# Compiled functions per network (weak keys: a new model never reuses a dead model's graph).
_compiled: weakref.WeakKeyDictionary[keras.Model, tf.types.experimental.PolymorphicFunction]


_compiled = weakref.WeakKeyDictionary()


def _replica_steps(
    network: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    strategy: tf.distribute.Strategy,
):
    # As tf_trainer's steps, each step this worker's slice under strategy.run: apply_gradients
    # sums the gradients over workers (Keras 3 under a tf.distribute strategy), and the loss is the
    # slice's share of the global batch's mean loss, so the sum is the whole batch's gradient.
    if network not in _compiled:

        def step(x, y, index, weight):
            x_batch, y_batch = tf.gather(x, index), tf.gather(y, index)
            with tf.GradientTape() as tape:
                logits = network(x_batch, training=True)
                loss = tf.reduce_sum(
                    weight * tf.nn.sparse_softmax_cross_entropy_with_logits(y_batch, logits)
                )
            gradients = tape.gradient(loss, network.trainable_variables)
            optimizer.apply_gradients(zip(gradients, network.trainable_variables, strict=True))
            right = (tf.argmax(logits, axis=1) == y_batch) & (weight > 0)  # padding excluded
            return loss, tf.reduce_sum(tf.cast(right, tf.int64))

        @tf.function(jit_compile=tf_trainer.JIT_COMPILE, reduce_retracing=True)
        def steps(x, y, index, weight):  # index, weight: (steps, slice) this worker's slices
            losses = tf.TensorArray(tf.float32, size=tf.shape(index)[0])
            correct = tf.constant(0, tf.int64)
            for i in tf.range(tf.shape(index)[0]):
                outputs = strategy.run(step, args=(x, y, index[i], weight[i]))
                loss, step_correct = strategy.experimental_local_results(outputs)[0]  # 1 replica
                losses = losses.write(i, loss)
                correct += step_correct
            return losses.stack(), correct

        _compiled[network] = steps
    return _compiled[network]


class KerasParallel(ParallelTrainer[keras.Model, keras.optimizers.Optimizer, tf.Tensor]):
    """`launcher.workers.ParallelTrainer` in TensorFlow: the `KerasTrainer` it holds, trained by
    workers under MultiWorkerMirroredStrategy (NCCL on GPUs, a gRPC ring on the CPU)."""

    def __init__(self, trainer: KerasTrainer):
        self.trainer = trainer
        self._strategy: tf.distribute.Strategy | None = None  # set by `join` in a worker

    def launch(self, launch: Launch, task: Task, argument: Any) -> Any:
        """Start this machine's workers as processes, run `task` on each, wait; return rank 0's
        result. A failing worker stops the others and raises WorkerFailed."""
        return launch_processes(self, launch, task, argument, port_taken=PORT_TAKEN)

    def join(self, plan: WorkerPlan, requested: str) -> str:
        """Share out the threads, take this worker's GPU if each has one, and create the
        MultiWorkerMirroredStrategy: all before TensorFlow's first operation, which fixes them."""
        gpus = tf.config.list_physical_devices("GPU")
        device = worker_device(requested, len(gpus), plan.local_world_size, "TensorFlow")
        tf.config.threading.set_intra_op_parallelism_threads(plan.threads)
        tf.config.threading.set_inter_op_parallelism_threads(plan.threads)
        if device == "cuda":
            tf.config.set_visible_devices(gpus[plan.local_rank], "GPU")
            tf.config.experimental.set_memory_growth(gpus[plan.local_rank], True)
        else:
            tf.config.set_visible_devices([], "GPU")
        cluster = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec({"worker": list(plan.addresses)}),
            task_type="worker",
            task_id=plan.rank,
            rpc_layer="grpc",
        )
        implementation = tf.distribute.experimental.CommunicationImplementation
        # No timeout on the strategy's own collectives (each step's gradients): TensorFlow
        # starts a thread per timed collective that sleeps out the whole timeout (issue 62466),
        # thousands a minute at this step rate. A worker that dies or stops is caught anyway by
        # the coordination service's heartbeats; `all_reduce_sum` carries the timeout.
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=implementation.NCCL if device == "cuda" else implementation.RING
        )
        self._strategy = tf.distribute.MultiWorkerMirroredStrategy(
            cluster_resolver=cluster, communication_options=options
        )
        return device

    def backend(self, device: str) -> str:
        """Return NCCL on GPUs, TensorFlow's gRPC ring all-reduce on the CPU."""
        return "nccl" if device == "cuda" else "ring"

    def replica_scope(self) -> AbstractContextManager[Any]:
        """Return the strategy's scope: variables created in it are mirrored on every worker."""
        return self._strategy.scope() if self._strategy else nullcontext()

    def replicate(self, network: keras.Model) -> keras.Model:
        """The network built in `replica_scope` is already the replica."""
        return network

    def train_steps(
        self,
        replica: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        x: tf.Tensor,
        y: tf.Tensor,
        batches: WorkerBatches,
    ) -> StepTotals:
        """Train this worker's slice of every global batch; losses summed over workers later."""
        run_steps = _replica_steps(replica, optimizer, self._strategy)
        index, weight = tf.constant(batches.index), tf.constant(batches.weight)
        # the first step alone, as train_epoch does, to time it
        first_losses, first_correct = run_steps(x, y, index[:1], weight[:1])
        first_losses = first_losses.numpy()
        first_step_done = time.perf_counter()
        losses, correct = run_steps(x, y, index[1:], weight[1:])
        return StepTotals(
            np.concatenate([first_losses, losses.numpy()]).astype(np.float64),
            int(first_correct) + int(correct),
            first_step_done,
        )

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray:
        """Return the vector summed over all workers."""
        if "all-reduce" not in _collectives:
            strategy = self._strategy
            if strategy is None:
                raise RuntimeError("all_reduce_sum before join: no strategy to reduce with")

            timed = tf.distribute.experimental.CommunicationOptions(
                timeout_seconds=COLLECTIVE_TIMEOUT_SECONDS
            )

            def replica_sum(vector):
                context = tf.distribute.get_replica_context()
                # (a copy made in the replica: an input as such has no device to reduce to)
                local = tf.identity(vector)
                return context.all_reduce(tf.distribute.ReduceOp.SUM, local, options=timed)

            @tf.function(input_signature=[tf.TensorSpec([None], tf.float64)])
            def reduce(vector):
                summed = strategy.run(replica_sum, args=(vector,))
                return strategy.experimental_local_results(summed)[0]

            _collectives["all-reduce"] = reduce
        return _collectives["all-reduce"](tf.constant(values, tf.float64)).numpy()

    def leave(self) -> None:
        """Wait until every worker is done: TensorFlow's workers watch each other's heartbeats,
        and one that exits while another still works is reported as a crash."""
        self.all_reduce_sum(np.zeros(1))
