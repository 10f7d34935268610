"""Pipeline parallelism (DeepSpeed `PipelineModule`) for the transformer families; see `plan`, `layers`,
`engine` and `trainers.loops.pipeline`."""
