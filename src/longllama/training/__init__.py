"""Training: FoT continued pre-training with cross-batch memory (docs/training.md) and instruction / chat fine-tuning
(docs/finetuning.md).

One loop runs both, on one CPU or GPU, or on several GPUs through torchrun with DDP or FSDP2 (`torchrun
--nproc_per_node N -m longllama.training CONFIG.yaml` or `-m longllama.cli train CONFIG.yaml`).

`config.load_config("configs/tiny-pretrain.yaml", overrides=["steps=3"])` reads a YAML file into a `TrainConfig`;
`loop.train(config)` runs it (`longllama train CONFIG.yaml` does both). The modules, by job:

* config: the settings (TrainConfig and its sections), YAML and overrides, checks;
* data.pretrain, data.sft: pre-training batches (tokens, packing, prefetching) and fine-tuning examples;
* cross_batch: FoT's training-time memory across the entries of a micro-batch;
* tasks: what a batch is, its loss and its evaluation batches, per mode;
* loop: optimiser, learning rate, micro-batches, steps, evaluation, the run;
* parallel: processes, DDP / FSDP2, activation checkpointing (longllama.recompute) and compile, applied from
  outside the model;
* lora: LoRA adapters through peft (`lora.enabled`, `--lora`) and their merged or adapter export;
* checkpoints: the starting model, training checkpoints (save, resume) and the exported model;
* logs: log.jsonl, the progress bar, the loss curve.

What a run does:

* model: a preset (`model.preset: tiny`) or a folder (`model.path`): a LongLLaMA checkpoint, or a transformers LLaMA
  one (GQA included) that becomes LongLLaMA in memory with the `model.mem_layers` you choose (same tensor names,
  strict load);
* data, `mode: pretrain`: documents -> `TokenizedDocs` -> `build_pipeline(data.pipeline)` batches of
  `data.batch_size` x `data.seq_len`; each batch is cut into contiguous micro-batches (one group per rank, then
  `grad_accum` per rank), and memory layers attend across entries of one micro-batch only
  (docs/training.md#loss-optimiser-and-micro-batches), so cross-batch
  negatives come from the rank-local micro-batch. Loss: the per-sequence mean of
  docs/training.md#loss-optimiser-and-micro-batches. Evaluation uses cross-batch
  range 0 on `data.eval_pipeline` (doc_aware_k1), restarted from the first eval document each time;
* data, `mode: finetune`: JSONL rows -> `InstructionExample` / `ChatExample` padded to `max_total_length` (a named
  `data.mixture` of docs/finetuning.md#templates-and-mixtures or one `data.template`), read by the model's long-input
  handler, so the first
  T - last_context_length tokens go to memory and the last window attends to them
  (docs/finetuning.md#memory-in-fine-tuning). Loss: the token mean
  over labelled positions (the model's `labels=` loss);
* optimiser: AdamW (b1 0.9, b2 0.95, weight decay on every parameter, global-norm clipping), linear warm-up then cosine
  decay to `end_lr` at `decay_steps`, or constant; optional bf16 autocast, activation checkpointing per decoder layer
  (applied from outside the model), torch.compile per layer;
* output in `out_dir`: `checkpoints/step-NNNNNNNN/` (model and optimiser through torch.distributed.checkpoint, RNG
  states, data position, step; written under a temporary name and renamed, the last `keep_checkpoints` kept),
  `log.jsonl`, `loss.png` (when matplotlib is installed) and the final `model/` folder that
  `LongLlamaForCausalLM.from_pretrained` loads. `resume: true` continues from the newest checkpoint and gives the same
  losses as a run that was never stopped.
"""
