"""Training throughput: loraplex's loop vs TRL's SFTTrainer, same data, model and LoRA.

    python bench/train_throughput.py [--steps 12] [--warmup 3] [--examples 200]

Each trainer runs in its own child process (so peak memory is its own), trains the
same LoRA (r=8, alpha=16, all seven projections, lr 1e-3, batch 8, answer-only loss)
on the same examples of examples/tasks/ticket-routing for --steps optimizer steps.
Time is measured from the end of step --warmup to the end of the last step, so
model loading, data preparation and one-time kernel setup are excluded. tokens/s
counts the real (unpadded) prompt+answer tokens of the examples processed per second.
Peak memory is the child's peak resident set size (ru_maxrss). TRL's SFTConfig turns
gradient checkpointing on by default, so loraplex runs both without it and with it
(`optim.gradient_checkpointing: true`). Needs `pip install trl`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "tasks" / "ticket-routing" / "train.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, LR = 8, 1e-3


def mean_tokens(examples: list) -> float:
    from transformers import AutoTokenizer

    from loraplex.base_model import pull_embedded_model
    from loraplex.training.data import tokenize_example

    tokenizer = AutoTokenizer.from_pretrained(pull_embedded_model())
    lengths = [len(tokenize_example(tokenizer, e).input_ids) for e in examples]
    return sum(lengths) / len(lengths)


def run_loraplex(args: argparse.Namespace) -> float:
    """Seconds for steps warmup+1..steps."""
    from peft import LoraConfig, get_peft_model

    from loraplex.base_model import pull_embedded_model
    from loraplex.training.config import OptimSection
    from loraplex.training.data import read_examples, tokenize_examples
    from loraplex.training.run import load_base, seed_everything
    from loraplex.training.trainer import LoopSettings, train_loop

    model, tokenizer = load_base(pull_embedded_model(), torch.device("cpu"))
    data, _ = tokenize_examples(tokenizer, read_examples(DATA)[: args.examples], 256)
    seed_everything(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    if args.child == "loraplex-ckpt":  # what run.py does for optim.gradient_checkpointing
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optim = OptimSection(lr=LR, max_steps=args.steps, batch_size=BATCH, warmup_steps=1)
    never = 10**9
    settings = LoopSettings(
        optim=optim,
        seed=0,
        eval_interval=never,
        checkpoint_interval=never,
        keep_checkpoints=1,
        early_stopping_patience=None,
        resume=False,
    )
    marks: dict[int, float] = {}
    train_loop(
        model,
        data,
        [],
        settings,
        Path(args.scratch),
        tokenizer.pad_token_id,
        on_step=lambda s: marks.__setitem__(s.step, time.perf_counter()),
    )
    return marks[args.steps] - marks[args.warmup]


def run_trl(args: argparse.Namespace) -> float:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from loraplex.base_model import pull_embedded_model
    from loraplex.training.data import read_examples

    base_dir = pull_embedded_model()
    examples = read_examples(DATA)[: args.examples]
    # Conversational prompt/completion: TRL applies the chat template and masks the prompt.
    dataset = Dataset.from_list(
        [{"prompt": e.prompt, "completion": [e.messages[-1]]} for e in examples]
    )
    marks: dict[int, float] = {}

    class StepTimes(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            marks[state.global_step] = time.perf_counter()

    config = SFTConfig(
        output_dir=args.scratch,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        max_steps=args.steps,
        warmup_steps=1,
        lr_scheduler_type="linear",
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        max_length=256,
        seed=0,
        dataloader_num_workers=0,
        bf16=False,
        fp16=False,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
        args=config,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(base_dir),
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS),
        callbacks=[StepTimes()],
    )
    trainer.train()
    return marks[args.steps] - marks[args.warmup]


def child(args: argparse.Namespace) -> None:
    seconds = (run_trl if args.child == "trl" else run_loraplex)(args)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak_mib}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--child", choices=["loraplex", "loraplex-ckpt", "trl"], default=None)
    parser.add_argument("--scratch", default="/tmp/loraplex-train-bench")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    from loraplex.training.data import read_examples

    tokens = mean_tokens(read_examples(DATA)[: args.examples])
    measured = {}
    for name in ("loraplex", "loraplex-ckpt", "trl"):
        command = [
            sys.executable,
            __file__,
            "--child",
            name,
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--examples",
            str(args.examples),
            "--scratch",
            f"{args.scratch}/{name}",
        ]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        steps = args.steps - args.warmup
        result["tokens_per_s"] = steps * BATCH * tokens / result["seconds"]
        measured[name] = result
        print(
            f"{name:9s} {result['tokens_per_s']:8.1f} tokens/s  "
            f"peak RSS {result['peak_rss_mib']:7.0f} MiB  ({steps} steps in "
            f"{result['seconds']:.1f} s)",
            flush=True,
        )
    for name in ("loraplex", "loraplex-ckpt"):
        ratio = measured[name]["tokens_per_s"] / measured["trl"]["tokens_per_s"]
        memory = measured[name]["peak_rss_mib"] / measured["trl"]["peak_rss_mib"]
        print(f"{name} / TRL: {ratio:.2f}x tokens/s, {memory:.2f}x peak memory")


if __name__ == "__main__":
    main()
