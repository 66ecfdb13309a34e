"""Layer 4, runtime: what every training loop shares, so that no loop copies it. Imports `errors`, `config` and
`objectives` (the metrics it reduces across processes) below it.

- `accelerator`: the accelerate runtime (device, mixed precision, engines) and the multi-process launcher;
- `processes`: the process group a run is in (reduce, any-process flags, broadcast, placing frozen models);
- `run_folder`: the run folder (never silently overwritten), its resolved config, the resume checks;
- `checkpoint`: atomic, checksummed checkpoints that resume exactly;
- `logging`: metrics.jsonl (the source of truth) and TensorBoard, main process only;
- `signals`: SIGTERM / SIGINT as a request to stop after the current step.
"""
